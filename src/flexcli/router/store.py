"""Routers on disk: ELASTIC/flex_routers.{safetensors,json}, written in one atomic step with the weights
when joint fine-tuning changed them too."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
) -> None:
    """Write the routers (and, when `weights_changed`, the LLM's weights under their stored names and
    dtypes) into ELASTIC as one atomic step; `report` is the command's result, kept in the metadata."""
    tensors = {}
    for prefix, mod in (("static.", st), ("dynamic.", dyn)):
        if mod is not None:
            tensors.update({prefix + k: v.detach().contiguous() for k, v in mod.state_dict().items()})
    doc = {
        "format": layout.ROUTERS_FORMAT,
        "targets_ms": targets,
        "regime": table.regime.key,
        "static": st is not None,
        "dynamic": dyn is not None,
        "sizes": {"hidden": hyper.hidden, "targets": len(targets)},
        "hyper": asdict(hyper),
        "sha256": None,
        "report": asdict(report),
    }
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
    writers.update(layout.router_writers(tensors, doc))  # the metadata last: it records the tensors' hash
    try:
        update_dir(path, writers)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


def load_router(path: Path, kind: str = "static") -> tuple[nn.Module, dict[str, Any]] | None:
    """The trained `kind` ('static' or 'dynamic') router of ELASTIC and its metadata, or None when none
    was trained."""
    found = layout.read_routers(path)
    if found is None or not found[0].get(kind):
        return None
    doc, tensors = found
    spec: ElasticSpec = layout.read_spec(path)
    L, K, J = spec.dims.num_layers, len(spec.layers[0].mlp), len(spec.layers[0].heads)
    sd = {k[len(kind) + 1 :]: v for k, v in tensors.items() if k.startswith(kind + ".")}
    r: nn.Module = (
        StaticRouter(len(doc["targets_ms"]), L, K, J, doc["sizes"]["hidden"])
        if kind == "static"
        else DynamicRouter(len(doc["targets_ms"]), L, spec.dims.hidden_size, K, J)
    )
    r.load_state_dict(sd)
    return r.eval(), doc
