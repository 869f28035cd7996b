"""`flex profile`: measure the latency table of an elastic checkpoint in one regime on this device."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..latency.profile import (
    ProfileOptions,
    TableEntry,
    fit_correction,
    measure_table,
    open_session,
    validate_table,
)
from ..latency.table import save_table
from ..progress import Reporter

__all__ = ["ProfileOptions", "ProfileResult", "profile"]


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
    fixed_ms: float
    full_ms: float
    smallest_ms: float
    entries: int
    max_spread: float
    scale: float
    seconds: float
    table: list[TableEntry] = field(default_factory=list)  # uniform entries, layer 0
    validation: Validation | None = None  # flex_latency.json's validation, without the configurations


def profile(elastic: Path, options: ProfileOptions, reporter: Reporter | None = None) -> ProfileResult:
    """Measure (and store in ELASTIC/flex_latency.json) the latency table of one regime."""
    rep = reporter or Reporter()
    t0 = time.time()
    with torch.inference_mode():
        sess = open_session(elastic, options)
        table, entries = measure_table(sess, rep)
        if options.correct:
            fit_correction(sess, table, options.correct, rep)
        if options.validate:
            validate_table(sess, table, options.validate, rep)
    save_table(elastic, table)
    val = None
    if table.validation:
        v = {k: x for k, x in table.validation.items() if k != "configs"}
        val = Validation(**{**v, "drift_normalized": ValidationStats(**v["drift_normalized"])})
    return ProfileResult(
        str(elastic),
        table.regime.key,
        table.fixed_ms,
        table.full_ms(),
        table.smallest_ms(),
        len(entries),
        table.header["max_spread"],
        table.scale,
        round(time.time() - t0, 2),
        entries,
        val,
    )
