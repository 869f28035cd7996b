"""Budget -> per-layer configuration.

A latency budget goes to the static router when one was trained for the table's regime and its choice
is within ROUTER_TOLERANCE of the budget; otherwise, and for parameter budgets, to a greedy search that
removes, step by step, the width that loses the least importance mass per millisecond (or parameter)
saved. Explicit configurations and uniform fractions pass through checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch.family import by_family
from ..arch.spec import Config, ElasticSpec
from ..errors import InfeasibleError, UsageError
from ..io import layout
from ..latency.table import LatencyTable, load_table
from ..progress import Reporter
from ..router.models import StaticRouter, static_config
from .budget import Budget

ROUTER_TOLERANCE = 1.05  # the static router's choice is used while its LUT latency is within 5% of the budget

Cost = Callable[[Config], float]


def param_counter(spec: ElasticSpec, config: dict[str, Any]) -> Callable[[Config], int]:
    """cfg -> parameters of the sliced model, from the family descriptor (biases included)."""
    arch = by_family(spec.family)
    return lambda cfg: arch.param_count(config, spec.dims, spec.layer_sizes(cfg))


def importance_shares(path: Path, spec: ElasticSpec) -> list[dict[str, torch.Tensor]]:
    """Per layer, cumulative share of importance kept by each prefix (in permuted order)."""
    t = layout.read_importance_tensors(path)
    out = []
    for i in range(spec.dims.num_layers):
        row = {}
        for unit, n in (("neuron", spec.dims.intermediate_size), ("qhead", spec.dims.num_heads)):
            s = t.get(f"layers.{i}.{unit}_score")
            s = torch.ones(n, dtype=torch.float64) if s is None else s[t[f"layers.{i}.{unit}_perm"]]
            row[unit] = torch.cumsum(s, 0) / s.sum()
        out.append(row)
    return out


def _kept(shares, spec: ElasticSpec, i: int, m: int, h: int) -> float:
    q, _ = spec.head_index(h)
    head_share = shares[i]["qhead"].diff(prepend=torch.zeros(1, dtype=torch.float64))[q].sum()
    return float(shares[i]["neuron"][m - 1] + head_share)


def _steps_down(spec: ElasticSpec, i: int, m: int, h: int) -> list[tuple[int, int]]:
    """Layer i's configurations one choice narrower in MLP or in heads."""
    lc, out = spec.layers[i], []
    if lc.mlp.index(m) + 1 < len(lc.mlp):
        out.append((lc.mlp[lc.mlp.index(m) + 1], h))
    if lc.heads.index(h) + 1 < len(lc.heads):
        out.append((m, lc.heads[lc.heads.index(h) + 1]))
    return out


def greedy_search(spec: ElasticSpec, cost: Cost, target: float, shares) -> Config:
    """From the full model, take the step (one layer's MLP or heads one choice down) that loses the least
    importance per unit of cost saved, until cost(cfg) <= target."""
    cfg = spec.full()
    while cost(cfg) > target:
        best, best_score = None, math.inf
        for i, (m, h) in enumerate(cfg):
            for s in _steps_down(spec, i, m, h):
                new = list(cfg)
                new[i] = s
                saved = cost(cfg) - cost(new)
                if saved <= 0:
                    continue
                loss = _kept(shares, spec, i, m, h) - _kept(shares, spec, i, *s)
                if loss / saved < best_score:
                    best, best_score = new, loss / saved
        if best is None:
            break
        cfg = best
    return cfg


def uniform_at(
    spec: ElasticSpec,
    table: LatencyTable,
    latency_ms: float,
    quality: Callable[[Config], float] | None = None,
) -> Config:
    """The best uniform configuration (same MLP and head choice in every layer) with LUT latency not above
    `latency_ms`: by `quality(cfg)` (lower is better) when given, else the slowest one; the fastest
    uniform configuration when none fits."""
    cands = sorted(spec.uniform_configs(), key=table.predict)
    ok = [c for c in cands if table.predict(c) <= latency_ms * (1 + 1e-9)]
    if not ok:
        return cands[0]
    return min(ok, key=quality) if quality is not None else ok[-1]


def latency_budgets_ms(budgets: list[Budget], table: LatencyTable) -> list[tuple[str, float]]:
    """(text, ms) of latency budgets against the table; exit 3 below the smallest sub-network."""
    out = []
    for b in budgets:
        if b.kind == "params":
            raise UsageError(
                f"budget {b.text!r} is a parameter count; routers are trained for latencies (ms, s, %)",
                option="budgets",
            )
        ms = b.to_ms(table.full_ms())
        table.check_budget(ms)
        out.append((b.text, ms))
    return out


