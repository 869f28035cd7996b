"""Activation-based importance of MLP neurons and attention heads (method.md §2.2).

neuron score s_i = sum over calibration tokens of |silu(gate_i . x) * (up_i . x)|   (input of down_proj)
head score, `norm`:   s_h = sum over tokens of ||a_h||_2                           (a = input of o_proj)
head score, `taylor`: s_h = sum over tokens of |a_h . dL/da_h|  (first-order loss change of removing h)

The Taylor score costs one backward pass per batch (gradients of activations only; weights get none).
On SmolLM2-135M it ranks heads better than the output norm whenever heads are removed within KV groups
(docs/RESULTS-real.md).

`compute_importance` scores a loaded model. `compute_importance_layerwise` scores a safetensors source
without ever loading it: one decoder layer at a time is read, cast to the compute dtype, run over every
calibration sequence and dropped, with the hidden states carried to the next layer (the way
llm-compressor and mergekit bound memory), so memory is one layer plus the activations, not the model.
Norm scores only: the Taylor score needs a backward pass through the whole network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..arch.dims import Dims
from ..arch.family import Architecture
from ..io.source import SourceModel
from .runtime import block_output

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
    acc = [_zeros(dims, device) for _ in layers]
    taylor = head_score == "taylor"

    def grad_entry(_mod, _args, out):  # activations need gradients; the weights stay frozen
        return out.requires_grad_()

    hooks = [h for i, layer in enumerate(layers) for h in _hook_layer(layer, arch, dims, acc[i], taylor)]
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


def _zeros(dims: Dims, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "neuron": torch.zeros(dims.intermediate_size, device=device),
        "qhead": torch.zeros(dims.num_heads, device=device),
    }


def _hook_layer(layer: nn.Module, arch: Architecture, dims: Dims, acc: dict[str, torch.Tensor], taylor: bool):
    """Pre-hooks on one decoder layer's down projection (neuron scores) and output projection (head
    scores) that add this forward's scores into `acc`; returns the hook handles."""

    def neuron_hook(_mod, args):
        acc["neuron"] += args[0].detach().float().abs().sum(dim=(0, 1))  # (batch, seq, F) -> (F,)

    def head_hook(_mod, args):
        a = args[0]  # (batch, seq, H * head_dim)
        if not taylor:
            heads = a.detach().float().unflatten(-1, (dims.num_heads, dims.head_dim))
            acc["qhead"] += heads.norm(dim=-1).sum(dim=(0, 1))
        elif a.requires_grad:
            act = a.detach()

            def on_grad(g):  # per token and head: |a_h . g_h|
                dot = (act.float() * g.float()).unflatten(-1, (dims.num_heads, dims.head_dim)).sum(-1)
                acc["qhead"] += dot.abs().sum(dim=(0, 1))

            a.register_hook(on_grad)

    return [
        layer.get_submodule(arch.tap("neuron")).register_forward_pre_hook(neuron_hook),
        layer.get_submodule(arch.tap("qhead")).register_forward_pre_hook(head_hook),
    ]


def layerwise_supported(src: Any, calib_shape: tuple[int, int], head_score: str) -> str | None:
    """Why `compute_importance_layerwise` should not score `src` on (n, seq_len) calibration sequences
    (None: it should). It carries every sequence's hidden states between layers, so it is chosen only
    when those are smaller than the model (4 x 128 tokens of a 7B model: 8 MB; 1024 x 2048: more
    values than the model has weights, so the whole model, which runs batch by batch, is smaller)."""
    if not isinstance(src, SourceModel) or src.pickle:
        return "layer-by-layer calibration reads safetensors sources"
    if head_score != "norm":
        return "the Taylor head score needs a backward pass through the whole model"
    n, seq_len = calib_shape
    window = src.config.get("sliding_window")
    if window is not None and src.config.get("use_sliding_window", True) and window < seq_len:
        return "sliding-window attention shorter than the calibration sequences"
    weights = sum(math.prod(shape) for _, _, shape in src.tensor_specs())
    if n * seq_len * src.dims.hidden_size >= weights:
        return "the calibration activations would outweigh the model"
    return None


@torch.no_grad()
def compute_importance_layerwise(
    src: SourceModel,
    seqs: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 4,
    on_layer: Callable[[int], None] | None = None,
    autocast: torch.dtype | None = None,
) -> Scores:
    """The norm scores of `compute_importance`, computed one decoder layer at a time from the source's
    files: each layer is read, cast to `dtype` on `device`, run over all (n, seq_len) sequences (under
    `autocast` when given, as the whole-model path runs) and freed; the hidden states (n, seq_len,
    hidden) in `dtype` are all that is carried between layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, dims = src.arch, src.dims
    config = AutoConfig.from_pretrained(src.path, local_files_only=True, trust_remote_code=False)
    config._attn_implementation = "sdpa"  # causal through SDPA's is_causal: no mask is built
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    base = skeleton.get_submodule(arch.layers.rsplit(".", 1)[0])  # the decoder stack ("model")
    rotary = type(base.rotary_emb)(skeleton.config).to(device)  # built for real: it holds buffers only
    embed_name = next(n for n, _ in skeleton.named_parameters() if n.endswith("embed_tokens.weight"))
    embed = src.read_tensors([embed_name])[embed_name].to(device, dtype)  # (vocab, hidden)
    hidden = nn.functional.embedding(seqs.to(device), embed)  # (n, seq, hidden)
    del embed
    pos = torch.arange(seqs.shape[1], device=device)[None]  # (1, seq)
    cos, sin = rotary(hidden[:1], pos)
    layers = skeleton.get_submodule(arch.layers)
    scores = []
    for i in range(dims.num_layers):
        prefix = f"{arch.layers}.{i}."
        layer = layers[i]
        state = src.read_tensors([n for n in src.tensor_names() if n.startswith(prefix)])
        layer.load_state_dict({k[len(prefix) :]: v.to(device, dtype) for k, v in state.items()}, assign=True)
        del state
        acc = _zeros(dims, device)
        hooks = _hook_layer(layer, arch, dims, acc, taylor=False)
        try:
            for b in range(0, hidden.shape[0], batch_size):
                h = hidden[b : b + batch_size]
                with torch.autocast(device.type, autocast, enabled=autocast is not None):
                    out = layer(h, position_ids=pos, position_embeddings=(cos, sin), attention_mask=None)
                hidden[b : b + batch_size] = block_output(out)
        finally:
            for hk in hooks:
                hk.remove()
        layers[i] = layer.to("meta")  # freed: only the next layer is ever resident
        scores.append({k: v.double().cpu() for k, v in acc.items()})
        if on_layer:
            on_layer(1)
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
