"""Routers on disk: ELASTIC/flex_routers.{safetensors,json}, written in one atomic step with the weights
when joint fine-tuning changed them too.

One router set per latency regime (a llama.cpp table per GGUF type has its own routers): the metadata's
`regimes` maps each regime key to its document, whose `prefix` names its tensors. Training a regime
replaces that regime's set and keeps the others, unless the LLM's weights changed (joint fine-tuning):
routers trained against the old weights are then dropped. A file written before per-regime storage (one
document with a top-level `regime`) reads as that regime's set."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch.spec import ElasticSpec
from ..elastic.runtime import ElasticModel
from ..io import layout
from ..io.atomic import sibling, update_dir
from ..io.safetensors import write_model
from ..io.source import SourceModel
from ..latency.table import LatencyTable
from .models import DynamicRouter, StaticRouter
from .training import RouterHyper

MAX_SHARD_BYTES = 5 * 10**9


def save_routers(
    path: Path,
    elastic: ElasticModel,
    st: StaticRouter | None,
    dyn: DynamicRouter | None,
    targets: list[float],
    table: LatencyTable,
    hyper: RouterHyper,
    report: Any,
    weights_changed: bool,
) -> list[str]:
    """Write the routers of `table`'s regime (and, when `weights_changed`, the LLM's weights under their
    stored names and dtypes) into ELASTIC as one atomic step; `report` is the command's result, kept in
    the metadata. Returns the other regimes whose routers were dropped (weights changed)."""
    tensors = {}
    for prefix, mod in (("static.", st), ("dynamic.", dyn)):
        if mod is not None:
            tensors.update({prefix + k: v.detach().contiguous() for k, v in mod.state_dict().items()})
    doc = {
        "targets_ms": targets,
        "regime": table.regime.key,
        "static": st is not None,
        "dynamic": dyn is not None,
        "sizes": {"hidden": hyper.hidden, "targets": len(targets)},
        "hyper": asdict(hyper),
        "report": asdict(report),
    }
    sets = router_sets(path)
    dropped = [k for k in sets if k != table.regime.key] if weights_changed else []
    sets = {} if weights_changed else {k: v for k, v in sets.items() if k != table.regime.key}
    sets[table.regime.key] = (doc, tensors)
    flat, docs = {}, {}
    for i, (key, (d, t)) in enumerate(sets.items()):
        d = {**d, "prefix": f"r{i}."}
        flat.update({d["prefix"] + k: v for k, v in t.items()})
        docs[key] = d
    writers: dict[str, Any] = {}
    staged = None
    if weights_changed:  # staged beside ELASTIC, then moved in by the same atomic swap
        src = SourceModel.open(path)
        state = elastic.model.state_dict()
        staged = sibling(path, "weights")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        names = write_model(
            staged,
            src.tensor_specs(),
            ((n, state[n].to(t.dtype)) for n, t in src.iter_tensors()),
            MAX_SHARD_BYTES,
        )
        old = {f.name for f in src.weight_files} | {"model.safetensors.index.json"}
        writers.update({name: None for name in old - set(names)})  # dropped from the new directory
        writers.update({name: (lambda dest, n=name: (staged / n).rename(dest)) for name in names})
    # the metadata last: it records the tensors' hash
    writers.update(
        layout.router_writers(flat, {"format": layout.ROUTERS_FORMAT, "regimes": docs, "sha256": None})
    )
    try:
        update_dir(path, writers)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    return dropped


def router_sets(path: Path) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Regime key -> (its router document, its tensors without the prefix), in the order trained."""
    found = layout.read_routers(path)
    if found is None:
        return {}
    doc, tensors = found
    if "regimes" not in doc:  # one set, written before per-regime storage
        return {doc["regime"]: (doc, tensors)}
    out = {}
    for key, d in doc["regimes"].items():
        p = d["prefix"]
        out[key] = (d, {n[len(p) :]: v for n, v in tensors.items() if n.startswith(p)})
    return out


def load_router(
    path: Path, kind: str = "static", regime: str | None = None
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The trained `kind` ('static' or 'dynamic') router of ELASTIC for the regime key `regime` (None:
    the set trained last) and its metadata, or None when none was trained for it."""
    sets = router_sets(path)
    if regime is None and sets:
        regime = list(sets)[-1]
    if regime not in sets or not sets[regime][0].get(kind):
        return None
    doc, tensors = sets[regime]
    spec: ElasticSpec = layout.read_spec(path)
    L, K, J = spec.dims.num_layers, len(spec.layers[0].mlp), len(spec.layers[0].heads)
    sd = {k[len(kind) + 1 :]: v for k, v in tensors.items() if k.startswith(kind + ".")}
    r: nn.Module = (
        StaticRouter(len(doc["targets_ms"]), L, K, J, doc["sizes"]["hidden"])
        if kind == "static"
        else DynamicRouter(
            len(doc["targets_ms"]),
            L,
            spec.dims.hidden_size,
            K,
            J,
            source=doc.get("hyper", {}).get("dynamic_source"),
        )
    )
    # adaptive routers saved before their priors / input standardization: zero priors, raw inputs
    got = r.load_state_dict(sd, strict=False)
    if got.unexpected_keys or set(got.missing_keys) - {"prior_mlp", "prior_att", "in_shift", "in_scale"}:
        r.load_state_dict(sd)  # raises, naming the mismatch
    return r.eval(), doc


def router_cost_ms(doc: dict[str, Any]) -> float | None:
    """The input-adaptive router's own cost per decode step, as train-router measured and trained with it
    (router.training.router_overhead_ms); None when it was not measured: its table is not a PyTorch decode
    table of the device it trained on, so the table's latency is the whole latency model."""
    return ((doc.get("report") or {}).get("dynamic") or {}).get("router_step_ms")
