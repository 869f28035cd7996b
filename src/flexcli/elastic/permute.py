"""Function-preserving permutation: reorder each layer's neurons and heads by descending importance.

GQA-aware: KV groups are sorted by the summed score of their query heads (k/v row blocks move with
their query heads), and query heads are sorted by score inside their group, so both GQA pruning rules
of :mod:`flexcli.arch.spec` are prefix rules in the permuted layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch.dims import Dims
from ..arch.family import Architecture
from ..arch.spec import unit_rows
from .importance import Scores

Perms = list[
    dict[str, torch.Tensor]
]  # per layer: {"neuron": (F,), "qhead": (H,), "kvhead": (KV,)} new->old ids


def _argsort_desc(s: torch.Tensor) -> torch.Tensor:
    return torch.argsort(s, descending=True, stable=True)


def permutations(scores: Scores, dims: Dims) -> Perms:
    """Per layer, new position -> old unit id for neurons, query heads and KV heads."""
    out = []
    g = dims.group_size
    for s in scores:
        q = s["qhead"].view(dims.num_kv_heads, g)  # (kv, group)
        kv_perm = _argsort_desc(q.sum(dim=1))
        q_perm = torch.cat([k * g + _argsort_desc(q[k]) for k in kv_perm.tolist()])
        out.append({"neuron": _argsort_desc(s["neuron"]), "qhead": q_perm, "kvhead": kv_perm})
    return out


def identity_permutations(dims: Dims) -> Perms:
    return [
        {
            "neuron": torch.arange(dims.intermediate_size),
            "qhead": torch.arange(dims.num_heads),
            "kvhead": torch.arange(dims.num_kv_heads),
        }
        for _ in range(dims.num_layers)
    ]


def permute_tensor(name: str, t: torch.Tensor, arch: Architecture, dims: Dims, perms: Perms) -> torch.Tensor:
    """Apply the permutation to one checkpoint tensor (unchanged if it carries no unit)."""
    hit = arch.locate(name)
    if hit is None:
        return t
    i, unit, slot = hit
    idx = perms[i][unit] if unit == "neuron" else unit_rows(perms[i][unit], dims.head_dim)
    return t.index_select(slot.dim, idx.to(t.device))


@torch.no_grad()
def permute_model_(model: nn.Module, arch: Architecture, dims: Dims, perms: Perms) -> None:
    """Permute a loaded model's parameters in place."""
    for name, p in model.named_parameters():
        new = permute_tensor(name, p.data, arch, dims, perms)
        if new is not p.data:
            p.data.copy_(new)
