"""Activation-based importance of MLP neurons and attention heads (method.md §2.2).

neuron score s_i = sum over calibration tokens of |silu(gate_i . x) * (up_i . x)|  (input of down_proj)
head score   s_h = sum over calibration tokens of ||head_h(x)||_2                   (input of o_proj)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..arch.dims import Dims
from ..arch.family import Architecture

Scores = list[dict[str, torch.Tensor]]  # per layer: {"neuron": (F,), "qhead": (H,)} float64


@torch.no_grad()
def compute_importance(
    model: nn.Module,
    arch: Architecture,
    dims: Dims,
    seqs: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> Scores:
    """Stream (n, seq_len) token sequences through `model` and accumulate per-unit scores."""
    device = next(model.parameters()).device
    layers = model.get_submodule(arch.layers)
    scores: Scores = [
        {
            "neuron": torch.zeros(dims.intermediate_size, dtype=torch.float64),
            "qhead": torch.zeros(dims.num_heads, dtype=torch.float64),
        }
        for _ in layers
    ]
    hooks = []

    def neuron_hook(i: int):
        def hook(_mod, args):
            x = args[0]  # (batch, seq, F)
            scores[i]["neuron"] += x.detach().float().abs().sum(dim=(0, 1)).double().cpu()

        return hook

    def head_hook(i: int):
        def hook(_mod, args):
            x = args[0]  # (batch, seq, H * head_dim)
            x = x.detach().float().unflatten(-1, (dims.num_heads, dims.head_dim))  # (batch, seq, H, head_dim)
            scores[i]["qhead"] += x.norm(dim=-1).sum(dim=(0, 1)).double().cpu()

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.get_submodule(arch.tap("neuron")).register_forward_pre_hook(neuron_hook(i)))
        hooks.append(layer.get_submodule(arch.tap("qhead")).register_forward_pre_hook(head_hook(i)))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, seqs.shape[0], batch_size):
            model(input_ids=seqs[b : b + batch_size].to(device), use_cache=False)
            if on_batch:
                on_batch(min(batch_size, seqs.shape[0] - b))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return scores


def random_scores(dims: Dims, seed: int) -> Scores:
    """Scores that induce a seeded random order (the ablation baseline)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "neuron": torch.rand(dims.intermediate_size, generator=g, dtype=torch.float64),
            "qhead": torch.rand(dims.num_heads, generator=g, dtype=torch.float64),
        }
        for _ in range(dims.num_layers)
    ]
