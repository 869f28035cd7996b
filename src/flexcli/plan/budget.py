"""Budget strings, parsed strictly: 40ms, 0.04s, 60% (of the full model's latency), 3.5B / 3500M params."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|%|b|m|k)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    kind: str  # "latency" (value in ms), "fraction" (of full latency, 0..1], or "params" (count)
    value: float
    text: str

    def to_ms(self, full_ms: float) -> float:
        if self.kind == "latency":
            return self.value
        if self.kind == "fraction":
            return self.value * full_ms
        raise UsageError(f"budget {self.text!r} is a parameter count, not a latency")


def parse_budget(text: str) -> Budget:
    """Parse one budget; a value without a unit is an error."""
    m = _RE.match(text)
    if not m:
        raise UsageError(f"invalid budget {text!r}: use a unit, e.g. 40ms, 0.04s, 60% or 3.5B (parameters)")
    v, unit = float(m.group(1)), m.group(2).lower()
    if v <= 0:
        raise UsageError(f"budget {text!r} must be positive")
    if unit == "ms":
        return Budget("latency", v, text.strip())
    if unit == "s":
        return Budget("latency", v * 1000, text.strip())
    if unit == "%":
        if v > 100:
            raise UsageError(
                f"budget {text!r}: a percentage of the full model's latency must be at most 100%"
            )
        return Budget("fraction", v / 100, text.strip())
    return Budget("params", v * {"b": 1e9, "m": 1e6, "k": 1e3}[unit], text.strip())


def parse_budgets(text: str) -> list[Budget]:
    """Comma-separated budgets: '30ms,40ms,60%'."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("no budget given")
    return [parse_budget(p) for p in parts]
