"""`flex train-router` orchestration, the router files in ELASTIC, and budget -> configuration."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import parse_budgets
from .checkpoint import update_dir
from .elastic import ElasticModel, load_elastic, read_manifest
from .errors import UsageError
from .evaluate import mean_loss
from .latency import LatencyTable, load_table
from .progress import Reporter
from .router import DynamicRouter, StaticRouter, Surrogate
from .router_train import (
    LossOracle,
    RouterHyper,
    SMState,
    eval_dynamic,
    one_hot_config,
    sample_config,
    spearman,
    static_config,
    train_dynamic,
    train_joint,
    train_static,
    train_static_direct,
)
from .spec import Config, ElasticSpec, config_to_json

ROUTERS_JSON = "flex_routers.json"
ROUTERS_TENSORS = "flex_routers.safetensors"
ROUTERS_FORMAT = "flexcli.routers/1"


def uniform_configs(spec: ElasticSpec) -> list[Config]:
    """Every configuration with the same (MLP, heads) choice in all layers."""
    return [[(lc.mlp[k], lc.heads[j]) for lc in spec.layers]
            for k in range(len(spec.layers[0].mlp)) for j in range(len(spec.layers[0].heads))]


def uniform_at(spec: ElasticSpec, table: LatencyTable, latency_ms: float, quality=None) -> Config:
    """The best uniform configuration (same MLP and head choice in every layer) with LUT latency not above
    `latency_ms`: by `quality(cfg)` (lower is better) when given, else the slowest one; the fastest
    uniform configuration when none fits."""
    cands = sorted(uniform_configs(spec), key=table.predict)
    ok = [c for c in cands if table.predict(c) <= latency_ms * (1 + 1e-9)]
    if not ok:
        return cands[0]
    return min(ok, key=quality) if quality is not None else ok[-1]


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


def resolve_budgets_ms(text: str, table: LatencyTable) -> list[tuple[str, float]]:
    """Parse budgets to ms against the table; exit 3 below the smallest sub-network."""
    out = []
    for b in parse_budgets(text):
        if b.kind == "params":
            raise UsageError(f"budget {b.text!r} is a parameter count; train-router budgets are latencies (ms, s, %)")
        ms = b.to_ms(table.full_ms())
        table.check_budget(ms)
        out.append((b.text, ms))
    return out


def train_router(path: Path, budgets: str | None, static: bool, dynamic: bool, hyper: RouterHyper,
                 regime: str | None = None, data: str | None = None, eval_samples: int = 32,
                 reporter: Reporter | None = None) -> TrainRouterResult:
    """Train the requested routers for ELASTIC against the latency table and save them atomically."""
    from transformers import AutoTokenizer

    from .data import train_and_heldout

    rep = reporter or Reporter()
    t0 = time.time()
    if not (static or dynamic):
        raise UsageError("nothing to train: both --no-static and --no-dynamic given")
    if hyper.joint_steps and not static:
        raise UsageError("--joint-steps fine-tunes the static router; it needs --static")
    manifest = read_manifest(path)
    table = load_table(path, regime)
    budget_ms = resolve_budgets_ms(budgets or "40%,55%,70%,85%", table)
    full = table.full_ms()
    targets = sorted({round(ms, 6) for _, ms in budget_ms if ms < full})
    if not targets:
        raise UsageError("every budget is at or above the full model's latency; nothing to route")
    elastic = load_elastic(path)
    spec = elastic.spec
    torch.manual_seed(hyper.seed)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    src = data or manifest.get("recipe", {}).get("train", {}).get("data") or \
        manifest.get("recipe", {}).get("calibration", {}).get("data") or "stdlib"
    need = max(200_000, (hyper.steps + hyper.dynamic_steps + hyper.joint_steps) * hyper.batch_size * hyper.seq_len)
    tokens, heldout = train_and_heldout(tok, src, need, eval_samples, hyper.seq_len)
    g = torch.Generator().manual_seed(hyper.seed)
    from .train import sample_batch

    oracle = LossOracle(elastic, torch.cat([sample_batch(tokens, hyper.batch_size, hyper.seq_len, g)
                                            for _ in range(hyper.loss_batches)]))
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    rng = random.Random(hyper.seed)
    sm = SMState(Surrogate(spec.dims.num_layers * (len(mlp) + len(heads))), None)
    sm.opt = torch.optim.Adam(sm.sm.parameters(), lr=hyper.sm_lr)
    with rep.task(f"surrogate warm-up ({hyper.sm_warmup} configurations)", total=hyper.sm_warmup) as task:
        for _ in range(hyper.sm_warmup):
            cfg = sample_config(spec, rng)
            sm.xs.append(one_hot_config(cfg, mlp, heads))
            sm.ys.append(oracle(cfg))
            task.advance(1)
        sm.fit(600, g)
    held = [sample_config(spec, rng) for _ in range(hyper.sm_heldout)]
    held_true = [oracle(c) for c in held]

    st_router = dyn_router = None
    st_stats = dyn_stats = joint_stats = None
    if static and hyper.surrogate:
        st_router, st_stats = train_static(spec, table, targets, oracle, sm, hyper, rep)
    elif static:
        st_router, st_stats = train_static_direct(elastic, table, targets, tokens, hyper, rep)
    if dynamic:
        dyn_router, dyn_stats = train_dynamic(elastic, table, targets, tokens, sm, hyper, rep)
    with torch.no_grad():
        sm_pred = sm.sm(torch.stack([one_hot_config(c, mlp, heads) for c in held])).tolist()
    rho = spearman(sm_pred, held_true)

    reports = []
    held_loss = LossOracle(elastic, heldout)  # cached held-out loss per configuration
    with rep.task("held-out evaluation per budget", total=len(budget_ms)) as task:
        for text, ms in budget_ms:
            cfg = spec.full() if ms >= full or st_router is None else static_config(st_router, spec, targets, ms)
            if st_router is None:  # no static router: report the best uniform configuration within budget
                cfg = uniform_at(spec, table, ms, held_loss)
            uni = uniform_at(spec, table, table.predict(cfg), held_loss)  # the strongest uniform baseline
            ppl, uppl = math.exp(held_loss(cfg)), math.exp(held_loss(uni))
            r = BudgetReport(text, ms, config_to_json(cfg), table.predict(cfg), ppl, config_to_json(uni),
                             table.predict(uni), uppl)
            if dyn_router is not None and ms < full:
                dl, dlat = eval_dynamic(elastic, dyn_router, table, targets, ms, heldout)
                r.dynamic_ppl, r.dynamic_mean_latency_ms = math.exp(dl), dlat
            reports.append(r)
            task.advance(1)
    if hyper.joint_steps and st_router is not None:
        joint_stats = train_joint(elastic, st_router, table, targets, tokens, hyper, rep)
        for r in reports:
            cfg = spec.full() if r.budget_ms >= full else static_config(st_router, spec, targets, r.budget_ms)
            with elastic.configured(cfg):
                r.joint_ppl = math.exp(mean_loss(elastic.model, heldout))
            r.config, r.lut_latency_ms = config_to_json(cfg), table.predict(cfg)

    result = TrainRouterResult(str(path), table.regime.key, targets, full, table.smallest_ms(), reports, rho,
                               st_stats, dyn_stats, joint_stats, 0.0)
    save_routers(path, elastic, st_router, dyn_router, targets, table, hyper, result)
    result.seconds = round(time.time() - t0, 2)
    return result


def save_routers(path: Path, elastic: ElasticModel, st: StaticRouter | None, dyn: DynamicRouter | None,
                 targets: list[float], table: LatencyTable, hyper: RouterHyper, result: TrainRouterResult) -> None:
    """Write flex_routers.{safetensors,json} (and, after joint fine-tuning, the weights) in one atomic step."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, mod in (("static.", st), ("dynamic.", dyn)):
        if mod is not None:
            tensors.update({prefix + k: v.detach().contiguous() for k, v in mod.state_dict().items()})
    writers = {}

    def write_tensors(dest: Path) -> None:
        save_file(tensors, str(dest))

    def write_json(dest: Path) -> None:
        doc = {"format": ROUTERS_FORMAT, "targets_ms": targets, "regime": table.regime.key,
               "static": st is not None, "dynamic": dyn is not None,
               "sizes": {"hidden": hyper.hidden, "targets": len(targets)},
               "hyper": asdict(hyper), "sha256": hashlib.sha256((dest.parent / ROUTERS_TENSORS).read_bytes()).hexdigest(),
               "report": asdict(result)}
        dest.write_text(json.dumps(doc, indent=1) + "\n")

    if result.joint is not None:  # the LLM changed too: rewrite its weights under the stored names
        from .checkpoint import SourceModel
        from .checkpoint import write_tensors as write_shards

        src = SourceModel.open(path)
        state = elastic.model.state_dict()
        old_files = {f.name for f in src.weight_files} | {"model.safetensors.index.json"}
        tmp_weights = path.parent / f".{path.name}.flex-weights-{id(state)}"
        tmp_weights.mkdir(exist_ok=True)
        names = write_shards(tmp_weights, ((n, state[n].to(t.dtype)) for n, t in src.iter_tensors()), 5 * 10**9)
        for name in old_files - set(names):
            writers[name] = lambda dest: None  # dropped (not linked into the new directory)
        for name in names:
            writers[name] = lambda dest, n=name: (tmp_weights / n).rename(dest)
    writers[ROUTERS_TENSORS] = write_tensors
    writers[ROUTERS_JSON] = write_json  # after the tensors: it records their hash
    update_dir(path, writers)
    if result.joint is not None:
        import shutil

        shutil.rmtree(tmp_weights, ignore_errors=True)


