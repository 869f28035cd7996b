"""Per-family architecture descriptors (data in architectures/*.yaml) and model dimensions."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from .errors import UsageError

UNITS = ("neuron", "qhead", "kvhead")


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a decoder layer that carries a unit along axis `dim`."""

    tensor: str  # name relative to the layer, e.g. "mlp.down_proj.weight"
    dim: int  # 0 = rows (Linear output), 1 = columns (Linear input)
    optional: bool = False

    @property
    def module(self) -> str:
        """Module path of the owning nn.Linear, e.g. "mlp.down_proj"."""
        return self.tensor.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Architecture:
    """Which tensors move together with one MLP neuron, one query head and one KV head."""

    family: str
    architectures: tuple[str, ...]
    layers: str  # module path of the decoder layer list, e.g. "model.layers"
    units: dict[str, tuple[TensorSlot, ...]]

    def elastic_linears(self) -> dict[str, tuple[str | None, str | None]]:
        """Map module path -> (unit indexing its output rows, unit indexing its input columns)."""
        out: dict[str, list[str | None]] = {}
        for unit, slots in self.units.items():
            for s in slots:
                if not s.tensor.endswith(".weight"):
                    continue
                out.setdefault(s.module, [None, None])[s.dim] = unit
        return {k: (v[0], v[1]) for k, v in out.items()}

    def tap(self, unit: str) -> str:
        """Module whose *input* is the per-unit activation used for importance (down_proj, o_proj)."""
        for s in self.units[unit]:
            if s.dim == 1 and s.tensor.endswith(".weight"):
                return s.module
        raise KeyError(unit)

    def locate(self, name: str) -> tuple[int, str, TensorSlot] | None:
        """(layer, unit, slot) of a checkpoint tensor that carries a unit, else None."""
        head = self.layers + "."
        if not name.startswith(head):
            return None
        idx, _, rel = name[len(head):].partition(".")
        if not idx.isdigit():
            return None
        hit = self.unit_of_tensor(rel)
        return None if hit is None else (int(idx), *hit)

    def unit_of_tensor(self, rel_name: str) -> tuple[str, TensorSlot] | None:
        for unit, slots in self.units.items():
            for s in slots:
                if s.tensor == rel_name:
                    return unit, s
        return None


def _load(name: str) -> Architecture:
    text = resources.files("flexcli").joinpath("architectures", name).read_text()
    raw = yaml.safe_load(text)
    units = {
        u: tuple(TensorSlot(s["tensor"], int(s["dim"]), bool(s.get("optional", False))) for s in raw["units"][u])
        for u in UNITS
    }
    return Architecture(raw["family"], tuple(raw["architectures"]), raw["layers"], units)


@cache
def all_architectures() -> tuple[Architecture, ...]:
    """Every family descriptor shipped with flexcli."""
    files = sorted(p.name for p in resources.files("flexcli").joinpath("architectures").iterdir()
                   if p.name.endswith(".yaml"))
    return tuple(_load(f) for f in files)


def supported_names() -> list[str]:
    return sorted(a for arch in all_architectures() for a in arch.architectures)


def detect(config: dict[str, Any]) -> Architecture:
    """Pick the descriptor for a config.json dict, or raise a one-line error naming what is supported."""
    names = config.get("architectures") or []
    for arch in all_architectures():
        if any(n in arch.architectures for n in names):
            return arch
    got = ", ".join(names) if names else f"model_type={config.get('model_type')!r}"
    raise UsageError(f"unsupported architecture {got}; flexcli supports {', '.join(supported_names())}")


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder-only model that matter for elasticity."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head (n_rep)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Dims:
        try:
            heads = int(c["num_attention_heads"])
            kv = int(c.get("num_key_value_heads") or heads)
            hd = c.get("head_dim") or int(c["hidden_size"]) // heads
            inter = c["intermediate_size"]
            if isinstance(inter, list):
                raise UsageError("config.json has per-layer intermediate_size; convert needs a uniform source model")
            d = cls(int(c["num_hidden_layers"]), int(c["hidden_size"]), int(inter), heads, kv, int(hd),
                    int(c["vocab_size"]), bool(c.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"config.json is missing or has an invalid field: {e}") from None
        if heads % kv:
            raise UsageError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return d
