"""Building a latency table: time an elastic checkpoint in one regime and runtime (method.md §2.5).

Every entry is timed in full-size context: the whole model sliced to one uniform (MLP width, heads)
configuration, minus the fixed part (embeddings, final norm, LM head), divided by the number of layers.

A table is only as good as the machine was quiet, so it is measured to be checked:

- **Interleaved rounds.** Every entry is timed in each of `rounds` rounds, in a fresh seeded order, and
  each timing alternates samples of the entry with samples of the full model (the reference,
  latency.timing.time_paired). Each timing is rescaled by its reference to the run's median reference
  speed, so a machine whose speed changes from one second to the next moves the reference and the
  entry together; the entry is the median over rounds and its noise their spread.
- **Smoothing and monotonicity.** The joint table is least-squares smoothed (bilinear in width and
  heads); a narrower configuration is never predicted slower than a wider one (the table is projected
  onto monotone), and raw entries that are slower than a wider neighbour by more than their noise are
  counted as evidence of a noisy run.
- **Correction and validation.** A per-regime scale is fitted on `correct` random per-layer
  configurations (per-layer entries come from uniform models, which can mis-predict mixed ones), and
  `validate` others are measured end to end against the prediction, each in pairs with the reference.
- **Refusal.** A table whose rounds disagree, whose raw entries are not monotone beyond noise, whose
  smallest configuration is not faster than the full model, or which fails its own validation is not
  written (exit 1 with the numbers), unless `accept_noisy`. A machine too noisy to ever pass is refused
  after the first round: when the entries' paired timings already vary by a median of more than
  `EARLY_STOP` x the noise limit, the remaining rounds, correction and validation are not run.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..arch.spec import Config, ElasticSpec, config_to_json
from ..errors import RuntimeFailure, UsageError
from ..io import layout
from ..progress import Reporter
from .table import LatencyTable
from .timing import Paired, Timing, TimingPolicy, time_fn, time_paired

PHASES = ("prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")
FITS = ("bilinear", "none")
# Refuse after round 1 when its paired timings (the spread of each timing's entry/reference ratios) vary
# by a median of more than this many times the noise limit. Measured on the hidden-512 x 8-layer model
# (M = 1, 2-core VM): 19-21% on a quiet machine (its rounds then agreed within 3-4%), 206-371% with two
# CPU hogs running (rounds 22% apart, refused): 10 x the default 10% limit sits well between the two.
EARLY_STOP = 10.0


@dataclass(kw_only=True)
class ProfileOptions:
    """The regime to measure (runtime, device, dtype, batch, tokens, phase) and how carefully."""

    runtime: str = "torch"  # torch (transformers) | llama.cpp (llama-cpp-python)
    device: str = "cpu"
    dtype: str = "float32"  # torch
    gguf_type: str = "f16"  # llama.cpp: type of the timed GGUF files, WEIGHTS[/EMBED] (runtimes.quant)
    threads: int | None = None  # llama.cpp: threads (default: the CPUs this process may use)
    batch: int = 1
    seq_len: int = 128  # prefill: tokens per sequence
    phase: str = "prefill"  # prefill | decode
    kv_len: int | None = None  # decode: cached tokens (default seq_len)
    repeats: int = 7  # pairs of adjacent samples (entry, reference) per timing
    rounds: int = 3  # interleaved rounds per entry (median of drift-normalized timings)
    warmup_s: float = 0.1
    min_warmup_calls: int = 5
    max_spread: float | None = None  # within one timing; default 0.15 on CPU, 0.05 on GPU
    max_noise: float = 0.10  # median spread of an entry between rounds allowed
    min_within: float = 0.9  # validation: share within +-10% (drift-normalized) required
    accept_noisy: bool = False  # write a table that fails its checks (they are kept in its header)
    correct: int = 8  # random configurations for the per-regime scale correction
    validate: int = 0  # random configurations for the validation report
    seed: int = 0
    fit: str = "bilinear"  # bilinear (least-squares smoothing of the joint table) | none
    cuda_graphs: bool = False  # time under CUDA graphs (GPU only; recommended for decode)

    def check(self) -> None:
        """Raise a one-line UsageError for values out of range."""
        from .. import runtimes

        runtimes.get(self.runtime)
        if self.phase not in PHASES:
            raise UsageError(f"phase must be prefill or decode, got {self.phase!r}", option="phase")
        if self.dtype not in DTYPES:
            raise UsageError(
                f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}", option="dtype"
            )
        for name in ("batch", "seq_len", "kv_len", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"must be positive, got {value}", option=name)
        if self.repeats < 3:
            raise UsageError(f"at least 3 timed repeats are needed, got {self.repeats}", option="repeats")
        if self.rounds < 2:
            raise UsageError(f"at least 2 rounds are needed to see noise, got {self.rounds}", option="rounds")
        if self.warmup_s < 0:
            raise UsageError("warm-up time must be >= 0", option="warmup_s")
        if self.fit not in FITS:
            raise UsageError(f"fit must be bilinear or none, got {self.fit!r}", option="fit")
        for name in ("validate", "correct"):
            if getattr(self, name) < 0:
                raise UsageError("the number of configurations must be >= 0", option=name)
        if not 0 <= self.min_within <= 1:
            raise UsageError("must be between 0 and 1", option="min_within")


class NoisyTable(RuntimeFailure):
    """The table failed its own checks and was not written."""


def refusal(found: list[str]) -> NoisyTable:
    """The one-line error for a table that failed the checks in `found` (short clauses)."""
    return NoisyTable(
        f"latency table not written: {'; '.join(found)}. Quiet the machine (nothing else running) or raise "
        f"--repeats / --rounds; --accept-noisy writes it anyway"
    )


def smooth_bilinear(raw: list[list[float]], mlp: list[int], heads: list[int]) -> list[list[float]]:
    """Least-squares fit entry(m, h) = a + b*m + c*h + d*m*h over the joint table.

    MLP cost is linear in its width and attention cost in its head count (weights streamed at small M,
    FLOPs at large M), so the fit removes timing noise without bending the physics; the raw entries
    are kept in the header.
    """
    import torch

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


def monotone(ms: list[list[float]]) -> list[list[float]]:
    """The smallest table >= `ms` in which no narrower entry exceeds a wider one. Indices run wide ->
    narrow in both MLP width (rows) and heads (columns), so each entry becomes the max over itself and
    every narrower entry."""
    out = [list(r) for r in ms]
    for i in reversed(range(len(out))):
        for j in reversed(range(len(out[0]))):
            below = out[i + 1][j] if i + 1 < len(out) else -math.inf
            right = out[i][j + 1] if j + 1 < len(out[0]) else -math.inf
            out[i][j] = max(out[i][j], below, right)
    return out


def monotone_violations(raw: list[list[float]], noise: list[list[float]]) -> int:
    """Adjacent pairs where the narrower raw entry is slower than the wider one by more than either's
    round-to-round noise (and 2% of the wider entry)."""
    n = 0
    for i in range(len(raw)):
        for j in range(len(raw[0])):
            for i2, j2 in ((i + 1, j), (i, j + 1)):
                if i2 < len(raw) and j2 < len(raw[0]):
                    wide, narrow = raw[i][j], raw[i2][j2]
                    tol = max(noise[i][j] * abs(wide), noise[i2][j2] * abs(narrow), 0.02 * abs(wide))
                    n += narrow - wide > tol
    return n


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
    """One elastic checkpoint opened for timing in one regime, through a runtime's backend (runtimes)."""

    backend: Any
    spec: ElasticSpec
    policy: TimingPolicy
    o: ProfileOptions
    _ref: Any = None  # the full model's timed callable, kept open for the whole run
    _ref_cm: Any = None

    @property
    def regime(self):
        return self.backend.regime

    def timing(self, fn) -> Timing:
        return time_fn(fn, self.backend.sync, self.policy)

    def _reference_fn(self):
        """The full model's timed callable, opened once and kept for the whole run."""
        if self._ref is None:
            self._ref_cm = self.backend.open(self.spec.full())
            self._ref = self._ref_cm.__enter__()
        return self._ref

    def paired(self, fn) -> Paired:
        """`fn` and the full model at the same moments: adjacent samples of both, alternating."""
        return time_paired(fn, self._reference_fn(), self.backend.sync, self.policy)

    def measure(
        self, cfgs: list[Config], what: str, rep: Reporter, refs: list[float] | None = None
    ) -> list[float]:
        """End-to-end ms per configuration; with `refs`, also the full model timed alongside each."""
        out = []
        with rep.task(what, total=len(cfgs)) as task:
            for cfg in cfgs:
                with self.backend.open(cfg) as fn:
                    if refs is None:
                        out.append(self.timing(fn).ms)
                    else:
                        p = self.paired(fn)
                        out.append(p.ms)
                        refs.append(p.ref_ms)
                if cfg != self.spec.full():
                    self.backend.forget(cfg)
                task.advance(1)
        return out

    def rounds(
        self, items: dict[Any, Callable[[], Any]], rep: Reporter, what: str
    ) -> tuple[dict[Any, float], dict[Any, float], list[float], float]:
        """Interleaved rounds: (median drift-normalized ms, round-to-round spread, reference timings, the
        first round's median paired-timing spread). Raises NoisyTable after the first round when it is
        already far too noisy (unless accept_noisy)."""
        rng = random.Random(self.o.seed)
        samples: dict[Any, list[Paired]] = {k: [] for k in items}
        with rep.task(what, total=len(items) * self.o.rounds) as task:
            for i in range(self.o.rounds):
                order = list(items)
                rng.shuffle(order)
                for k in order:
                    with items[k]() as fn:
                        samples[k].append(self.paired(fn))
                    task.advance(1)
                if i == 0:
                    first = statistics.median(v[0].spread for v in samples.values())
                    if not self.o.accept_noisy:
                        self._stop_if_hopeless(first, [v[0].ref_ms for v in samples.values()])
        refs = [p.ref_ms for v in samples.values() for p in v]
        ref_med = statistics.median(refs)
        med, noise = {}, {}
        for k, v in samples.items():
            norm = [p.ms * ref_med / p.ref_ms for p in v]
            med[k] = statistics.median(norm)
            noise[k] = (max(norm) - min(norm)) / med[k] if med[k] > 0 else 0.0
        return med, noise, refs, first

    def _stop_if_hopeless(self, spread: float, refs: list[float]) -> None:
        """Refuse now when the first round's paired timings vary by a median `spread` of more than
        EARLY_STOP x the noise limit: the rounds to come would be refused too, after many more minutes."""
        if spread > EARLY_STOP * self.o.max_noise:
            drift = max(refs) / min(refs) - 1
            raise refusal(
                [
                    f"entries varied by a median {spread:.0%} within the first round's paired timings "
                    f"(limit {self.o.max_noise:.0%}, stopped after round 1 of {self.o.rounds}; the reference "
                    f"drifted {drift:.0%})"
                ]
            )

    def close(self) -> None:
        if self._ref_cm is not None:
            self._ref_cm.__exit__(None, None, None)
            self._ref_cm = self._ref = None
        self.backend.close()


