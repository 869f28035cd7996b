"""Building a latency table: time an elastic checkpoint in one regime (method.md §2.5).

Every entry is timed in full-size context: the whole model physically sliced to one uniform (MLP
width, heads) configuration, minus the fixed part (embeddings, final norm, LM head), divided by the
number of layers. Entries are timed in a seeded random order; the joint table is least-squares
smoothed; an optional scale is fitted on a few random per-layer configurations, and a validation
measures others end to end against the prediction. End-to-end timings carry the full model's timing
just before each, so a machine that drifts while they run can be told apart from the model's error.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..arch.family import Architecture, by_family
from ..arch.spec import Config, ElasticSpec, config_to_json
from ..device import device_name, resolve_device
from ..elastic.slicing import sliced_model
from ..errors import UsageError
from ..io import layout
from ..progress import Reporter
from .table import LatencyTable, Regime
from .timing import Runner, Timing, TimingPolicy, time_fn

PHASES = ("prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")
FITS = ("bilinear", "none")


@dataclass(kw_only=True)
class ProfileOptions:
    """The regime to measure (device, dtype, batch, tokens, phase) and how carefully."""

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    seq_len: int = 128  # prefill: tokens per sequence
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

    def check(self) -> None:
        """Raise a one-line UsageError for values out of range."""
        if self.phase not in PHASES:
            raise UsageError(f"phase must be prefill or decode, got {self.phase!r}", option="phase")
        if self.dtype not in DTYPES:
            raise UsageError(
                f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}", option="dtype"
            )
        for name in ("batch", "seq_len", "kv_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"must be positive, got {value}", option=name)
        if self.repeats < 3:
            raise UsageError(f"at least 3 timed repeats are needed, got {self.repeats}", option="repeats")
        if self.warmup_s < 0:
            raise UsageError("warm-up time must be >= 0", option="warmup_s")
        if self.fit not in FITS:
            raise UsageError(f"fit must be bilinear or none, got {self.fit!r}", option="fit")
        for name in ("validate", "correct"):
            if getattr(self, name) < 0:
                raise UsageError("the number of configurations must be >= 0", option=name)


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
    return [fit[i * len(heads) : (i + 1) * len(heads)] for i in range(len(mlp))]


def random_configs(spec: ElasticSpec, n: int, seed: int) -> list[Config]:
    rng = random.Random(seed)
    return [spec.sample(rng.randrange) for _ in range(n)]


def validation_stats(pred: list[float], meas: list[float]) -> dict[str, Any]:
    """Errors are pred/measured - 1: signed mean, p90 of |err|, share within +-10%."""
    errs = [p / m - 1 for p, m in zip(pred, meas)]
    abs_sorted = sorted(abs(e) for e in errs)
    p90 = abs_sorted[min(len(errs) - 1, math.ceil(0.9 * len(errs)) - 1)]
    return {
        "n": len(errs),
        "within_10pct": sum(abs(e) <= 0.10 for e in errs) / len(errs),
        "within_5pct": sum(abs(e) <= 0.05 for e in errs) / len(errs),
        "p90_abs_err": p90,
        "mean_signed_err": sum(errs) / len(errs),
        "max_abs_err": abs_sorted[-1],
    }


@dataclass
class Session:
    """One elastic checkpoint loaded for timing in one regime."""

    model: Any
    arch: Architecture
    spec: ElasticSpec
    regime: Regime
    runner: Runner
    policy: TimingPolicy
    o: ProfileOptions

    def timing(self, fn) -> Timing:
        return time_fn(fn, self.runner.sync, self.policy)

    def time(self, cfg: Config) -> Timing:
        """End-to-end timing of the model physically sliced to `cfg`."""
        sub = sliced_model(self.model, self.arch, self.spec, cfg)
        try:
            return self.timing(self.runner.model_fn(sub))
        finally:
            del sub

    def measure(
        self, cfgs: list[Config], what: str, rep: Reporter, refs: list[float] | None = None
    ) -> list[float]:
        """End-to-end ms per configuration; with `refs`, also the full model timed just before each."""
        full_fn = (
            self.runner.model_fn(sliced_model(self.model, self.arch, self.spec, self.spec.full()))
            if refs is not None
            else None
        )
        out = []
        with rep.task(what, total=len(cfgs)) as task:
            for cfg in cfgs:
                if full_fn is not None:
                    refs.append(self.timing(full_fn).ms)  # type: ignore[union-attr]
                out.append(self.time(cfg).ms)
                task.advance(1)
        return out


def open_session(path: Path, o: ProfileOptions) -> Session:
    """Validate the options and load ELASTIC on the regime's device and dtype (inference only)."""
    from transformers import AutoModelForCausalLM

    spec = layout.read_spec(path)
    arch = by_family(spec.family)
    o.check()
    if any(lc.mlp != spec.layers[0].mlp or lc.heads != spec.layers[0].heads for lc in spec.layers):
        raise UsageError("profiling needs the same choice lists in every layer")
    device = resolve_device(o.device)
    if device.type == "cpu" and o.dtype == "float16":
        raise UsageError("float16 is not supported on CPU; use float32 or bfloat16", option="dtype")
    if o.cuda_graphs and device.type != "cuda":
        raise UsageError("CUDA graphs need the cuda device", option="cuda_graphs")
    kv = (o.kv_len if o.kv_len is not None else o.seq_len) if o.phase == "decode" else 0
    regime = Regime(
        device.type,
        device_name(device),
        o.dtype,
        o.batch,
        o.seq_len if o.phase == "prefill" else 1,
        o.phase,
        kv,
        o.cuda_graphs,
    )
    max_spread = o.max_spread if o.max_spread is not None else (0.05 if device.type == "cuda" else 0.15)
    policy = TimingPolicy(o.repeats, o.warmup_s, o.min_warmup_calls, max_spread)
    model = (
        AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, o.dtype), local_files_only=True, trust_remote_code=False
        )
        .to(device)
        .eval()
    )
    return Session(model, arch, spec, regime, Runner(model, regime, device, o.seed), policy, o)


