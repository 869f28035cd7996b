"""Per-family architecture descriptors (data in arch/families/*.yaml).

A descriptor lists every tensor of a checkpoint with its shape as a function of the model's sizes, and
which unit (MLP neuron, query head, KV head) each row or column block belongs to. Everything that
depends on a family's tensor names derives from it: permutation and slicing (`locate`), the elastic and
input-adaptive runtimes (module paths), expected shapes for inspection and `flex validate`, and
parameter counts. Adding a family is one YAML file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from ..errors import UsageError
from .dims import Dims

UNITS = ("neuron", "qhead", "kvhead")
SYMBOLS = ("vocab", "hidden", "ffn", "q", "kv")


@dataclass(frozen=True)
class LayerSizes:
    """One decoder layer's widths."""

    ffn: int  # MLP neurons
    heads: int  # query heads
    kv_heads: int


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the checkpoint: its name, shape in symbols, and the unit it carries along `dim`."""

    tensor: str  # relative to the layer for layer tensors, e.g. "mlp.down_proj.weight"
    shape: tuple[str, ...]  # symbols of SYMBOLS
    unit: str | None = None  # neuron | qhead | kvhead | None
    dim: int = 0  # 0 = rows (Linear output), 1 = columns (Linear input)
    when: str | None = None  # config flag that must be true for the tensor to exist
    unless: str | None = None  # config flag that must be false

    @property
    def module(self) -> str:
        """Module path of the owning nn.Module, e.g. "mlp.down_proj"."""
        return self.tensor.rsplit(".", 1)[0]

    def present(self, config: dict[str, Any]) -> bool:
        return (self.when is None or bool(config.get(self.when))) and (
            self.unless is None or not config.get(self.unless)
        )


@dataclass(frozen=True)
class Architecture:
    """The tensors of one model family, and which of them move with one neuron, query head or KV head."""

    family: str
    architectures: tuple[str, ...]
    layers: str  # module path of the decoder layer list, e.g. "model.layers"
    mlp_roles: dict[str, str]  # gate / up / down -> module path inside a layer
    attention: str  # module path of the attention block inside a layer, e.g. "self_attn"
    model_tensors: tuple[TensorSlot, ...]
    layer_tensors: tuple[TensorSlot, ...]

    @property
    def mlp(self) -> str:
        """Module path of the MLP block inside a layer, e.g. "mlp"."""
        return self.mlp_roles["down"].rsplit(".", 1)[0]

    def unit_slots(self, unit: str) -> tuple[TensorSlot, ...]:
        return tuple(s for s in self.layer_tensors if s.unit == unit)

    def elastic_linears(self) -> dict[str, tuple[str | None, str | None]]:
        """Map module path -> (unit indexing its output rows, unit indexing its input columns)."""
        out: dict[str, list[str | None]] = {}
        for s in self.layer_tensors:
            if s.unit is not None and s.tensor.endswith(".weight"):
                out.setdefault(s.module, [None, None])[s.dim] = s.unit
        return {k: (v[0], v[1]) for k, v in out.items()}

    def tap(self, unit: str) -> str:
        """Module whose *input* is the per-unit activation used for importance (down_proj, o_proj)."""
        for s in self.unit_slots(unit):
            if s.dim == 1 and s.tensor.endswith(".weight"):
                return s.module
        raise KeyError(unit)

    def locate(self, name: str) -> tuple[int, str, TensorSlot] | None:
        """(layer, unit, slot) of a checkpoint tensor that carries a unit, else None."""
        head = self.layers + "."
        if not name.startswith(head):
            return None
        idx, _, rel = name[len(head) :].partition(".")
        if not idx.isdigit():
            return None
        slot = self._by_name.get(rel)
        return None if slot is None or slot.unit is None else (int(idx), slot.unit, slot)

    def __post_init__(self) -> None:  # an O(1) tensor locator (checkpoints have thousands of tensors)
        object.__setattr__(self, "_by_name", {s.tensor: s for s in self.layer_tensors})

    def expected_shapes(
        self, config: dict[str, Any], dims: Dims, layers: list[LayerSizes] | None = None
    ) -> dict[str, list[int]]:
        """Every tensor name -> shape for `config` (per-layer sizes from `layers`, default uniform)."""
        layers = (
            layers
            or [LayerSizes(dims.intermediate_size, dims.num_heads, dims.num_kv_heads)] * dims.num_layers
        )
        env = {"vocab": dims.vocab_size, "hidden": dims.hidden_size}
        out = {s.tensor: [env[x] for x in s.shape] for s in self.model_tensors if s.present(config)}
        for i, ls in enumerate(layers):
            sizes = {**env, "ffn": ls.ffn, "q": ls.heads * dims.head_dim, "kv": ls.kv_heads * dims.head_dim}
            for s in self.layer_tensors:
                if s.present(config):
                    out[f"{self.layers}.{i}.{s.tensor}"] = [sizes[x] for x in s.shape]
        return out

    def param_count(self, config: dict[str, Any], dims: Dims, layers: list[LayerSizes]) -> int:
        """Parameters of a model with these per-layer sizes (a tied LM head counted once)."""
        return sum(math.prod(s) for s in self.expected_shapes(config, dims, layers).values())


def _slot(raw: dict[str, Any], where: str) -> TensorSlot:
    try:
        slot = TensorSlot(
            raw["tensor"],
            tuple(raw["shape"]),
            raw.get("unit"),
            int(raw.get("dim", 0)),
            raw.get("if"),
            raw.get("unless"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid tensor entry {raw!r} ({e})") from None
    if slot.unit not in (None, *UNITS) or any(x not in SYMBOLS for x in slot.shape):
        raise ValueError(f"{where}: unknown unit or shape symbol in {raw!r}")
    return slot


def _load(name: str) -> Architecture:
    raw = yaml.safe_load(resources.files("flexcli.arch").joinpath("families", name).read_text())
    return Architecture(
        raw["family"],
        tuple(raw["architectures"]),
        raw["layers"],
        dict(raw["mlp"]),
        raw["attention"],
        tuple(_slot(s, name) for s in raw["model"]),
        tuple(_slot(s, name) for s in raw["layer"]),
    )


@cache
def all_architectures() -> tuple[Architecture, ...]:
    """Every family descriptor shipped with flexcli."""
    files = sorted(
        p.name
        for p in resources.files("flexcli.arch").joinpath("families").iterdir()
        if p.name.endswith(".yaml")
    )
    return tuple(_load(f) for f in files)


def supported_names() -> list[str]:
    return sorted(a for arch in all_architectures() for a in arch.architectures)


def by_family(family: str) -> Architecture:
    """The descriptor of a family name as stored in an elastic spec."""
    for arch in all_architectures():
        if arch.family == family:
            return arch
    raise UsageError(f"unknown model family {family!r}; flexcli supports {', '.join(supported_names())}")


def detect(config: dict[str, Any]) -> Architecture:
    """Pick the descriptor for a config.json dict, or raise a one-line error naming what is supported."""
    names = config.get("architectures") or []
    for arch in all_architectures():
        if any(n in arch.architectures for n in names):
            return arch
    got = ", ".join(names) if names else f"model_type={config.get('model_type')!r}"
    raise UsageError(f"unsupported architecture {got}; flexcli supports {', '.join(supported_names())}")