def open_session(path: Path, o: ProfileOptions) -> Session:
    """Validate the options and open ELASTIC in the runtime the options name."""
    from .. import runtimes

    spec = layout.read_spec(path)
    o.check()
    if any(lc.mlp != spec.layers[0].mlp or lc.heads != spec.layers[0].heads for lc in spec.layers):
        raise UsageError("profiling needs the same choice lists in every layer")
    backend = runtimes.get(o.runtime).backend(path, o)
    gpu = backend.regime.device == "cuda"
    max_spread = o.max_spread if o.max_spread is not None else (0.05 if gpu else 0.15)
    policy = TimingPolicy(o.repeats, o.warmup_s, o.min_warmup_calls, max_spread)
    return Session(backend, spec, policy, o)


def measure_configs(
    path: Path,
    cfgs: list[Config],
    o: ProfileOptions,
    reporter: Reporter | None = None,
    with_full: bool = False,
) -> tuple[list[float], list[float]]:
    """(end-to-end ms per configuration, full-model ms timed just before each when `with_full`) of
    ELASTIC sliced to each configuration, in the regime `o` describes."""
    import torch

    with torch.inference_mode():
        sess = open_session(path, o)
        try:
            refs: list[float] | None = [] if with_full else None
            meas = sess.measure(cfgs, f"timing {len(cfgs)} configurations", reporter or Reporter(), refs)
        finally:
            sess.close()
    return meas, refs or []


