"""Activation-based importance of MLP neurons and attention heads (method.md §2.2).

neuron score s_i = sum over calibration tokens of |silu(gate_i . x) * (up_i . x)|   (input of down_proj)
head score, `norm`:   s_h = sum over tokens of ||a_h||_2                           (a = input of o_proj)
head score, `taylor`: s_h = sum over tokens of |a_h . dL/da_h|  (first-order loss change of removing h)

The Taylor score costs one backward pass per batch (gradients of activations only; weights get none).
On SmolLM2-135M it ranks heads better than the output norm whenever heads are removed within KV groups
(docs/RESULTS-real.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..arch.dims import Dims
from ..arch.family import Architecture

Scores = list[dict[str, torch.Tensor]]  # per layer: {"neuron": (F,), "qhead": (H,)} float64
HEAD_SCORES = ("norm", "taylor")


def compute_importance(
    model: nn.Module,
    arch: Architecture,
    dims: Dims,
    seqs: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
    head_score: str = "norm",
    autocast: torch.dtype | None = None,
) -> Scores:
    """Stream (n, seq_len) token sequences through `model` and accumulate per-unit scores. Scores
    accumulate on the model's device in fp32 (no host sync per batch) and are returned as float64."""
    if head_score not in HEAD_SCORES:
        raise ValueError(f"head_score must be one of {HEAD_SCORES}, got {head_score!r}")
    device = next(model.parameters()).device
    layers = model.get_submodule(arch.layers)
    acc = [
        {
            "neuron": torch.zeros(dims.intermediate_size, device=device),
            "qhead": torch.zeros(dims.num_heads, device=device),
        }
        for _ in layers
    ]
    taylor = head_score == "taylor"

    def neuron_hook(i: int):
        def hook(_mod, args):
            acc[i]["neuron"] += args[0].detach().float().abs().sum(dim=(0, 1))  # (batch, seq, F) -> (F,)

        return hook

    def head_hook(i: int):
        def hook(_mod, args):
            a = args[0]  # (batch, seq, H * head_dim)
            if not taylor:
                heads = a.detach().float().unflatten(-1, (dims.num_heads, dims.head_dim))
                acc[i]["qhead"] += heads.norm(dim=-1).sum(dim=(0, 1))
            elif a.requires_grad:
                act = a.detach()

                def on_grad(g):  # per token and head: |a_h . g_h|
                    dot = (act.float() * g.float()).unflatten(-1, (dims.num_heads, dims.head_dim)).sum(-1)
                    acc[i]["qhead"] += dot.abs().sum(dim=(0, 1))

                a.register_hook(on_grad)

        return hook

    def grad_entry(_mod, _args, out):  # activations need gradients; the weights stay frozen
        return out.requires_grad_()

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.get_submodule(arch.tap("neuron")).register_forward_pre_hook(neuron_hook(i)))
        hooks.append(layer.get_submodule(arch.tap("qhead")).register_forward_pre_hook(head_hook(i)))
    if taylor:
        hooks.append(model.get_input_embeddings().register_forward_hook(grad_entry))
    was_training = model.training
    frozen = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        for b in range(0, seqs.shape[0], batch_size):
            x = seqs[b : b + batch_size].to(device)
            with torch.autocast(device.type, autocast, enabled=autocast is not None):
                if taylor:
                    with torch.enable_grad():
                        logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (batch, seq-1, vocab)
                        loss = nn.functional.cross_entropy(
                            logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
                        )
                        loss.backward()
                else:
                    with torch.inference_mode():
                        model(input_ids=x, use_cache=False)
            if on_batch:
                on_batch(min(batch_size, seqs.shape[0] - b))
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)
        model.train(was_training)
    return [{k: v.double().cpu() for k, v in s.items()} for s in acc]


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
