"""Flag values parsed into the library's typed options; errors name the flag."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UsageError

_UNIFORM = re.compile(r"\s*mlp\s*=\s*([0-9.]+)\s*,\s*heads\s*=\s*([0-9.]+)\s*")
_SIZE_UNITS = {
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "B": 1,
}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB' -> bytes."""
    t = text.strip().upper()
    for u in sorted(_SIZE_UNITS, key=len, reverse=True):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * _SIZE_UNITS[u])
            except ValueError:
                break
    raise UsageError(f"{flag}: invalid size {text!r}; use e.g. 5GB or 500MB")


def parse_uniform(text: str) -> tuple[float, float]:
    """'mlp=0.5,heads=0.75' -> (0.5, 0.75)."""
    m = _UNIFORM.fullmatch(text)
    try:
        mlp, heads = (float(x) for x in m.groups()) if m else (0.0, 0.0)
    except ValueError:
        mlp = heads = 0.0
    if not (0 < mlp <= 1 and 0 < heads <= 1):
        raise UsageError(f"--uniform {text!r}: use mlp=FRACTION,heads=FRACTION, e.g. mlp=0.5,heads=0.75")
    return mlp, heads


def read_config_file(path: Path):
    """A JSON per-layer configuration ([{mlp, heads}, ...] or {"config": [...]}) -> Config."""
    from ..arch.spec import config_from_json

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read a JSON configuration ({e})") from None
    return config_from_json(raw["config"] if isinstance(raw, dict) and "config" in raw else raw)


def request(budget: str | None, config: Path | None, uniform: str | None):
    """--budget / --config / --uniform (exactly one) -> plan.search.Request, or None when none is given."""
    from ..plan.budget import parse_budgets
    from ..plan.search import Request

    given = [x for x in (budget, config, uniform) if x]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError("give exactly one of --budget, --config or --uniform")
    if budget:
        return Request(budgets=parse_budgets(budget))
    if config:
        return Request(config=read_config_file(config), label=Path(config).stem)
    m = _UNIFORM.fullmatch(uniform or "")
    mlp, heads = parse_uniform(uniform or "")
    return Request(uniform=(mlp, heads), label=f"mlp{m.group(1)}-heads{m.group(2)}" if m else None)
