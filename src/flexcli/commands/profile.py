"""`flex profile`: measure the latency table of an elastic checkpoint in one regime and runtime (PyTorch
on this device, or llama.cpp on this CPU); a table that fails its own checks is not written. llama.cpp
with several GGUF types (--gguf-type q4_0,q8_0,f16) measures one table per type, one after another:
a type's weights change every entry (bytes read per step), so no type is derived from another."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..latency.profile import (
    NoisyTable,
    ProfileOptions,
    TableEntry,
    fit_correction,
    measure_table,
    open_session,
    problems,
    refusal,
    validate_table,
)
from ..latency.table import save_table
from ..progress import Reporter

__all__ = ["NoisyTable", "ProfileOptions", "ProfileResult", "ProfileRuns", "profile", "profile_types"]


@dataclass
class ValidationStats:
    """Predicted vs measured end to end over random per-layer configurations (errors: pred/measured - 1)."""

    n: int
    within_10pct: float
    within_5pct: float
    p90_abs_err: float
    mean_signed_err: float
    max_abs_err: float


@dataclass
class Validation(ValidationStats):
    regime: str
    reference_drift: float  # max/min - 1 of the full model re-timed before each configuration
    drift_normalized: ValidationStats  # the same errors at the machine's speed when the table was made


@dataclass
class ProfileResult:
    elastic: str
    regime: str
    runtime: str
    fixed_ms: float
    full_ms: float
    smallest_ms: float
    entries: int
    max_spread: float
    noise: float  # median spread of an entry between rounds (drift-normalized)
    reference_drift: float  # max/min - 1 of the full model's timings over the whole table
    scale: float
    seconds: float
    table: list[TableEntry] = field(default_factory=list)  # uniform entries, layer 0
    validation: Validation | None = None  # flex_latency.json's validation, without the configurations
    problems: list[str] = field(default_factory=list)  # checks it failed (written only with accept_noisy)


@dataclass
class ProfileRuns:
    """One table per GGUF type (`--gguf-type a,b,...`), in the order given."""

    tables: list[ProfileResult]


def profile_types(
    elastic: Path, options: ProfileOptions, reporter: Reporter | None = None
) -> ProfileResult | ProfileRuns:
    """`profile` once per type of a comma-separated --gguf-type (llama.cpp); one type: its result. A
    table refused as noisy stops the run; the tables measured before it are kept, and the error says so."""
    from dataclasses import replace

    from ..runtimes.quant import parse_types

    if options.runtime != "llama.cpp" or "," not in options.gguf_type:
        return profile(elastic, options, reporter)
    types = [t.text for t in parse_types(options.gguf_type)]
    done: list[ProfileResult] = []
    for t in types:
        try:
            done.append(profile(elastic, replace(options, gguf_type=t), reporter))
        except NoisyTable as e:
            kept = f" (kept: the {', '.join(r.regime for r in done)} tables)" if done else ""
            raise NoisyTable(f"{t}: {e}{kept}") from None
    return ProfileRuns(done)


def profile(elastic: Path, options: ProfileOptions, reporter: Reporter | None = None) -> ProfileResult:
    """Measure (and, when it passes its checks, store in ELASTIC/flex_latency.json) one regime's table."""
    rep = reporter or Reporter()
    t0 = time.time()
    with torch.inference_mode():
        sess = open_session(elastic, options)
        try:
            table, entries = measure_table(sess, rep)
            if options.correct:
                fit_correction(sess, table, options.correct, rep)
            if options.validate:
                validate_table(sess, table, options.validate, rep)
        finally:
            sess.close()
    found = problems(table, options)
    table.header["problems"] = found
    if found and not options.accept_noisy:
        raise refusal(found)
    for p in found:
        rep.warn(f"noisy table written (--accept-noisy): {p}")
    save_table(elastic, table)
    val = None
    if table.validation:
        v = {k: x for k, x in table.validation.items() if k != "configs"}
        val = Validation(**{**v, "drift_normalized": ValidationStats(**v["drift_normalized"])})
    c = table.header["checks"]
    return ProfileResult(
        str(elastic),
        table.regime.key,
        table.header["runtime"],
        table.fixed_ms,
        table.full_ms(),
        table.smallest_ms(),
        len(entries),
        table.header["max_spread"],
        c["noise_median"],
        c["reference_drift"],
        table.scale,
        round(time.time() - t0, 2),
        entries,
        val,
        found,
    )
