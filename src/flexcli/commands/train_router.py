"""`flex train-router`: routers trained against the latency table with the surrogate model, reported
against the best uniform configuration at equal latency, and saved atomically into ELASTIC.

Stages: budgets -> data -> surrogate warm-up -> static / input-adaptive routers -> held-out report per
budget -> optional joint fine-tuning -> save.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch.spec import config_to_json
from ..elastic.compensate import Bank
from ..elastic.evaluate import mean_loss
from ..elastic.runtime import ElasticModel, load_elastic
from ..errors import UsageError
from ..io import layout
from ..io.source import load_tokenizer
from ..latency.table import LatencyTable, load_table
from ..plan.budget import Budget, parse_budgets
from ..plan.search import latency_budgets_ms, uniform_at
from ..progress import Reporter
from ..router.models import DynamicRouter, StaticRouter, static_config
from ..router.store import save_routers
from ..router.surrogate import LossOracle, SMState, sample_config, sm_spearman, warm_up_surrogate
from ..router.training import (
    RouterHyper,
    eval_dynamic,
    train_dynamic,
    train_joint,
    train_static,
    train_static_direct,
)
from ..train.data import train_and_heldout
from ..train.loop import sample_batch

DEFAULT_BUDGETS = "40%,55%,70%,85%"


def parse_source(text: str) -> int | None:
    """`--dynamic-source`: a layer index (the lookahead router's source), or `each` (None: every layer
    routes from its own input)."""
    if text.strip().lower() == "each":
        return None
    try:
        layer = int(text)
    except ValueError:
        layer = -1
    if layer < 0:
        raise UsageError(
            f"--dynamic-source takes a layer number (0, 1, ...) or `each`, got {text!r}",
            option="dynamic_source",
        )
    return layer


@dataclass(kw_only=True)
class TrainRouterOptions:
    budgets: list[Budget] = field(default_factory=lambda: parse_budgets(DEFAULT_BUDGETS))
    static: bool = True
    dynamic: bool = True
    hyper: RouterHyper = field(default_factory=RouterHyper)
    regime: str | None = None  # latency-table regime key (or a unique part of it); None: the newest
    data: str | None = None  # text for training and evaluation; None: the conversion's
    eval_samples: int = 32
    # the static router and the report judge each configuration as `flex extract` writes it, refit output
    # projections included (elastic.compensate). Off by default: on SmolLM2 (make bench-recovery) a router
    # trained this way was no better than one trained on plain slices, once both were compensated
    compensate: bool = False
    compensate_tokens: int = 16384


@dataclass
class BudgetReport:
    budget: str
    budget_ms: float
    config: list[dict[str, int]]
    lut_latency_ms: float
    ppl: float
    uniform_config: list[dict[str, int]]
    uniform_latency_ms: float
    uniform_ppl: float
    dynamic_ppl: float | None = None
    dynamic_mean_latency_ms: float | None = None
    joint_ppl: float | None = None  # static router after joint fine-tuning (when run)


@dataclass
class TrainRouterResult:
    elastic: str
    regime: str
    targets_ms: list[float]
    full_ms: float
    smallest_ms: float
    budgets: list[BudgetReport]
    sm_spearman: float
    static: dict[str, Any] | None
    dynamic: dict[str, Any] | None
    joint: dict[str, Any] | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    compensated: bool = False  # configurations judged with extract's compensation


@dataclass
class _Run:
    """What every stage works on."""

    elastic: ElasticModel
    table: LatencyTable
    targets: list[float]
    tokens: torch.Tensor  # training stream
    heldout: torch.Tensor  # (n, seq_len)
    hyper: RouterHyper
    bank: Bank | None = None  # compensation refits, when configurations are judged compensated
    note: str | None = None  # why they are not, when compensation was left out


@dataclass
class TrainRouterRuns:
    """One result per regime, when --regime named several tables (one llama.cpp table per GGUF type)."""

    runs: list[TrainRouterResult]


def train_routers(
    elastic_dir: Path, options: TrainRouterOptions | None = None, reporter: Reporter | None = None
) -> TrainRouterResult | TrainRouterRuns:
    """`train_router` against every table `options.regime` names (a unique one: its result). Each regime
    keeps its own routers; budgets given as percentages are shares of each table's full model."""
    from dataclasses import replace

    from ..latency.table import matching_regimes

    o = options or TrainRouterOptions()
    keys = matching_regimes(elastic_dir, o.regime)
    if len(keys) <= 1:
        return train_router(elastic_dir, o, reporter)
    if o.hyper.joint_steps:
        raise UsageError(
            f"joint fine-tuning changes the LLM's weights for one regime; --regime names {len(keys)} tables",
            option="joint_steps",
        )
    return TrainRouterRuns([train_router(elastic_dir, replace(o, regime=k), reporter) for k in keys])