@dataclass(frozen=True, kw_only=True)
class Request:
    """Which sub-models to make: exactly one of budgets, an explicit configuration, uniform fractions."""

    budgets: list[Budget] | None = None
    config: Config | None = None
    label: str | None = (
        None  # names an explicit configuration or uniform fractions (default: from the values)
    )
    uniform: tuple[float, float] | None = None  # (MLP fraction, head fraction), each in (0, 1]

    def check(self) -> None:
        if sum(x is not None for x in (self.budgets, self.config, self.uniform)) != 1:
            raise UsageError(
                "give exactly one of a budget, a configuration or uniform fractions", option="budget"
            )
        if self.uniform is not None and not all(0 < x <= 1 for x in self.uniform):
            raise UsageError(f"uniform fractions must be in (0, 1], got {self.uniform}", option="uniform")


@dataclass
class Target:
    """One sub-model to make: its label, configuration, how it was chosen, and the budget it answers."""

    label: str
    cfg: Config
    method: str
    budget: Budget | None = None
    budget_ms: float | None = None


def optional_table(path: Path, regime: str | None) -> LatencyTable | None:
    """The latency table of `regime` (None: newest), or None when ELASTIC has none and none was asked for."""
    try:
        return load_table(path, regime)
    except UsageError:
        if regime:
            raise
        return None


def resolve_targets(
    path: Path,
    spec: ElasticSpec,
    config: dict[str, Any],
    request: Request,
    table: LatencyTable | None,
    router: tuple[StaticRouter, dict[str, Any]] | None,
    rep: Reporter,
) -> list[Target]:
    """The configurations to make for `request` (config: the checkpoint's config.json, for parameter counts;
    router: the trained static router and its metadata, if any)."""
    request.check()
    if request.config is not None:
        spec.check(request.config)
        return [Target(request.label or "config", request.config, "--config")]
    if request.uniform is not None:
        m, h = request.uniform
        return [Target(request.label or f"mlp{m:g}-heads{h:g}", spec.uniform(m, h), "--uniform")]
    shares = importance_shares(path, spec)
    assert request.budgets is not None
    return [
        _for_params(spec, config, b, shares, rep)
        if b.kind == "params"
        else _for_latency(path, spec, b, table, router, shares, rep)
        for b in request.budgets
    ]


def _for_params(spec: ElasticSpec, config: dict[str, Any], b: Budget, shares, rep: Reporter) -> Target:
    count = param_counter(spec, config)
    full, low = count(spec.full()), count(spec.smallest())
    if b.value < low:
        raise InfeasibleError(
            f"budget {b.text} is below the smallest sub-network ({low / 1e6:.2f}M parameters)"
        )
    if b.value >= full:
        rep.warn(
            f"budget {b.text} is at or above the full model ({full / 1e6:.2f}M parameters): extracting it"
        )
    cfg = greedy_search(spec, count, b.value, shares)
    return Target(b.text, cfg, "importance search over parameter count", b)


def _for_latency(
    path: Path,
    spec: ElasticSpec,
    b: Budget,
    table: LatencyTable | None,
    router: tuple[StaticRouter, dict[str, Any]] | None,
    shares,
    rep: Reporter,
) -> Target:
    if table is None:
        raise UsageError(
            f"budget {b.text} needs a latency table in {path}; run `flex profile {path}` first "
            "(or give a parameter budget such as 3.5B, a configuration or uniform fractions)"
        )
    ms = b.to_ms(table.full_ms())
    if ms >= table.full_ms():
        rep.warn(f"budget {b.text} is at or above the full model ({table.full_ms():.3f} ms): extracting it")
        return Target(b.text, spec.full(), "full model", b, ms)
    table.check_budget(ms)
    if router is not None and router[1]["regime"] == table.regime.key:
        cand = static_config(router[0], spec, router[1]["targets_ms"], ms)
        if table.predict(cand) <= ms * ROUTER_TOLERANCE:
            return Target(b.text, cand, "static router", b, ms)
        rep.warn(
            f"static router's configuration for {b.text} is over budget "
            f"({table.predict(cand):.3f} ms); using the latency-table search"
        )
    cfg = greedy_search(spec, table.predict, ms, shares)
    return Target(b.text, cfg, "importance search over the latency table", b, ms)
