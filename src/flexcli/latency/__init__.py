"""Latency: the timing harness, the per-regime lookup table and the latency model, and table profiling."""
