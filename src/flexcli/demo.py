"""`make demo`: the whole job on a built-in default, through the real `flex` commands.

A small Llama is pretrained here on the Python standard library's source (held-out split kept aside),
converted with importance ranking, and compared against the same conversion with a random order.
Every step is a `flex ... --json` command, printed before it runs; results are summarised at the end.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def flex(*args: str, cwd: Path) -> dict:
    cmd = [sys.executable, "-m", "flexcli", *args, "--json"]
    print(f"$ flex {shlex.join(args)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo step failed (exit {proc.returncode}): flex {shlex.join(args)}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("demo"))
    ap.add_argument("--steps", type=int, default=500, help="pretraining steps (16 x 256 tokens each)")
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    d = args.dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = d / "base"
    if (base / "flex_pretrain.json").exists():
        print(f"reusing base model {base} (make demo-clean to retrain)", file=sys.stderr)
        info = json.loads((base / "flex_pretrain.json").read_text())
        pre = {"heldout_ppl": round(2.718281828 ** info["heldout_loss"], 3), "train_tokens": info["train_tokens"]}
    else:
        pre = flex("pretrain", "-o", str(base), "--size", args.size, "--steps", str(args.steps), cwd=d)
    common = ["--calib", "stdlib", "--calib-samples", "64", "--seq-len", "256", "--eval-data", "stdlib", "--force"]
    imp = flex("convert", str(base), "-o", str(d / "base-elastic"), *common, cwd=d)
    (d / "random-order.yaml").write_text("importance:\n  order: random\n  seed: 0\n")
    rnd = flex("convert", str(base), "-o", str(d / "random-order-elastic"), "--recipe", str(d / "random-order.yaml"),
               *common, cwd=d)

    print(f"\nbase model: {pre['train_tokens']:,} training tokens of the Python stdlib, held-out ppl {pre['heldout_ppl']:.2f}")
    print("held-out perplexity of prefix sub-networks (uniform MLP and head fraction), no training after permutation:\n")
    print(f"{'width':>6} {'mlp':>5} {'heads':>5} {'importance order':>17} {'random order':>13}")
    for a, b in zip(imp["widths"], rnd["widths"]):
        print(f"{a['ratio']:>6.0%} {a['mlp']:>5} {a['heads']:>5} {a['ppl']:>17.2f} {b['ppl']:>13.2f}")
    half = next(w for w in imp["widths"] if w["ratio"] == 0.5)["ppl"]
    half_r = next(w for w in rnd["widths"] if w["ratio"] == 0.5)["ppl"]
    verdict = "beats" if half < half_r else "does NOT beat"
    print(f"\nat 50% width the importance order {verdict} the random order ({half:.2f} vs {half_r:.2f}).")
    print(f"elastic checkpoint: {imp['output']}   ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
