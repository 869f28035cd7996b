"""`flex profile`: measure the latency table of an elastic checkpoint on this device.

Every entry is timed in full-size context: the whole model physically sliced to one uniform (MLP
width, heads) configuration, minus the fixed part (embeddings, final norm, LM head), divided by the
number of layers. Time-based warm-up, median of repeats, randomized order, re-measurement of noisy
entries. `validate` measures random per-layer configurations end to end against the prediction.
"""

from __future__ import annotations

import inspect
import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import UsageError
from .latency import LatencyTable, Regime, save_table
from .progress import Reporter
from .slicing import sliced_model
from .spec import Config, ElasticSpec, config_to_json


@dataclass
class ProfileOptions:
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    seq_len: int = 128
    phase: str = "prefill"  # prefill | decode
    kv_len: int | None = None  # decode: cached tokens (default seq_len)
    repeats: int = 7
    warmup_s: float = 0.2
    min_warmup_calls: int = 10
    max_spread: float | None = None  # default 0.15 on CPU, 0.05 on GPU
    correct: int = 0  # random configurations for the per-regime scale correction
    validate: int = 0  # random configurations for the validation report
    seed: int = 0
    fit: str = "bilinear"  # bilinear (least-squares smoothing of the joint table) | none
    cuda_graphs: bool = False  # time under CUDA graphs (GPU only; recommended for decode)


@dataclass
class Timing:
    ms: float
    spread: float
    attempts: int


def time_fn(fn: Callable[[], Any], sync: Callable[[], None], o: ProfileOptions, max_spread: float) -> Timing:
    """Median ms per call after a time-based warm-up; re-measured (up to 3 times) while spread > max_spread."""
    t0, n = time.perf_counter(), 0
    while n < o.min_warmup_calls or time.perf_counter() - t0 < o.warmup_s:
        fn()
        n += 1
    sync()
    per_call = (time.perf_counter() - t0) / n
    inner = max(1, math.ceil(0.005 / max(per_call, 1e-7)))  # each sample spans >= 5 ms
    best: Timing | None = None
    for attempt in range(1, 4):
        samples = []
        for _ in range(o.repeats):
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
        if spread <= max_spread:
            break
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{torch.get_num_threads()}"


