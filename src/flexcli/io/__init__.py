"""Checkpoint I/O: source inspection, the safetensors writer, atomic commits, and flexcli's own files."""
