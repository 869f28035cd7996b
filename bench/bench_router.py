"""Benchmark: routers on the toy model (issue 5's targets). Needs `python bench/toy.py` (toy/base-elastic with
a latency table). Writes docs/results/routers.{json,md}.

Targets: every trained budget's static configuration has LUT latency within +-5% of the budget and never
more than 5% over; router configurations no worse than uniform width at equal LUT latency; surrogate
Spearman >= 0.8. Reported, not targeted: input-adaptive vs static at equal mean latency; joint fine-tuning.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    el = ROOT / "toy" / "base-elastic"
    if not (el / "flex_latency.json").exists():  # the toy model and its latency table, built once
        subprocess.run([sys.executable, str(ROOT / "bench" / "toy.py")], cwd=ROOT, check=True)
    budgets = "52%,60%,68%,76%,84%,92%"
    cmd = [
        sys.executable,
        "-m",
        "flexcli",
        "train-router",
        str(el),
        "--budgets",
        budgets,
        "--joint-steps",
        "60",
        "--steps",
        "900",
        "--json",
    ]
    print("$ flex", " ".join(cmd[3:]), file=sys.stderr)
    doc = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout)
    rows, md = (
        [],
        [
            "# Routers on the toy model (bench/bench_router.py)",
            "",
            f"Machine: {platform.platform()}, torch {torch.__version__}. Elastic model: bench/toy.py's "
            f"toy/base-elastic; latency regime `{doc['regime']}` (full {doc['full_ms']:.2f} ms, smallest "
            f"{doc['smallest_ms']:.2f} ms). Surrogate Spearman on 48 held-out configurations: "
            f"**{doc['sm_spearman']:.3f}**.",
            "",
            "| budget | budget ms | static LUT ms | LUT/budget | static ppl | uniform ppl (LUT ms) | "
            "input-adaptive ppl (mean LUT ms) | static ppl after joint |",
            "|---|---|---|---|---|---|---|---|",
        ],
    )
    for b in doc["budgets"]:
        ratio = b["lut_latency_ms"] / b["budget_ms"]
        rows.append(
            {
                "budget": b["budget"],
                "ratio": ratio,
                "within_5pct": abs(ratio - 1) <= 0.05,
                "over_5pct": ratio > 1.05,
                "static_vs_uniform": b["ppl"] - b["uniform_ppl"],
                "dynamic_vs_static": None if b["dynamic_ppl"] is None else b["dynamic_ppl"] - b["ppl"],
                "joint_vs_static": None if b["joint_ppl"] is None else b["joint_ppl"] - b["ppl"],
            }
        )
        dyn = (
            "-"
            if b["dynamic_ppl"] is None
            else f"{b['dynamic_ppl']:.2f} ({b['dynamic_mean_latency_ms']:.2f})"
        )
        joint = "-" if b["joint_ppl"] is None else f"{b['joint_ppl']:.2f}"
        md.append(
            f"| {b['budget']} | {b['budget_ms']:.2f} | {b['lut_latency_ms']:.2f} | {ratio:.3f} | {b['ppl']:.2f} | "
            f"{b['uniform_ppl']:.2f} ({b['uniform_latency_ms']:.2f}) | {dyn} | {joint} |"
        )
    claims = {
        "static LUT latency within ±5% of every budget": all(r["within_5pct"] for r in rows),
        "never more than 5% over a budget": not any(r["over_5pct"] for r in rows),
        "static no worse than uniform at equal LUT latency (every budget)": all(
            r["static_vs_uniform"] <= 0 for r in rows
        ),
        "surrogate Spearman >= 0.8": doc["sm_spearman"] >= 0.8,
        "input-adaptive beats static (ppl, every budget; latency differs, see table)": all(
            r["dynamic_vs_static"] is not None and r["dynamic_vs_static"] < 0 for r in rows
        ),
        "joint fine-tuning lowers static ppl (every budget)": all(
            r["joint_vs_static"] is not None and r["joint_vs_static"] < 0 for r in rows
        ),
    }
    md += ["", "| claim | holds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in claims.items()]
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "routers.json").write_text(
        json.dumps({"train_router": doc, "rows": rows, "claims": claims}, indent=2) + "\n"
    )
    (out / "routers.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
