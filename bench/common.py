"""Shared by the benchmark scripts: the repository root and running `flex ... --json` as users do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flex(*args: str, cwd: Path) -> dict:
    """Run `flex ARGS --json` in a subprocess (progress on stderr), return its JSON document."""
    print("$ flex", " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.run(
        [sys.executable, "-m", "flexcli", *args, "--json"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def ppl(model, corpora: dict) -> dict[str, float]:
    """Held-out perplexity of `model` on each named (n, seq_len) token tensor."""
    from flexcli.elastic.evaluate import mean_loss

    return {k: round(math.exp(mean_loss(model, v)), 3) for k, v in corpora.items()}
