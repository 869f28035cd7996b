"""`flex profile`: measure the latency table of an elastic checkpoint in one regime on this device."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    validation: dict[str, Any] | None = None  # validation statistics (flex_latency.json's, without configs)


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
    val = {k: v for k, v in table.validation.items() if k != "configs"} if table.validation else None
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
