"""Physical slicing of a permuted model to a per-layer configuration.

`stream_sliced` reads a sub-model's tensors lazily from the elastic checkpoint (prefix slices where
possible) and `planned_specs` gives their shapes from the headers alone, for the streaming writer;
`slice_tensor` works on one in-memory tensor; `sliced_model`
builds an independent model out of transformers' own MLP and attention classes with per-layer sizes
(the reference the elastic runtime is tested against, and the in-memory form of an extracted model).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from ..arch.family import Architecture
from ..arch.spec import Config, ElasticSpec, unit_rows
from ..io.safetensors import ST_TO_TORCH, TensorSpec
from ..io.source import SourceModel


def unit_index(spec: ElasticSpec, unit: str, mlp: int, heads: int) -> torch.Tensor:
    """Row/column ids kept for `unit` ('neuron', 'qhead' or 'kvhead') at (mlp, heads)."""
    if unit == "neuron":
        return torch.arange(mlp)
    q, kv = spec.head_index(heads)
    return unit_rows(q if unit == "qhead" else kv, spec.dims.head_dim)


def slice_tensor(
    name: str, t: torch.Tensor, arch: Architecture, spec: ElasticSpec, cfg: Config
) -> torch.Tensor:
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
    """A new model, built from stock transformers classes, whose layers have the sliced sizes of `cfg`.

    Built on the meta device and filled by assignment: no weight is initialised and then overwritten.
    Sliced tensors are new contiguous copies; unsliced ones (embeddings, norms, LM head, full-width
    layers) and the buffers outside the state dict (rotary tables) are shared with `model`, so a
    sub-model costs only its sliced weights (the profiler opens one per timed configuration)."""
    spec.check(cfg)
    with torch.device("meta"):
        new = type(model)(copy.deepcopy(model.config))
        for i, (layer, (m, h)) in enumerate(zip(new.get_submodule(arch.layers), cfg)):
            lc = layer_hf_config(model.config, spec, m, h)
            setattr(layer, arch.mlp, type(getattr(layer, arch.mlp))(lc))
            setattr(layer, arch.attention, type(getattr(layer, arch.attention))(lc, layer_idx=i))
    state = {n: slice_tensor(n, t, arch, spec, cfg) for n, t in model.state_dict().items()}
    new.load_state_dict(state, strict=True, assign=True)
    for name, module in list(new.named_modules()):  # non-persistent buffers: the source's module
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, child, model.get_submodule(name))
    if getattr(model.config, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()


def planned_specs(src: SourceModel, spec: ElasticSpec, cfg: Config) -> list[TensorSpec]:
    """(name, dtype, shape) of every tensor of the sub-model, from the source's headers alone."""
    out = []
    for name, dtype, shape in src.tensor_specs():
        hit = src.arch.locate(name)
        if hit is not None:
            layer, unit, slot = hit
            shape = list(shape)
            shape[slot.dim] = len(unit_index(spec, unit, *cfg[layer]))
        out.append((name, dtype, shape))
    return out


def stream_sliced(
    src: SourceModel, spec: ElasticSpec, cfg: Config, overrides: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the sub-model in stored order, read lazily: prefix slices through safetensors'
    get_slice, so only the kept bytes are read. `overrides` replaces sliced tensors by name (the
    compensated output projections of elastic.compensate, already of the sliced shape)."""
    overrides = overrides or {}
    for f in src.weight_files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in overrides:
                    stored = ST_TO_TORCH[st.get_slice(name).get_dtype()]
                    yield name, overrides[name].to(stored).contiguous()
                    continue
                hit = src.arch.locate(name)
                if hit is None:
                    yield name, st.get_tensor(name)
                    continue
                layer, unit, slot = hit
                idx = unit_index(spec, unit, *cfg[layer])
                n = len(idx)
                if bool(torch.equal(idx, torch.arange(n))):  # a prefix: read only those rows / columns
                    sl = st.get_slice(name)
                    yield name, (sl[:n] if slot.dim == 0 else sl[:, :n]).contiguous()
                else:
                    yield name, st.get_tensor(name).index_select(slot.dim, idx).contiguous()