def load_router(path: Path, kind: str = "static") -> tuple[nn.Module, dict[str, Any]] | None:
    """The trained `kind` ('static' or 'dynamic') router of ELASTIC and its metadata, or None when none
    was trained."""
    from safetensors.torch import load_file

    f = path / ROUTERS_JSON
    if not f.is_file():
        return None
    doc = json.loads(f.read_text())
    if not doc.get(kind):
        return None
    if hashlib.sha256((path / ROUTERS_TENSORS).read_bytes()).hexdigest() != doc["sha256"]:
        raise UsageError(f"{path / ROUTERS_TENSORS} does not match {f}; run `flex train-router` again")
    spec = ElasticSpec.from_dict(read_manifest(path)["spec"])
    L, K, J = spec.dims.num_layers, len(spec.layers[0].mlp), len(spec.layers[0].heads)
    sd = {k[len(kind) + 1:]: v for k, v in load_file(path / ROUTERS_TENSORS).items() if k.startswith(kind + ".")}
    r: nn.Module = StaticRouter(len(doc["targets_ms"]), L, K, J, doc["sizes"]["hidden"]) if kind == "static" \
        else DynamicRouter(len(doc["targets_ms"]), L, spec.dims.hidden_size, K, J)
    r.load_state_dict(sd)
    return r.eval(), doc


def load_static_router(path: Path) -> tuple[StaticRouter, dict[str, Any]] | None:
    """The trained static router of ELASTIC and its metadata, or None when none was trained."""
    return load_router(path, "static")  # type: ignore[return-value]