def _cache_kw(model) -> str:
    """The forward keyword for the KV cache (transformers renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Runner:
    """Builds the timed callables for one regime (prefill: a forward over (B, S); decode: one token
    after a KV cache of kv_len tokens, cropped back after every call)."""

    def __init__(self, model, o: ProfileOptions, device: torch.device):
        g = torch.Generator().manual_seed(o.seed)
        vocab = model.config.vocab_size
        self.o, self.device = o, device
        self.x = torch.randint(0, vocab, (o.batch, o.seq_len if o.phase == "prefill" else 1), generator=g).to(device)
        self.ctx = torch.randint(0, vocab, (o.batch, o.kv_len or 1), generator=g).to(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model_fn(self, model) -> Callable[[], Any]:
        if self.o.cuda_graphs:
            return self._graphed(model)
        if self.o.phase == "prefill":
            return lambda: model(input_ids=self.x, use_cache=False)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        kw = _cache_kw(model)
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

        kw = _cache_kw(model)
        if self.o.phase == "prefill":
            def step():
                return model(input_ids=self.x, use_cache=False)
        else:
            kv = self.ctx.shape[1]
            cache = StaticCache(config=model.config, max_cache_len=kv + self.x.shape[1])
            model(input_ids=self.ctx, use_cache=True, cache_position=torch.arange(kv, device=self.device),
                  **{kw: cache})
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


@dataclass
class ProfileResult:
    elastic: str
    regime: str
    fixed_ms: float
    full_ms: float
    smallest_ms: float
    entries: int
    max_spread: float
    scale: float
    seconds: float
    table: list[dict[str, Any]] = field(default_factory=list)  # uniform entries, layer 0
    validation: dict[str, Any] | None = None


def smooth_bilinear(raw: list[list[float]], mlp: list[int], heads: list[int]) -> list[list[float]]:
    """Least-squares fit entry(m, h) = a + b*m + c*h + d*m*h over the joint table.

    MLP cost is linear in its width and attention cost in its head count (weights streamed at small M,
    FLOPs at large M), so the fit removes timing noise without bending the physics; the raw entries
    are kept in the header.
    """
    rows, ys = [], []
    for i, m in enumerate(mlp):
        for j, h in enumerate(heads):
            rows.append([1.0, m / mlp[0], h / heads[0], (m / mlp[0]) * (h / heads[0])])
            ys.append(raw[i][j])
    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(a, y).solution
    fit = (a @ coef).squeeze(1).tolist()
    return [fit[i * len(heads):(i + 1) * len(heads)] for i in range(len(mlp))]


def random_configs(spec: ElasticSpec, n: int, seed: int) -> list[Config]:
    rng = random.Random(seed)
    return [[(rng.choice(lc.mlp), rng.choice(lc.heads)) for lc in spec.layers] for _ in range(n)]


def validation_stats(pred: list[float], meas: list[float]) -> dict[str, Any]:
    """Errors are pred/measured - 1: signed mean, p90 of |err|, share within +-10%."""
    errs = [p / m - 1 for p, m in zip(pred, meas)]
    abs_sorted = sorted(abs(e) for e in errs)
    p90 = abs_sorted[min(len(errs) - 1, math.ceil(0.9 * len(errs)) - 1)]
    return {"n": len(errs), "within_10pct": sum(abs(e) <= 0.10 for e in errs) / len(errs),
            "within_5pct": sum(abs(e) <= 0.05 for e in errs) / len(errs), "p90_abs_err": p90,
            "mean_signed_err": sum(errs) / len(errs), "max_abs_err": abs_sorted[-1]}


@dataclass
class Session:
    """One elastic checkpoint loaded for timing in one regime."""
    model: Any
    arch: Any
    spec: ElasticSpec
    regime: Regime
    runner: Runner
    o: ProfileOptions
    max_spread: float

    def time(self, cfg: Config) -> float:
        """End-to-end ms of the model physically sliced to `cfg` (median of repeats)."""
        sub = sliced_model(self.model, self.arch, self.spec, cfg)
        try:
            return time_fn(self.runner.model_fn(sub), self.runner.sync, self.o, self.max_spread).ms
        finally:
            del sub

    def measure(self, cfgs: list[Config], what: str, rep: Reporter, refs: list[float] | None = None) -> list[float]:
        """End-to-end ms per configuration; with `refs`, also the full model timed just before each."""
        full_fn = self.runner.model_fn(sliced_model(self.model, self.arch, self.spec, self.spec.full())) \
            if refs is not None else None
        out = []
        with rep.task(what, total=len(cfgs)) as task:
            for cfg in cfgs:
                if full_fn is not None:
                    refs.append(time_fn(full_fn, self.runner.sync, self.o, self.max_spread).ms)
                out.append(self.time(cfg))
                task.advance(1)
        return out


def open_session(path: Path, o: ProfileOptions) -> Session:
    """Validate the options and load ELASTIC on the regime's device and dtype (inference only)."""
    from transformers import AutoModelForCausalLM

    from .arch import all_architectures
    from .convert import resolve_device
    from .elastic import read_manifest

    manifest = read_manifest(path)
    if "spec" not in manifest:
        raise UsageError(f"{path}/flex_elastic.json has no elastic spec; run `flex convert` again")
    spec = ElasticSpec.from_dict(manifest["spec"])
    arch = next(a for a in all_architectures() if a.family == spec.family)
    _check_options(o, spec)
    device = resolve_device(o.device)
    if device.type == "cpu" and o.dtype == "float16":
        raise UsageError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    kv = (o.kv_len if o.kv_len is not None else o.seq_len) if o.phase == "decode" else 0
    o.kv_len = kv
    max_spread = o.max_spread if o.max_spread is not None else (0.05 if device.type == "cuda" else 0.15)
    if o.cuda_graphs and device.type != "cuda":
        raise UsageError("--cuda-graphs needs --device cuda")
    regime = Regime(device.type, device_name(device), o.dtype, o.batch, o.seq_len if o.phase == "prefill" else 1,
                    o.phase, kv, o.cuda_graphs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, o.dtype), local_files_only=True,
                                                 trust_remote_code=False).to(device).eval()
    return Session(model, arch, spec, regime, Runner(model, o, device), o, max_spread)


@torch.inference_mode()
def measure_configs(path: Path, cfgs: list[Config], o: ProfileOptions, reporter: Reporter | None = None,
                    with_full: bool = False) -> tuple[list[float], list[float]]:
    """(end-to-end ms per configuration, full-model ms timed just before each when `with_full`) of
    ELASTIC sliced to each configuration, in the regime `o` describes."""
    sess = open_session(path, o)
    refs: list[float] | None = [] if with_full else None
    meas = sess.measure(cfgs, f"timing {len(cfgs)} configurations", reporter or Reporter(), refs)
    return meas, refs or []