def train_router(
    elastic_dir: Path, options: TrainRouterOptions | None = None, reporter: Reporter | None = None
) -> TrainRouterResult:
    """Train the requested routers for ELASTIC against the latency table and save them atomically."""
    rep = reporter or Reporter()
    o = options or TrainRouterOptions()
    h = o.hyper
    t0 = time.time()
    if not (o.static or o.dynamic):
        raise UsageError(
            "nothing to train: neither the static nor the input-adaptive router was asked for",
            option="static",
        )
    if h.dynamic_train not in ("direct", "surrogate"):
        raise UsageError(
            f"unknown input-adaptive training {h.dynamic_train!r}: direct or surrogate",
            option="dynamic_train",
        )
    if h.joint_steps and not o.static:
        raise UsageError(
            "joint fine-tuning fine-tunes the static router; it needs the static router", option="joint_steps"
        )
    n_layers = layout.read_spec(elastic_dir).dims.num_layers
    if h.dynamic_source is not None and not 0 <= h.dynamic_source < n_layers:
        raise UsageError(
            f"the router's source layer must be one of the model's layers, 0-{n_layers - 1}; got {h.dynamic_source}",
            option="dynamic_source",
        )
    run, budget_ms = _prepare(elastic_dir, o)
    spec, table = run.elastic.spec, run.table
    g = torch.Generator().manual_seed(h.seed)
    oracle = LossOracle(
        run.elastic,
        torch.cat([sample_batch(run.tokens, h.batch_size, h.seq_len, g) for _ in range(h.loss_batches)]),
        run.bank,
    )
    rng = random.Random(h.seed)
    sm = warm_up_surrogate(spec, oracle, h.sm_warmup, h.sm_lr, rng, g, rep)
    held = [sample_config(spec, rng) for _ in range(h.sm_heldout)]
    held_true = [oracle(c) for c in held]
    st_router, st_stats, dyn_router, dyn_stats = _train_routers(run, o, oracle, sm, rep)
    rho = sm_spearman(sm, spec, held, held_true)
    overhead = ((dyn_stats or {}).get("router_step_ms")) or 0.0
    reports = _report(run, budget_ms, st_router, dyn_router, rep, overhead)
    joint_stats = None
    if h.joint_steps and st_router is not None:
        joint_stats = train_joint(run.elastic, st_router, table, run.targets, run.tokens, h, rep)
        _report_joint(run, st_router, reports)
    result = TrainRouterResult(
        str(elastic_dir),
        table.regime.key,
        run.targets,
        table.full_ms(),
        table.smallest_ms(),
        reports,
        rho,
        st_stats,
        dyn_stats,
        joint_stats,
        0.0,
    )
    dropped = save_routers(
        elastic_dir,
        run.elastic,
        st_router,
        dyn_router,
        run.targets,
        table,
        h,
        result,
        weights_changed=joint_stats is not None,
    )
    result.compensated = run.bank is not None
    if run.note:
        result.notes.append(run.note)
    if dropped:
        msg = f"joint fine-tuning changed the weights: the routers of {', '.join(dropped)} were removed"
        rep.warn(msg)
        result.notes.append(msg)
    result.seconds = round(time.time() - t0, 2)
    return result


def _prepare(path: Path, o: TrainRouterOptions) -> tuple[_Run, list[tuple[str, float]]]:
    """Budgets against the table, the elastic model, and the training / held-out text."""
    h = o.hyper
    manifest = layout.read_manifest(path)
    table = load_table(path, o.regime)
    budget_ms = latency_budgets_ms(o.budgets, table)
    targets = sorted({round(ms, 6) for _, ms in budget_ms if ms < table.full_ms()})
    if not targets:
        raise UsageError(
            "every budget is at or above the full model's latency; nothing to route", option="budgets"
        )
    elastic = load_elastic(path)
    torch.manual_seed(h.seed)
    tok = load_tokenizer(path)
    recipe = manifest.get("recipe", {})
    src = (
        o.data or recipe.get("train", {}).get("data") or recipe.get("calibration", {}).get("data") or "stdlib"
    )
    need = max(200_000, (h.steps + h.dynamic_steps + h.joint_steps) * h.batch_size * h.seq_len)
    tokens, heldout = train_and_heldout(tok, src, need, o.eval_samples, h.seq_len)
    bank, note = _bank(path, elastic, o)
    return _Run(elastic, table, targets, tokens, heldout, h, bank, note), budget_ms


