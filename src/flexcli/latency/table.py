"""The latency lookup table (stored in flex_latency.json) and the latency model built on it (method.md §2.5).

    predicted(cfg) = scale * (fixed_ms + sum_l ms[l][mlp_l][heads_l])

Entries are *joint* per-layer (MLP width x heads) times measured in full-size context (a whole model
at a uniform width, divided per layer), not isolated matrices. `scale` is an optional per-regime
correction fitted on a few measured configurations (1.0 when not fitted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch.spec import Config
from ..errors import InfeasibleError, UsageError
from ..io import layout


@dataclass(frozen=True)
class Regime:
    """What a table is valid for. Its key names it in the file and on the command line."""

    device: str  # cpu | cuda
    device_name: str  # the device as the runtime uses it (llama.cpp: the CPU and its thread count)
    dtype: str  # torch: float32 | bfloat16 | float16; llama.cpp: the GGUF type (runtimes.quant)
    batch: int
    seq_len: int  # tokens per forward (prefill) or 1 (decode)
    phase: str  # prefill | decode
    kv_len: int  # cached tokens before the timed step (decode), 0 for prefill
    graphs: bool = False
    runtime: str = "torch"  # a name in runtimes.RUNTIMES

    @property
    def key(self) -> str:
        """torch regimes are keyed by their device, others by their runtime (llama.cpp:CPU_2t|q4_0|...)."""
        name = self.device_name.replace(" ", "_").replace("|", "_")
        where = self.device if self.runtime == "torch" else self.runtime
        return (
            f"{where}:{name}|{self.dtype}|b{self.batch}|s{self.seq_len}|{self.phase}|kv{self.kv_len}|"
            f"{'graph' if self.graphs else 'eager'}"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Regime:
        """Tables written before regimes named their runtime stored llama.cpp as the device."""
        d = dict(d)
        if d.get("device") == "llama.cpp" and "runtime" not in d:
            d.update(device="cpu", runtime="llama.cpp")
        return cls(**d)


@dataclass
class LatencyTable:
    regime: Regime
    header: dict[str, Any]
    fixed_ms: float
    mlp: list[list[int]]  # per layer: MLP choices (large -> small)
    heads: list[list[int]]  # per layer: head choices
    ms: list[list[list[float]]]  # per layer: [mlp index][heads index] -> ms
    spread: list[list[list[float]]] = field(default_factory=list)
    scale: float = 1.0  # per-regime correction
    validation: dict[str, Any] | None = None

    # -- predictions ---------------------------------------------------------------------------------
    def entry(self, layer: int, mlp: int, heads: int) -> float:
        try:
            return self.ms[layer][self.mlp[layer].index(mlp)][self.heads[layer].index(heads)]
        except ValueError:
            raise UsageError(
                f"layer {layer}: (mlp={mlp}, heads={heads}) is not in the latency table"
            ) from None

    def predict(self, cfg: Config, corrected: bool = True) -> float:
        """Predicted milliseconds of one forward at per-layer configuration `cfg`."""
        raw = self.fixed_ms + sum(self.entry(i, m, h) for i, (m, h) in enumerate(cfg))
        return raw * (self.scale if corrected else 1.0)

    def expected(self, p_mlp: list[torch.Tensor], p_heads: list[torch.Tensor]) -> torch.Tensor:
        """Differentiable E[latency] under independent per-layer choice probabilities.

        p_mlp[l]: (..., K_l) over self.mlp[l]; p_heads[l]: (..., J_l) over self.heads[l].
        """
        total = torch.as_tensor(self.fixed_ms, dtype=p_mlp[0].dtype, device=p_mlp[0].device)
        for i, (pm, ph) in enumerate(zip(p_mlp, p_heads)):
            table = torch.as_tensor(self.ms[i], dtype=pm.dtype, device=pm.device)  # (K, J)
            total = total + torch.einsum("...k,kj,...j->...", pm, table, ph)
        return total * self.scale

    def full_ms(self) -> float:
        return self.predict([(m[0], h[0]) for m, h in zip(self.mlp, self.heads)])

    def smallest_ms(self) -> float:
        return self.predict([(m[-1], h[-1]) for m, h in zip(self.mlp, self.heads)])

    def check_budget(self, budget_ms: float) -> None:
        """Exit-3 error when even the smallest sub-network is over the budget."""
        low = self.smallest_ms()
        if budget_ms < low:
            raise InfeasibleError(
                f"budget {budget_ms:.3f} ms is below the smallest sub-network "
                f"({low:.3f} ms predicted in regime {self.regime.key})"
            )

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regime"] = asdict(self.regime)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        try:
            d = dict(d)
            d["regime"] = Regime.from_dict(d["regime"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise UsageError(f"invalid latency table entry: {e}") from None


def regimes(path: Path) -> list[str]:
    return list(layout.read_latency(path)["regimes"])


def matching_regimes(path: Path, regime: str | None) -> list[str]:
    """Every regime key `regime` names: itself when it is a key, else each key containing it."""
    data = layout.read_latency(path)["regimes"]
    if regime is None or regime in data:
        return [regime] if regime in data else list(data)[-1:]
    return [k for k in data if regime in k]


def load_table(path: Path, regime: str | None = None) -> LatencyTable:
    """The table for `regime` (a key, a unique part of one, or None for the newest); a one-line error if missing."""
    data = layout.read_latency(path)["regimes"]
    if not data:
        raise UsageError(f"{path} has no latency table; run `flex profile {path}` first")
    if regime is None:
        return LatencyTable.from_dict(list(data.values())[-1])
    if regime in data:
        return LatencyTable.from_dict(data[regime])
    hits = [k for k in data if regime in k]
    if len(hits) == 1:
        return LatencyTable.from_dict(data[hits[0]])
    raise UsageError(
        f"no latency table for regime {regime!r} in {path}; have: {', '.join(data)}; "
        f"run `flex profile {path}` with that regime's options"
    )


def save_table(path: Path, table: LatencyTable) -> None:
    """Add or replace one regime in ELASTIC/flex_latency.json atomically (other regimes are kept)."""
    data = layout.read_latency(path)
    data["regimes"].pop(table.regime.key, None)
    data["regimes"][table.regime.key] = table.to_dict()
    layout.write_latency(path, data)
