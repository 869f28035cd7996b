"""The toy model of the small-scale benchmarks (bench_router, bench_llamacpp, bench_pareto, bench_train):
`make demo` built it until issue 24 moved the demo to SmolLM2. `python bench/toy.py` writes toy/.

A small Llama is pretrained here on the Python standard library's source (held-out split kept aside),
converted with importance ranking and elastic continued training (~8% of the pretraining tokens), and
compared against prune-only sub-networks with importance order and with a random order.
Every step is a `flex ... --json` command, printed before it runs; results are summarised at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flexcli.demo import flex  # `flex ... --json` in a subprocess, noisy-table refusals retried
from flexcli.io.layout import PRETRAIN


def pretrain_base(d: Path, size: str, steps: int) -> dict:
    """The base model: pretrained here, or reused from an earlier run."""
    base = d / "base"
    if (base / PRETRAIN).exists():
        print(f"reusing base model {base} (remove it to retrain)", file=sys.stderr)
        info = json.loads((base / PRETRAIN).read_text())
        return {
            "heldout_ppl": round(2.718281828 ** info["heldout_loss"], 3),
            "train_tokens": info["train_tokens"],
        }
    return flex("pretrain", "-o", str(base), "--size", size, "--steps", str(steps), cwd=d)


def convert_both(d: Path, pre: dict) -> tuple[dict, dict]:
    """Importance order + elastic training (~8% of pretraining, as the paper's 7.63%), and the random-order
    prune-only baseline."""
    (d / "elastic.yaml").write_text(
        "stages: [permute, train]\n"
        f"train: {{tokens: {int(0.08 * pre['train_tokens'])}, batch_size: 16, seq_len: 256, lr: 3.0e-4, warmup: 5, "
        "distill: 1.0,\n        checkpoint_every: 20, val_samples: 64, val_random_configs: 2}\n"
    )
    (d / "random-order.yaml").write_text("importance:\n  order: random\n  seed: 0\n")
    common = ["--calib", "stdlib", "--calib-samples", "64", "--seq-len", "256", "--force"]
    imp = flex(
        "convert",
        str(d / "base"),
        "-o",
        str(d / "base-elastic"),
        "--recipe",
        str(d / "elastic.yaml"),
        *common,
        cwd=d,
    )
    rnd = flex(
        "convert",
        str(d / "base"),
        "-o",
        str(d / "random-order-elastic"),
        "--recipe",
        str(d / "random-order.yaml"),
        "--eval-data",
        "stdlib",
        *common,
        cwd=d,
    )
    return imp, rnd


def print_quality(pre: dict, imp: dict, rnd: dict) -> None:
    t = imp["training"]
    before = {r["name"]: r for r in t["before"]}
    after = {r["name"]: r for r in t["after"]}
    rand = {f"uniform {w['ratio']:.0%}" if w["ratio"] < 1 else "full": w["ppl"] for w in rnd["widths"]}
    print(
        f"\nbase model: {pre['train_tokens']:,} training tokens of the Python stdlib, "
        f"held-out ppl {pre['heldout_ppl']:.2f}"
    )
    print(
        f"elastic training: {t['tokens']:,} tokens ({t['tokens'] / pre['train_tokens']:.1%} of pretraining), "
        f"{t['tokens_per_s']:.0f} tok/s\n"
    )
    print("held-out perplexity per sub-network (uniform = the same MLP and head fraction in every layer):\n")
    print(
        f"{'configuration':<14} {'mlp':>5} {'heads':>5} {'random order':>13} {'importance':>11} "
        f"{'+ elastic training':>19}"
    )
    for name, row in before.items():
        r = f"{rand[name]:.2f}" if name in rand else "-"
        print(
            f"{name:<14} {row['mlp'][0]:>5} {row['heads'][0]:>5} {r:>13} "
            f"{row['ppl']:>11.2f} {after[name]['ppl']:>19.2f}"
        )
    half, half_r, half_t = before["uniform 50%"]["ppl"], rand["uniform 50%"], after["uniform 50%"]["ppl"]
    print(
        f"\nat 50% width: importance order {'beats' if half < half_r else 'does NOT beat'} random order "
        f"({half:.2f} vs {half_r:.2f}); elastic training brings it to {half_t:.2f}."
    )
    full0, full1 = pre["heldout_ppl"], after["full"]["ppl"]
    print(f"full model: {full0:.2f} before, {full1:.2f} after elastic training ({full1 / full0 - 1:+.1%}).")


FRACTIONS = (0.15, 0.4, 0.65, 0.9)  # router budgets: this far from the smallest sub-network to the full model


def profile_and_route(d: Path, el: str) -> list[str]:
    """The latency table, then routers for 4 budgets spread between the table's smallest sub-network and
    the full model (as % of the full model); returns the budgets."""
    prof = flex("profile", el, "--seq-len", "128", "--validate", "10", cwd=d, retries=2)
    v, dn = prof["validation"], prof["validation"]["drift_normalized"]
    print(
        f"\nlatency table ({prof['regime']}): full {prof['full_ms']:.2f} ms, smallest {prof['smallest_ms']:.2f} ms; "
        f"{v['n']} random per-layer configurations: {dn['within_10pct']:.0%} within ±10% at the table's machine "
        f"speed (p90 |err| {dn['p90_abs_err']:.1%}), {v['within_10pct']:.0%} raw (the full model timed alongside "
        f"drifted {v['reference_drift']:.0%})"
    )
    full, small = prof["full_ms"], prof["smallest_ms"]
    budgets = [f"{100 * (small + f * (full - small)) / full:.1f}%" for f in FRACTIONS]
    rt = flex("train-router", el, "--budgets", ",".join(budgets), "--joint-steps", "40", cwd=d)
    print(
        f"\nrouters (surrogate Spearman {rt['sm_spearman']:.2f} on held-out configurations); held-out ppl:\n"
    )
    print(
        f"{'budget':>7} {'ms':>7} {'LUT ms':>7} {'static':>8} {'uniform':>8} {'adaptive':>9} {'adapt ms':>9} "
        f"{'joint':>7}"
    )
    for b in rt["budgets"]:
        dyn = (
            f"{b['dynamic_ppl']:>9.2f} {b['dynamic_mean_latency_ms']:>9.2f}"
            if b["dynamic_ppl"]
            else f"{'-':>9} {'-':>9}"
        )
        joint = f"{b['joint_ppl']:>7.2f}" if b["joint_ppl"] else f"{'-':>7}"
        print(
            f"{b['budget']:>7} {b['budget_ms']:>7.2f} {b['lut_latency_ms']:>7.2f} {b['ppl']:>8.2f} "
            f"{b['uniform_ppl']:>8.2f} {dyn} {joint}"
        )
    return budgets


def extract_and_report(d: Path, el: str, budgets: list[str]) -> None:
    ex = flex("extract", el, "--budget", ",".join(budgets), "-o", str(d / "sub"), "--force", cwd=d)
    how = {
        "stock": "stock transformers",
        "flex": "transformers with trust_remote_code=True",
        "gguf": "llama.cpp",
    }
    loads = sorted({how.get(m["format"], m["format"]) for m in ex["models"]})
    print(f"\nextracted sub-models (load with {' or '.join(loads)}; verified against the elastic model):\n")
    print(
        f"{'budget':>7} {'budget ms':>9} {'format':>6} {'params':>8} {'predicted ms':>12} {'measured ms':>11} "
        f"{'at table speed':>14}  path"
    )
    # measured in pairs with the full model; 'at table speed' removes the machine's drift since profiling
    for m in ex["models"]:
        meas = (
            f"{m['measured_latency_ms']:>11.2f} {m['measured_at_table_speed_ms']:>14.2f}"
            if m["measured_latency_ms"]
            else f"{'-':>11} {'-':>14}"
        )
        print(
            f"{m['budget']:>7} {m['budget_ms']:>9.2f} {m['format']:>6} {m['params'] / 1e6:>7.2f}M "
            f"{m['predicted_latency_ms']:>12.2f} {meas}  {m['output']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1] / "toy")
    ap.add_argument("--steps", type=int, default=500, help="pretraining steps (16 x 256 tokens each)")
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    d = args.dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pre = pretrain_base(d, args.size, args.steps)
    imp, rnd = convert_both(d, pre)
    print_quality(pre, imp, rnd)
    el = imp["output"]
    budgets = profile_and_route(d, el)
    extract_and_report(d, el, budgets[1::2])
    print(f"\nelastic checkpoint: {el}   ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