def regime_kw(r) -> dict[str, Any]:
    """The ProfileOptions fields of a regime's batch, tokens and phase."""
    kw: dict[str, Any] = {"batch": r.batch, "phase": r.phase, "seq_len": r.seq_len}
    if r.phase == "decode":
        kw.update(seq_len=max(r.kv_len, 1), kv_len=r.kv_len)
    return kw


def options_for(table: LatencyTable) -> ProfileOptions | None:
    """Profile options that reproduce `table`'s regime on this machine, or None when this machine cannot
    (another CPU or GPU, another thread count, the runtime not installed)."""
    from .. import runtimes

    return runtimes.get(table.regime.runtime).options_for(table)


@dataclass
class Alongside:
    """A model timed in a table's regime, with the table's full model timed alongside (same run)."""

    measured_ms: float
    reference_ms: float  # the full model, timed in the same pairs
    reference_drift: float  # reference_ms / the table's full model - 1: how much slower the machine is now
    at_table_speed_ms: float  # measured_ms rescaled to the machine's speed when the table was made


def time_alongside(sess: Session, table: LatencyTable, fn, repeats: int = 5) -> Alongside:
    """`repeats` paired timings of `fn` and the full model, against `table`: the medians of each side, and
    the median of the per-timing ratios at table speed (the ratio of the medians would let one slow spell
    on one side of one timing move it)."""
    pairs = [sess.paired(fn) for _ in range(repeats)]
    x = statistics.median(p.ms for p in pairs)
    r = statistics.median(p.ref_ms for p in pairs)
    q = statistics.median(p.ms / p.ref_ms for p in pairs)
    full = table.predict(sess.spec.full(), corrected=False)
    return Alongside(x, r, r / full - 1, q * full)


