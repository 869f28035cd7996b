"""The elastic runtime: a stock transformers model whose layers run at a chosen (MLP width, heads).

We do not re-implement the decoder. Each projection that carries a unit (gate/up/down, q/k/v/o) is
swapped for an :class:`ElasticLinear` that shares the same Parameters and multiplies by the active
rows/columns only; transformers' own attention reshapes with ``-1`` heads, so the only other knob is
``num_key_value_groups`` (query heads per KV head) on each attention module. At full width every
selection is ``None`` and the forward is exactly transformers' forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flexcli.kernels import Selection, subset_linear

from ..arch.family import Architecture, by_family
from ..arch.spec import Config, ElasticSpec, unit_rows
from ..io import layout


class ElasticLinear(nn.Linear):
    """nn.Linear that computes only selected output rows / input columns of its (shared) weight."""

    out_sel: Selection = None
    in_sel: Selection = None

    @classmethod
    def wrap(cls, lin: nn.Linear) -> ElasticLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.bias = lin.bias
        new.out_sel = new.in_sel = None
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., active_in)
        if self.out_sel is None and self.in_sel is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return subset_linear(x, self.weight, self.bias, self.out_sel, self.in_sel)


def block_output(out) -> torch.Tensor:
    """A decoder layer's hidden state out of what its forward returned (a tensor, or a tuple led by it
    in older transformers)."""
    return out[0] if isinstance(out, tuple) else out


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


class ElasticModel:
    """Wraps a loaded *permuted* causal LM; ``set_config`` picks per-layer widths for later forwards."""

    def __init__(self, model: nn.Module, arch: Architecture, spec: ElasticSpec):
        self.model, self.arch, self.spec = model, arch, spec
        self.layers = list(_get(model, arch.layers))
        self._linears: list[dict[str, tuple[ElasticLinear, str | None, str | None]]] = []
        self._attn = [_get(layer, arch.attention) for layer in self.layers]
        for layer in self.layers:
            found = {}
            for path, (out_u, in_u) in arch.elastic_linears().items():
                lin = _get(layer, path)
                if not isinstance(lin, ElasticLinear):
                    lin = ElasticLinear.wrap(lin)
                    _set(layer, path, lin)
                found[path] = (lin, out_u, in_u)
            self._linears.append(found)
        # per layer, the (projection, "out_sel" | "in_sel") pairs an MLP width sets
        self._neurons = [
            [
                (lin, a)
                for lin, *units in found.values()
                for a, u in zip(("out_sel", "in_sel"), units)
                if u == "neuron"
            ]
            for found in self._linears
        ]
        self.config: Config = spec.full()
        self._index_cache: dict[int, tuple[Selection, Selection]] = {}

    def _head_sel(self, heads: int) -> tuple[Selection, Selection]:
        """(query-row selection, kv-row selection) for `heads` active query heads."""
        if heads not in self._index_cache:
            self._index_cache[heads] = self._new_head_sel(heads)
        return self._index_cache[heads]

    @torch.inference_mode(False)  # cached index tensors stay usable by autograd, whoever asks first
    def _new_head_sel(self, heads: int) -> tuple[Selection, Selection]:
        d = self.spec.dims
        if heads == d.num_heads:
            return None, None
        if self.spec.gqa == "group":
            return heads * d.head_dim, self.spec.kv_heads(heads) * d.head_dim
        q, _ = self.spec.head_index(heads)
        return unit_rows(q, d.head_dim), None

    def set_mlp(self, i: int, mlp: int) -> None:
        """Set layer i's MLP width: cheap enough to call per layer at every decode step (the selections
        are plain attributes, written past nn.Module.__setattr__'s checks)."""
        sel = None if mlp == self.spec.dims.intermediate_size else mlp
        for lin, attr in self._neurons[i]:
            lin.__dict__[attr] = sel

    def set_config(self, cfg: Config | None) -> None:
        """Activate per-layer (mlp, heads); None means the full model."""
        cfg = self.spec.full() if cfg is None else [(int(m), int(h)) for m, h in cfg]
        self.spec.check(cfg)
        for i, (m, h) in enumerate(cfg):
            self.set_layer(i, m, h)
        self.config = cfg

    def set_layer(self, i: int, mlp: int | None = None, heads: int | None = None) -> None:
        """Set one layer's MLP width and/or head count (None leaves it unchanged)."""
        if mlp is not None:
            self.set_mlp(i, mlp)
        if heads is None:
            return
        unit_sel: dict[str, Selection] = {}
        unit_sel["qhead"], unit_sel["kvhead"] = self._head_sel(heads)
        self._attn[i].num_key_value_groups = heads // self.spec.kv_heads(heads)
        for lin, out_u, in_u in self._linears[i].values():
            if out_u in unit_sel:
                lin.out_sel = unit_sel[out_u]
            if in_u in unit_sel:
                lin.in_sel = unit_sel[in_u]

    @contextmanager
    def configured(self, cfg: Config | None) -> Iterator[ElasticModel]:
        old = self.config
        self.set_config(cfg)
        try:
            yield self
        finally:
            self.set_config(old)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def load_elastic(path: str | Path, device: str = "cpu", dtype: str = "float32") -> ElasticModel:
    """Load an elastic checkpoint with transformers and wrap it in the elastic runtime."""
    from transformers import AutoModelForCausalLM

    spec = layout.read_spec(Path(path))
    arch = by_family(spec.family)
    model = AutoModelForCausalLM.from_pretrained(
        Path(path), dtype=getattr(torch, dtype), local_files_only=True, trust_remote_code=False
    )
    return ElasticModel(model.to(device).eval(), arch, spec)