@torch.inference_mode()
def measure_configs(
    path: Path,
    cfgs: list[Config],
    o: ProfileOptions,
    reporter: Reporter | None = None,
    with_full: bool = False,
) -> tuple[list[float], list[float]]:
    """(end-to-end ms per configuration, full-model ms timed just before each when `with_full`) of
    ELASTIC sliced to each configuration, in the regime `o` describes."""
    sess = open_session(path, o)
    refs: list[float] | None = [] if with_full else None
    meas = sess.measure(cfgs, f"timing {len(cfgs)} configurations", reporter or Reporter(), refs)
    return meas, refs or []


@dataclass
class TableEntry:
    """One uniform (MLP width, heads) entry of the table, per layer."""

    mlp: int
    heads: int
    layer_ms: float
    spread: float


def measure_table(sess: Session, rep: Reporter) -> tuple[LatencyTable, list[TableEntry]]:
    """Time the fixed part and every uniform (MLP, heads) entry; the table (smoothed per `fit`)."""
    spec, o, L = sess.spec, sess.o, sess.spec.dims.num_layers
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    combos = [(m, h) for m in mlp for h in heads]
    random.Random(o.seed).shuffle(combos)
    with rep.task("fixed part (embeddings, norm, LM head)"):
        fixed = sess.timing(sess.runner.fixed_fn(sess.model, sess.arch))
    timings: dict[tuple[int, int], Timing] = {}
    with rep.task(f"latency table ({len(combos)} entries)", total=len(combos)) as task:
        for m, h in combos:
            timings[(m, h)] = sess.time([(m, h)] * L)
            task.advance(1)
    raw = [[(timings[(m, h)].ms - fixed.ms) / L for h in heads] for m in mlp]
    spread = [[timings[(m, h)].spread for h in heads] for m in mlp]
    ms = smooth_bilinear(raw, mlp, heads) if o.fit == "bilinear" else raw
    header = {
        "flexcli": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": torch.get_num_threads(),
        "warmup_s": o.warmup_s,
        "min_warmup_calls": o.min_warmup_calls,
        "repeats": o.repeats,
        "max_spread_allowed": sess.policy.max_spread,
        "max_spread": max(max(r) for r in spread),
        "fixed_spread": fixed.spread,
        "method": "uniform whole-model stacks minus fixed part, per layer",
        "fit": o.fit,
        "raw_ms": raw,
    }
    table = LatencyTable(
        sess.regime, header, fixed.ms, [list(mlp)] * L, [list(heads)] * L, [ms] * L, [spread] * L
    )
    entries = [
        TableEntry(m, h, ms[i][j], spread[i][j]) for i, m in enumerate(mlp) for j, h in enumerate(heads)
    ]
    return table, entries


def at_table_speed(
    table: LatencyTable, spec: ElasticSpec, meas: list[float], refs: list[float]
) -> list[float]:
    """End-to-end timings rescaled to the machine's speed at table time: each divided by the full model's
    timing just before it (`refs`), times the table's full model."""
    full_pred = table.predict(spec.full(), corrected=False)
    return [m * full_pred / r for m, r in zip(meas, refs)]


def fit_correction(sess: Session, table: LatencyTable, n: int, rep: Reporter) -> None:
    """Fit table.scale on `n` random configurations at table speed, so a slow or fast spell while these
    few run does not become a permanent bias: the scale corrects only what the additive model gets wrong."""
    cfgs = random_configs(sess.spec, n, sess.o.seed + 1)
    refs: list[float] = []
    meas = sess.measure(cfgs, f"correction ({n} configurations)", rep, refs)
    pred = [table.predict(c, corrected=False) for c in cfgs]
    norm = at_table_speed(table, sess.spec, meas, refs)
    table.scale = sum(p * m for p, m in zip(pred, norm)) / sum(p * p for p in pred)
    table.header["correction"] = {
        "n": n,
        "scale": table.scale,
        "configs": [
            {"config": config_to_json(c), "measured_ms": m, "full_model_ms_before": r}
            for c, m, r in zip(cfgs, meas, refs)
        ],
    }


def validate_table(sess: Session, table: LatencyTable, n: int, rep: Reporter) -> None:
    """Measure `n` random configurations end to end against the prediction into table.validation; the same
    errors at table speed (against the uncorrected table) separate the model's error from drift."""
    cfgs = random_configs(sess.spec, n, sess.o.seed + 2)
    refs: list[float] = []
    meas = sess.measure(cfgs, f"validation ({n} configurations)", rep, refs)
    pred = [table.predict(c) for c in cfgs]
    norm = at_table_speed(table, sess.spec, meas, refs)
    table.validation = {
        **validation_stats(pred, meas),
        "regime": sess.regime.key,
        "reference_drift": max(refs) / min(refs) - 1,
        "drift_normalized": validation_stats([table.predict(c, corrected=False) for c in cfgs], norm),
        "configs": [
            {"config": config_to_json(c), "predicted_ms": p, "measured_ms": m, "full_model_ms_before": r}
            for c, p, m, r in zip(cfgs, pred, meas, refs)
        ],
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None
