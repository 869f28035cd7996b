"""The elastic spec: per-layer width choices, and the rule that maps a head count to kept heads.

GQA rule. Query heads are stored group-major (head q belongs to KV group q // group_size), and the
permutation sorts KV groups by summed importance and query heads by importance inside their group, so
both rules below are prefix rules:

* ``gqa: group`` (default) drops whole KV groups with their query heads: a prefix of ``h / group_size``
  groups, so the KV cache shrinks too; choices are multiples of ``group_size``.
* ``gqa: query`` keeps every KV group and the first ``h / num_kv_heads`` query heads of each group: the
  KV cache keeps its size, choices are multiples of ``num_kv_heads``.

On SmolLM2-135M (9 query heads, 3 KV groups), keeping 6 heads by whole groups gives held-out
perplexity 30 (code) / 42 (prose) against 421 / 206 for two heads per group; 3 heads: 316 / 510 against
49,708 / 37,228 (docs/results/heads_smollm2.json). A real GQA model wants whole groups removed.

Plain multi-head attention (one query head per KV head) always uses ``group`` (a head and its K/V go
together); multi-query attention (one KV head) always uses ``query``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import UsageError
from .dims import Dims
from .family import LayerSizes

LayerConfig = tuple[int, int]  # (active MLP neurons, active query heads)
Config = list[LayerConfig]  # one per decoder layer
Draw = Callable[[int], int]  # draw(n): a random index in [0, n) from the caller's generator
SAMPLING = ("layerwise", "uniform")


def effective_gqa_mode(dims: Dims, mode: str) -> str:
    if mode not in ("query", "group"):
        raise UsageError(f"gqa mode must be 'query' or 'group', got {mode!r}")
    if dims.group_size == 1:
        return "group"
    if dims.num_kv_heads == 1:
        return "query"
    return mode


# Values per quantization block along a row, by llama.cpp type family: a row (ffn_down's input is the MLP
# width, attn_output's is heads x head_dim) that is not whole blocks falls back to a larger type.
QUANT_BLOCKS = {"k": 256, "legacy": 32}  # K-quants and iq4_xs | q4_0, q5_0, q8_0, iq4_nl, ...


def round_mlp(width: float, total: int, multiple: int, block: int = 1) -> int:
    """Round a neuron count to a multiple (shrunk for tiny layers so choices stay distinct); with a
    quantization `block`, to a multiple of it too, never shrunk below it."""
    m = multiple
    while m > 1 and m * 8 > total:
        m //= 2
    m = math.lcm(m, block)
    return int(min(total, max(m, round(width / m) * m)))


def round_heads(heads: float, dims: Dims, mode: str, block: int = 1) -> int:
    """Round a head count to whole KV groups (or query heads per group); with a quantization `block`,
    also so heads x head_dim is whole blocks (none may fit: then only the full count remains)."""
    step = dims.num_kv_heads if mode == "query" else dims.group_size
    step = math.lcm(step, block // math.gcd(block, dims.head_dim))
    return int(min(dims.num_heads, max(step, round(heads / step) * step)))


@dataclass
class LayerChoices:
    mlp: list[int]  # descending, index 0 = full width
    heads: list[int]  # descending, index 0 = all query heads


@dataclass
class ElasticSpec:
    """Which widths each layer may take. Stored as ``flex_elastic.json['spec']``."""

    family: str
    dims: Dims
    gqa: str
    layers: list[LayerChoices] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        family: str,
        dims: Dims,
        mlp_ratios: list[float],
        head_ratios: list[float],
        mlp_multiple: int = 64,
        gqa: str = "group",
        quant_blocks: str | None = None,
    ) -> ElasticSpec:
        """Choices from ratios of the full width; `quant_blocks` ("k" | "legacy") keeps every narrowed
        row a whole number of that family's quantization blocks (the full widths are the model's own)."""
        mode = effective_gqa_mode(dims, gqa)
        if quant_blocks is not None and quant_blocks not in QUANT_BLOCKS:
            raise UsageError(f"quant_blocks must be one of {', '.join(QUANT_BLOCKS)}, got {quant_blocks!r}")
        block = QUANT_BLOCKS.get(quant_blocks or "", 1)
        F = dims.intermediate_size
        mlp = sorted({F} | {round_mlp(r * F, F, mlp_multiple, block) for r in mlp_ratios}, reverse=True)
        heads = sorted(
            {dims.num_heads} | {round_heads(r * dims.num_heads, dims, mode, block) for r in head_ratios},
            reverse=True,
        )
        return cls(family, dims, mode, [LayerChoices(list(mlp), list(heads)) for _ in range(dims.num_layers)])

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "dims": asdict(self.dims),
            "gqa": self.gqa,
            "layers": [asdict(lc) for lc in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ElasticSpec:
        try:
            return cls(
                d["family"],
                Dims(**d["dims"]),
                d["gqa"],
                [LayerChoices(list(x["mlp"]), list(x["heads"])) for x in d["layers"]],
            )
        except (KeyError, TypeError) as e:
            raise UsageError(f"invalid elastic spec: {e}") from None

    # -- configurations ------------------------------------------------------------------------------
    def full(self) -> Config:
        return [(self.dims.intermediate_size, self.dims.num_heads)] * self.dims.num_layers

    def smallest(self) -> Config:
        return [(lc.mlp[-1], lc.heads[-1]) for lc in self.layers]

    def uniform(self, mlp_ratio: float, head_ratio: float) -> Config:
        """Per layer, the choice nearest to the given fractions (ties go to the smaller)."""

        def pick(choices: list[int], target: float) -> int:
            return min(reversed(choices), key=lambda c: abs(c - target))

        return [
            (
                pick(lc.mlp, mlp_ratio * self.dims.intermediate_size),
                pick(lc.heads, head_ratio * self.dims.num_heads),
            )
            for lc in self.layers
        ]

    def uniform_configs(self) -> list[Config]:
        """Every configuration with the same (MLP, heads) choice index in all layers."""
        return [
            [(lc.mlp[k], lc.heads[j]) for lc in self.layers]
            for k in range(len(self.layers[0].mlp))
            for j in range(len(self.layers[0].heads))
        ]

    def sample(self, draw: Draw, sampling: str = "layerwise") -> Config:
        """A random sub-network: independent choices per layer ("layerwise"), or one choice index shared by
        every layer ("uniform"). `draw` supplies the randomness, so each caller keeps its own generator."""
        if sampling == "uniform":
            k, j = draw(len(self.layers[0].mlp)), draw(len(self.layers[0].heads))
            return [
                (lc.mlp[min(k, len(lc.mlp) - 1)], lc.heads[min(j, len(lc.heads) - 1)]) for lc in self.layers
            ]
        if sampling != "layerwise":
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        return [(lc.mlp[draw(len(lc.mlp))], lc.heads[draw(len(lc.heads))]) for lc in self.layers]

    def layer_sizes(self, cfg: Config) -> list[LayerSizes]:
        """Per-layer (MLP, query heads, KV heads) of a configuration."""
        return [LayerSizes(m, h, self.kv_heads(h)) for m, h in cfg]

    def check(self, cfg: Config) -> None:
        """Raise UsageError unless every layer's widths are among its choices."""
        if len(cfg) != self.dims.num_layers:
            raise UsageError(f"configuration has {len(cfg)} layers, model has {self.dims.num_layers}")
        for i, ((m, h), lc) in enumerate(zip(cfg, self.layers)):
            if m not in lc.mlp or h not in lc.heads:
                raise UsageError(
                    f"layer {i}: (mlp={m}, heads={h}) not in choices mlp={lc.mlp} heads={lc.heads}"
                )

    def kv_heads(self, heads: int) -> int:
        """KV heads kept when `heads` query heads are active."""
        return self.dims.num_kv_heads if self.gqa == "query" else heads // self.dims.group_size

    def head_index(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept (query head ids, kv head ids) in the permuted layout, both ascending."""
        d = self.dims
        kv = self.kv_heads(heads)
        if self.gqa == "group":
            return torch.arange(heads), torch.arange(kv)
        per_group = heads // d.num_kv_heads
        q = torch.arange(d.num_kv_heads)[:, None] * d.group_size + torch.arange(per_group)[None, :]
        return q.flatten(), torch.arange(kv)


def unit_rows(head_ids: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Expand head ids to the row/column ids of their head_dim-sized blocks."""
    return (head_ids[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def config_to_json(cfg: Config) -> list[dict[str, int]]:
    return [{"mlp": int(m), "heads": int(h)} for m, h in cfg]


def config_from_json(obj: Any) -> Config:
    try:
        return [(int(x["mlp"]), int(x["heads"])) for x in obj]
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"invalid configuration: expected a list of {{mlp, heads}} objects ({e})") from None
