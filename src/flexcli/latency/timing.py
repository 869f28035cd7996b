"""The timing harness: median-of-repeats timings and the timed callables of one latency regime.

A regime (batch B, tokens S, prefill or decode after kv_len cached tokens, eager or CUDA graphs) fixes
what one call is: prefill is a forward over (B, S); decode is one token per sequence after a KV cache of
kv_len tokens, cropped back after every call so the cache never grows.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .table import Regime


@dataclass(frozen=True)
class TimingPolicy:
    """How one timing is taken: time-based warm-up, median of repeats, re-measure while noisy."""

    repeats: int = 7
    warmup_s: float = 0.2
    min_warmup_calls: int = 10
    max_spread: float = 0.15  # (max - min) / median allowed before re-measuring (up to 3 attempts)
    min_sample_s: float = 0.005  # paired timings: each sample spans at least this long


@dataclass
class Timing:
    ms: float
    spread: float
    attempts: int


def time_fn(fn: Callable[[], Any], sync: Callable[[], None], policy: TimingPolicy) -> Timing:
    """Median ms per call after a time-based warm-up; re-measured (up to 3 times) while spread > max_spread."""
    t0, n = time.perf_counter(), 0
    while n < policy.min_warmup_calls or time.perf_counter() - t0 < policy.warmup_s:
        fn()
        n += 1
    sync()
    per_call = (time.perf_counter() - t0) / n
    inner = max(1, math.ceil(0.005 / max(per_call, 1e-7)))  # each sample spans >= 5 ms
    best: Timing | None = None
    for attempt in range(1, 4):
        samples = []
        for _ in range(policy.repeats):
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples.append((time.perf_counter() - t) / inner * 1e3)
        med = statistics.median(samples)
        spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
        if best is None or spread < best.spread:
            best = Timing(med, spread, attempt)
        if spread <= policy.max_spread:
            break
    assert best is not None
    return best


class Paired(NamedTuple):
    """One paired timing: `fn` and the reference at the same moments."""

    ms: float  # fn: median per-pair ratio x median reference
    ref_ms: float  # the reference: median of its samples
    spread: float  # (max - min) / median of the per-pair ratios: noise the pairing could not cancel


def time_paired(
    fn: Callable[[], Any], ref: Callable[[], Any], sync: Callable[[], None], policy: TimingPolicy
) -> Paired:
    """(ms of `fn`, ms of `ref` at the same moment, spread of their ratio): `policy.repeats` pairs of
    adjacent samples, in alternating order, after warming both up. The ms of `fn` is the median of the
    per-pair ratios times the median of `ref`, so a machine whose speed changes from one second to the
    next (a shared VM) moves both sides of each ratio together."""
    t0, n = time.perf_counter(), 0
    while n < policy.min_warmup_calls or time.perf_counter() - t0 < policy.warmup_s:
        fn()
        ref()
        n += 1
    sync()
    per_call = (time.perf_counter() - t0) / (2 * n)
    inner = max(1, math.ceil(policy.min_sample_s / max(per_call, 1e-7)))

    def sample(f) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(inner):
            f()
        sync()
        return (time.perf_counter() - t) / inner * 1e3

    ratios, refs = [], []
    for k in range(policy.repeats):
        if k % 2:
            a, b = sample(fn), sample(ref)
        else:
            b, a = sample(ref), sample(fn)
        ratios.append(a / b)
        refs.append(b)
    r, q = statistics.median(refs), statistics.median(ratios)
    return Paired(q * r, r, (max(ratios) - min(ratios)) / q if q > 0 else 0.0)


def cache_kw(model) -> str:
    """The forward keyword for the KV cache (transformers renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Runner:
    """Builds the timed callables of one regime for a model on `device`."""

    def __init__(self, model, regime: Regime, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        self.regime, self.device = regime, device
        self.x = torch.randint(0, vocab, (regime.batch, regime.seq_len), generator=g).to(
            device
        )  # (B, S or 1)
        self.ctx = torch.randint(0, vocab, (regime.batch, regime.kv_len or 1), generator=g).to(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model_fn(self, model) -> Callable[[], Any]:
        if self.regime.graphs:
            return self._graphed(model)
        if self.regime.phase == "prefill":
            return lambda: model(input_ids=self.x, use_cache=False)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        kw = cache_kw(model)
        model(input_ids=self.ctx, use_cache=True, **{kw: cache})
        n = self.x.shape[1]

        def step():
            out = model(input_ids=self.x, use_cache=True, **{kw: cache})
            cache.crop(-n)
            return out

        return step

    def _graphed(self, model) -> Callable[[], Any]:
        """One forward captured in a CUDA graph, returned as its replay (eager decode is launch-bound and
        hides width). Decode uses a StaticCache prefilled with kv_len tokens; every replay writes the same
        slot, so the cache never grows."""
        from transformers import StaticCache

        kw = cache_kw(model)
        if self.regime.phase == "prefill":

            def step():
                return model(input_ids=self.x, use_cache=False)
        else:
            kv = self.ctx.shape[1]
            cache = StaticCache(config=model.config, max_cache_len=kv + self.x.shape[1])
            model(
                input_ids=self.ctx,
                use_cache=True,
                cache_position=torch.arange(kv, device=self.device),
                **{kw: cache},
            )
            pos = torch.arange(kv, kv + self.x.shape[1], device=self.device)

            def step():
                return model(input_ids=self.x, use_cache=True, cache_position=pos, **{kw: cache})

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs requires
            for _ in range(3):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay

    def fixed_fn(self, model, arch) -> Callable[[], Any]:
        """Embeddings + final norm + LM head on this regime's tokens (the part no width changes)."""
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        norm = model.get_submodule(arch.layers.rsplit(".", 1)[0] + ".norm")
        return lambda: head(norm(embed(self.x)))