def _bank(path: Path, el: ElasticModel, o: TrainRouterOptions) -> tuple[Bank | None, str | None]:
    """Extract's compensation for every configuration the router looks at: the full model's moments of
    every output projection (one calibration pass), refits computed once per layer and width."""
    from ..elastic import compensate
    from ..io.source import SourceModel
    from ..train.data import calibration_sequences

    if not o.compensate:
        return None, None
    if not o.static:
        return None, "--compensate judges the static router's configurations; no static router was trained"
    seqs = calibration_sequences(path, o.compensate_tokens)
    every = {(i, u) for i in range(el.spec.dims.num_layers) for u in compensate.UNITS}
    stored = SourceModel.open(path).stored_dtypes()
    return compensate.calibrated_bank(el.model, el.arch, el.spec, seqs, every, stored), None


def _train_routers(run: _Run, o: TrainRouterOptions, oracle: LossOracle, sm: SMState, rep: Reporter):
    """(static router, its stats, input-adaptive router, its stats); None for what was not asked for."""
    st_router = dyn_router = st_stats = dyn_stats = None
    spec, h = run.elastic.spec, run.hyper
    if o.static and h.surrogate:
        st_router, st_stats = train_static(spec, run.table, run.targets, oracle, sm, h, rep)
    elif o.static:
        st_router, st_stats = train_static_direct(run.elastic, run.table, run.targets, run.tokens, h, rep)
    if o.dynamic:
        dyn_router, dyn_stats = train_dynamic(
            run.elastic, run.table, run.targets, run.tokens, sm, h, rep, static=st_router
        )
    return st_router, st_stats, dyn_router, dyn_stats


def _report(
    run: _Run,
    budget_ms: list[tuple[str, float]],
    st_router: StaticRouter | None,
    dyn_router: DynamicRouter | None,
    rep: Reporter,
    overhead_ms: float = 0.0,
) -> list[BudgetReport]:
    """Held-out perplexity per budget: the router's choice, the best uniform configuration at its LUT
    latency, and input-adaptive routing (its latency with the router's per-step cost `overhead_ms`)."""
    spec, table, full = run.elastic.spec, run.table, run.table.full_ms()
    held_loss = LossOracle(run.elastic, run.heldout, run.bank)  # cached held-out loss per configuration
    reports = []
    with rep.task("held-out evaluation per budget", total=len(budget_ms)) as task:
        for text, ms in budget_ms:
            if st_router is None:  # no static router: report the best uniform configuration within budget
                cfg = uniform_at(spec, table, ms, held_loss)
            else:
                cfg = spec.full() if ms >= full else static_config(st_router, spec, run.targets, ms)
            uni = uniform_at(spec, table, table.predict(cfg), held_loss)  # the strongest uniform baseline
            r = BudgetReport(
                text,
                ms,
                config_to_json(cfg),
                table.predict(cfg),
                math.exp(held_loss(cfg)),
                config_to_json(uni),
                table.predict(uni),
                math.exp(held_loss(uni)),
            )
            if dyn_router is not None and ms < full:
                dl, dlat = eval_dynamic(
                    run.elastic, dyn_router, table, run.targets, ms, run.heldout, overhead_ms=overhead_ms
                )
                r.dynamic_ppl, r.dynamic_mean_latency_ms = math.exp(dl), dlat
            reports.append(r)
            task.advance(1)
    return reports


def _report_joint(run: _Run, st_router: StaticRouter, reports: list[BudgetReport]) -> None:
    """After joint fine-tuning: each budget's (possibly new) configuration and its held-out perplexity."""
    spec, el = run.elastic.spec, run.elastic
    for r in reports:
        cfg = (
            spec.full()
            if r.budget_ms >= run.table.full_ms()
            else static_config(st_router, spec, run.targets, r.budget_ms)
        )
        with el.configured(cfg):
            r.joint_ppl = math.exp(mean_loss(el.model, run.heldout))
        r.config, r.lut_latency_ms = config_to_json(cfg), run.table.predict(cfg)
