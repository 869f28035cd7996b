"""The sizes of a decoder-only model that matter for elasticity, read from config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError


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
                raise UsageError(
                    "config.json has per-layer intermediate_size; convert needs a uniform source model"
                )
            d = cls(
                int(c["num_hidden_layers"]),
                int(c["hidden_size"]),
                int(inter),
                heads,
                kv,
                int(hd),
                int(c["vocab_size"]),
                bool(c.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"config.json is missing or has an invalid field: {e}") from None
        if heads % kv:
            raise UsageError(
                f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        return d