def profile(path: Path, o: ProfileOptions, reporter: Reporter | None = None) -> ProfileResult:
    """Measure (and store in ELASTIC/flex_latency.json) the latency table of one regime."""
    rep = reporter or Reporter()
    t_start = time.time()
    with torch.inference_mode():
        sess = open_session(path, o)
        model, arch, spec, regime, runner = sess.model, sess.arch, sess.spec, sess.regime, sess.runner
        max_spread = sess.max_spread
        L = spec.dims.num_layers
        mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
        combos = [(m, h) for m in mlp for h in heads]
        random.Random(o.seed).shuffle(combos)
        timings: dict[tuple[int, int], Timing] = {}
        with rep.task("fixed part (embeddings, norm, LM head)"):
            fixed = time_fn(runner.fixed_fn(model, arch), runner.sync, o, max_spread)
        with rep.task(f"latency table ({len(combos)} entries)", total=len(combos)) as task:
            for m, h in combos:
                sub = sliced_model(model, arch, spec, [(m, h)] * L)
                timings[(m, h)] = time_fn(runner.model_fn(sub), runner.sync, o, max_spread)
                del sub
                task.advance(1)
        raw = [[(timings[(m, h)].ms - fixed.ms) / L for h in heads] for m in mlp]
        spread = [[timings[(m, h)].spread for h in heads] for m in mlp]
        ms = smooth_bilinear(raw, mlp, heads) if o.fit == "bilinear" else raw
        header = {"flexcli": __version__, "torch": torch.__version__, "triton": _triton_version(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": torch.get_num_threads(),
                  "warmup_s": o.warmup_s, "min_warmup_calls": o.min_warmup_calls, "repeats": o.repeats,
                  "max_spread_allowed": max_spread, "max_spread": max(max(r) for r in spread),
                  "fixed_spread": fixed.spread, "method": "uniform whole-model stacks minus fixed part, per layer",
                  "fit": o.fit, "raw_ms": raw}
        table = LatencyTable(regime, header, fixed.ms, [list(mlp)] * L, [list(heads)] * L, [ms] * L, [spread] * L)

        # End-to-end timings rescaled to the machine's speed at table time: each divided by the full model's
        # timing just before it (`refs`), times the table's full model.
        full_pred = table.predict(spec.full(), corrected=False)

        def at_table_speed(meas: list[float], refs: list[float]) -> list[float]:
            return [m * full_pred / r for m, r in zip(meas, refs)]

        if o.correct:
            # Fitted at table speed, so a slow or fast spell while these few run does not become a permanent
            # bias: the scale corrects only what the additive model gets wrong.
            cfgs = random_configs(spec, o.correct, o.seed + 1)
            refs: list[float] = []
            meas = sess.measure(cfgs, f"correction ({o.correct} configurations)", rep, refs)
            pred = [table.predict(c, corrected=False) for c in cfgs]
            norm = at_table_speed(meas, refs)
            table.scale = sum(p * m for p, m in zip(pred, norm)) / sum(p * p for p in pred)
            table.header["correction"] = {
                "n": o.correct, "scale": table.scale,
                "configs": [{"config": config_to_json(c), "measured_ms": m, "full_model_ms_before": r}
                            for c, m, r in zip(cfgs, meas, refs)]}
        if o.validate:
            cfgs = random_configs(spec, o.validate, o.seed + 2)
            refs = []
            meas = sess.measure(cfgs, f"validation ({o.validate} configurations)", rep, refs)
            pred = [table.predict(c) for c in cfgs]
            # The same errors at table speed (against the uncorrected table): separates the latency
            # model's error from the machine drifting while it is measured.
            norm = at_table_speed(meas, refs)
            table.validation = {**validation_stats(pred, meas), "regime": regime.key,
                                "reference_drift": max(refs) / min(refs) - 1,
                                "drift_normalized": validation_stats([table.predict(c, corrected=False) for c in cfgs], norm),
                                "configs": [{"config": config_to_json(c), "predicted_ms": p, "measured_ms": m,
                                             "full_model_ms_before": r} for c, p, m, r in zip(cfgs, pred, meas, refs)]}
    save_table(path, table)
    uniform = [{"mlp": m, "heads": h, "layer_ms": ms[i][j], "spread": spread[i][j]}
               for i, m in enumerate(mlp) for j, h in enumerate(heads)]
    val = None
    if table.validation:
        val = {k: v for k, v in table.validation.items() if k != "configs"}
    return ProfileResult(str(path), regime.key, fixed.ms, table.full_ms(), table.smallest_ms(), len(combos),
                         table.header["max_spread"], table.scale, round(time.time() - t_start, 2), uniform, val)


def _check_options(o: ProfileOptions, spec: ElasticSpec) -> None:
    if o.phase not in ("prefill", "decode"):
        raise UsageError(f"--phase must be prefill or decode, got {o.phase!r}")
    if o.dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {o.dtype!r}")
    if o.batch < 1 or o.seq_len < 1 or o.repeats < 3 or o.warmup_s < 0 or (o.kv_len is not None and o.kv_len < 1):
        raise UsageError("--batch, --seq-len and --kv-len must be positive, --repeats at least 3, --warmup-s >= 0")
    if o.fit not in ("bilinear", "none"):
        raise UsageError(f"--fit must be bilinear or none, got {o.fit!r}")
    if o.validate < 0 or o.correct < 0:
        raise UsageError("--validate and --correct must be >= 0")
    if any(lc.mlp != spec.layers[0].mlp or lc.heads != spec.layers[0].heads for lc in spec.layers):
        raise UsageError("profile needs the same choice lists in every layer")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None
