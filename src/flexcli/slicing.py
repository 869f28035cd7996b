"""Physical slicing of a permuted model to a per-layer configuration.

`slice_tensor` works on one checkpoint tensor at a time (for streaming extraction); `sliced_model`
builds an independent model out of transformers' own MLP and attention classes with per-layer sizes
(the reference the elastic runtime is tested against, and the in-memory form of an extracted model).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .arch import Architecture
from .spec import Config, ElasticSpec, unit_rows


def unit_index(spec: ElasticSpec, unit: str, mlp: int, heads: int) -> torch.Tensor:
    """Row/column ids kept for `unit` ('neuron', 'qhead' or 'kvhead') at (mlp, heads)."""
    if unit == "neuron":
        return torch.arange(mlp)
    q, kv = spec.head_index(heads)
    return unit_rows(q if unit == "qhead" else kv, spec.dims.head_dim)


def slice_tensor(name: str, t: torch.Tensor, arch: Architecture, spec: ElasticSpec, cfg: Config) -> torch.Tensor:
    """Slice one checkpoint tensor to the layer configuration it belongs to (others pass through)."""
    hit = arch.locate(name)
    if hit is None:
        return t
    layer, unit, slot = hit
    idx = unit_index(spec, unit, *cfg[layer])
    if idx.numel() == t.shape[slot.dim]:
        return t
    return t.index_select(slot.dim, idx.to(t.device)).contiguous()


def layer_hf_config(config, spec: ElasticSpec, mlp: int, heads: int):
    """A copy of the HF config with one layer's sizes (head_dim pinned, since heads shrink)."""
    c = copy.deepcopy(config)
    c.intermediate_size = mlp
    c.num_attention_heads = heads
    c.num_key_value_heads = spec.kv_heads(heads)
    c.head_dim = spec.dims.head_dim
    return c


@torch.no_grad()
def sliced_model(model: nn.Module, arch: Architecture, spec: ElasticSpec, cfg: Config) -> nn.Module:
    """A new model, built from stock transformers classes, whose layers have the sliced sizes of `cfg`."""
    spec.check(cfg)
    new = type(model)(copy.deepcopy(model.config)).to(next(model.parameters()).dtype)
    mlp_name = arch.tap("neuron").rsplit(".", 1)[0]
    attn_name = arch.tap("qhead").rsplit(".", 1)[0]
    for i, (layer, (m, h)) in enumerate(zip(new.get_submodule(arch.layers), cfg)):
        lc = layer_hf_config(model.config, spec, m, h)
        setattr(layer, mlp_name, type(getattr(layer, mlp_name))(lc))
        setattr(layer, attn_name, type(getattr(layer, attn_name))(lc, layer_idx=i))
    state = {n: slice_tensor(n, t, arch, spec, cfg) for n, t in model.state_dict().items()}
    new.load_state_dict(state, strict=True)
    if getattr(model.config, "tie_word_embeddings", False):
        new.tie_weights()
    return new.to(next(model.parameters()).device).eval()