@dataclass
class TableEntry:
    """One uniform (MLP width, heads) entry of the table, per layer."""

    mlp: int
    heads: int
    layer_ms: float
    spread: float  # drift-normalized spread between rounds


def measure_table(sess: Session, rep: Reporter) -> tuple[LatencyTable, list[TableEntry]]:
    """Time the fixed part and every uniform (MLP, heads) entry in interleaved rounds; the table
    (smoothed per `fit`, made monotone) with its checks in the header."""
    spec, o, L = sess.spec, sess.o, sess.spec.dims.num_layers
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads

    def entry(m: int, h: int):
        return lambda: sess.backend.open([(m, h)] * L)

    items: dict[Any, Callable[[], Any]] = {("entry", m, h): entry(m, h) for m in mlp for h in heads}
    items.update(sess.backend.fixed_items())
    n = len(items)
    med, noise, refs, first = sess.rounds(items, rep, f"latency table ({n} timings x {o.rounds} rounds)")
    fixed = max(0.0, sess.backend.fixed_ms(med))
    raw = [[(med[("entry", m, h)] - fixed) / L for h in heads] for m in mlp]
    spread = [[noise[("entry", m, h)] for h in heads] for m in mlp]
    ms = monotone(smooth_bilinear(raw, mlp, heads) if o.fit == "bilinear" else raw)
    checks = {
        "rounds": o.rounds,
        "noise_median": statistics.median(noise.values()),
        "noise_limit": o.max_noise,
        "first_round_spread": first,  # median spread of round 1's paired timings (early refusal)
        "reference_drift": max(refs) / min(refs) - 1,
        "monotone_violations": monotone_violations(raw, spread),
        "raw_full_ms": med[("entry", mlp[0], heads[0])],
        "raw_smallest_ms": med[("entry", mlp[-1], heads[-1])],
    }
    header = {
        "flexcli": __version__,
        "runtime": sess.backend.name,
        **sess.backend.header,
        "triton": _triton_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warmup_s": o.warmup_s,
        "min_warmup_calls": o.min_warmup_calls,
        "repeats": o.repeats,
        "max_spread_allowed": sess.policy.max_spread,
        "max_spread": max(max(r) for r in spread),
        "fixed_spread": noise.get("fixed", 0.0),
        "method": "uniform whole-model stacks minus fixed part, per layer; interleaved rounds, drift-normalized",
        "fit": o.fit,
        "raw_ms": raw,
        "checks": checks,
    }
    table = LatencyTable(
        sess.regime, header, fixed, [list(mlp)] * L, [list(heads)] * L, [ms] * L, [spread] * L
    )
    entries = [
        TableEntry(m, h, ms[i][j], spread[i][j]) for i, m in enumerate(mlp) for j, h in enumerate(heads)
    ]
    return table, entries


def problems(table: LatencyTable, o: ProfileOptions) -> list[str]:
    """Why the table should not be trusted, as short clauses (empty: it passed its checks)."""
    c, out = table.header["checks"], []
    if c["noise_median"] > o.max_noise:
        out.append(
            f"entries varied by a median {c['noise_median']:.0%} between rounds (limit {o.max_noise:.0%}; "
            f"the reference drifted {c['reference_drift']:.0%})"
        )
    if c["monotone_violations"]:
        out.append(
            f"{c['monotone_violations']} narrower entries timed slower than a wider neighbour beyond noise"
        )
    if c["raw_smallest_ms"] >= c["raw_full_ms"]:
        out.append(
            f"the smallest configuration ({c['raw_smallest_ms']:.3f} ms) timed no faster than the full model "
            f"({c['raw_full_ms']:.3f} ms)"
        )
    v = table.validation
    if v and v["drift_normalized"]["within_10pct"] < o.min_within:
        out.append(
            f"validation: {v['drift_normalized']['within_10pct']:.0%} of {v['n']} configurations within ±10% "
            f"of the prediction (need {o.min_within:.0%}; mean error {v['drift_normalized']['mean_signed_err']:+.1%})"
        )
    return out


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
    errors with each timing rescaled to table speed (by the full model timed just before it) separate the
    latency model's error from the machine's drift, and are what the table is judged by."""
    cfgs = random_configs(sess.spec, n, sess.o.seed + 2)
    refs: list[float] = []
    meas = sess.measure(cfgs, f"validation ({n} configurations)", rep, refs)
    pred = [table.predict(c) for c in cfgs]
    norm = at_table_speed(table, sess.spec, meas, refs)
    table.validation = {
        **validation_stats(pred, meas),
        "regime": sess.regime.key,
        "reference_drift": max(refs) / min(refs) - 1,
        "drift_normalized": validation_stats(pred, norm),
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
