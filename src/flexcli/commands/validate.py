"""`flex validate`: check a source, elastic or extracted checkpoint without trusting any of it.

Every problem is collected (file, tensor, expected, found) instead of stopping at the first one: the
shared inspector (io.source: config, headers, index vs files, names and shapes vs the family
descriptor), NaN/Inf (streamed one tensor at a time), and flexcli's own metadata (spec, permutations,
routers, latency tables) against the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch.spec import ElasticSpec
from ..errors import FlexError, UsageError
from ..io import layout
from ..io.source import Inspection, Problem, inspect


@dataclass
class ValidateResult:
    path: str
    kind: str  # source | elastic | extracted
    valid: bool
    tensors: int
    problems: list[Problem] = field(default_factory=list)


def validate(path: Path, check_data: bool = True) -> ValidateResult:
    """Validate the checkpoint directory `path`; problems are returned, not raised."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} does not exist or is not a directory")
    kind = (
        "elastic"
        if layout.is_elastic(path)
        else "extracted"
        if (path / layout.EXTRACT).exists()
        else "source"
    )
    ins = inspect(path, strict=True, per_layer=True)
    if check_data and ins.headers and not ins.problems:
        _scan_values(ins)
    if kind == "elastic" and ins.config is not None and ins.dims is not None:
        _check_elastic(ins)
    tensors = sum(len(h) for h in ins.headers.values())
    return ValidateResult(str(path), kind, not ins.problems, tensors, ins.problems)


def _scan_values(ins: Inspection) -> None:
    for f in ins.headers:
        with safe_open(str(ins.path / f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    ins.bad(f, "NaN or Inf values", name, "finite", "non-finite")


def _check_elastic(ins: Inspection) -> None:
    """The manifest's spec against config.json, permutations, router tensors vs their record, latency
    tables' choice lists vs the spec."""
    dims = ins.dims
    assert dims is not None
    try:
        spec = ElasticSpec.from_dict(layout.read_json(ins.path / layout.ELASTIC)["spec"])
    except (OSError, KeyError, TypeError, FlexError) as e:
        ins.bad(layout.ELASTIC, f"invalid: {e}")
        return
    if spec.dims != dims:
        ins.bad(layout.ELASTIC, "spec dims differ from config.json", None, str(dims), str(spec.dims))
    for i, lc in enumerate(spec.layers):
        if lc.mlp != sorted(lc.mlp, reverse=True) or lc.mlp[0] != dims.intermediate_size or min(lc.mlp) < 1:
            ins.bad(
                layout.ELASTIC,
                f"layer {i}: MLP choices must descend from {dims.intermediate_size}",
                None,
                None,
                lc.mlp,
            )
        step = dims.num_kv_heads if spec.gqa == "query" else dims.group_size
        if lc.heads[0] != dims.num_heads or any(h % step or h < 1 for h in lc.heads):
            ins.bad(
                layout.ELASTIC,
                f"layer {i}: head choices must be multiples of {step} up to {dims.num_heads}",
                None,
                None,
                lc.heads,
            )
    t = layout.read_importance_tensors(ins.path)
    for i in range(dims.num_layers if t else 0):
        for unit, n in (
            ("neuron", dims.intermediate_size),
            ("qhead", dims.num_heads),
            ("kvhead", dims.num_kv_heads),
        ):
            p = t.get(f"layers.{i}.{unit}_perm")
            if p is None or sorted(p.tolist()) != list(range(n)):
                ins.bad(
                    layout.IMPORTANCE, "not a permutation", f"layers.{i}.{unit}_perm", f"0..{n - 1}", None
                )
    try:
        layout.read_routers(ins.path)
    except UsageError:
        ins.bad(layout.ROUTERS_TENSORS, "router tensors missing or not the ones flex_routers.json describes")
    try:
        regimes = layout.read_latency(ins.path)["regimes"]
    except (UsageError, KeyError):
        ins.bad(layout.LATENCY, "invalid latency file")
        return
    for key, tab in regimes.items():
        if tab.get("mlp") != [lc.mlp for lc in spec.layers] or tab.get("heads") != [
            lc.heads for lc in spec.layers
        ]:
            ins.bad(layout.LATENCY, "latency table choice lists differ from the elastic spec", key)
