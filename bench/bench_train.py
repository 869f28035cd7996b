"""Benchmark: elastic continued training on the toy base model (bench/toy.py) (issue 3's evidence).

(a) held-out perplexity at 50% uniform width after elastic training vs prune-only (permuted, untrained);
(b) the full model's perplexity after elastic training vs the original;
(c) training throughput, side by side in one process: plain full-width training vs elastic training
    (same loss, same batch), with and without distillation, and the elastic runtime at full width vs
    the stock model (the cost of the mechanism itself).
Writes docs/results/elastic_training.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
from common import ROOT, flex


def throughput(model, step_loss, tokens, steps: int, batch: int, seq: int) -> float:
    """Tokens/s of `steps` optimizer steps (after 2 warm-up steps) of train_lm's inner work."""
    from flexcli.recipe import TrainSection
    from flexcli.train.loop import TrainConfig, train_lm

    cfg = TrainConfig.from_section(
        TrainSection(steps=steps + 2, batch_size=batch, seq_len=seq, lr=1e-5, warmup=1), 0
    )
    res = train_lm(model, tokens, cfg, None, step_loss)
    return res.tokens_per_s


def training_throughput(base: Path, steps: int, batch: int = 16, seq: int = 256) -> dict:
    """Tokens/s side by side on the same weights (interleaved, best of two rounds): plain training of the
    stock model vs elastic training, with and without distillation, and the elastic runtime at full width."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexcli.arch import Dims, detect
    from flexcli.arch.spec import ElasticSpec
    from flexcli.elastic.runtime import ElasticModel
    from flexcli.recipe import TrainSection
    from flexcli.train.data import token_stream
    from flexcli.train.elastic import make_step_loss

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    tokens = token_stream(tok, "stdlib", max(400_000, 4 * (steps + 2) * batch * seq))
    stock = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval().requires_grad_(False)
    cfgd = model.config.to_dict()
    spec = ElasticSpec.build(
        "llama", Dims.from_config(cfgd), [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25], [1.0, 0.75, 0.5, 0.25]
    )
    elastic = ElasticModel(model, detect(cfgd), spec)
    rows: dict[str, float] = {}
    for _round in range(2):  # interleave, keep the best of two rounds
        for name, m, fn in [
            ("plain CE (stock model)", stock, None),
            (
                "elastic runtime, full width, CE",
                model,
                make_step_loss(elastic, model, None, TrainSection(p_full=1.0)),
            ),
            (
                "elastic CE (p_full 0.33, per-layer)",
                model,
                make_step_loss(elastic, model, None, TrainSection()),
            ),
            (
                "plain KD (full width)",
                model,
                make_step_loss(elastic, model, teacher, TrainSection(p_full=1.0, distill=1.0)),
            ),
            (
                "elastic KD (p_full 0.33, per-layer)",
                model,
                make_step_loss(elastic, model, teacher, TrainSection(distill=1.0)),
            ),
        ]:
            tps = throughput(m, fn, tokens, steps, batch, seq)
            rows[name] = max(rows.get(name, 0.0), tps)
    base_tps = rows["plain CE (stock model)"]
    return {
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "tok_s": {k: round(v, 1) for k, v in rows.items()},
        "ratios": {
            "elastic runtime at full width / stock": round(
                rows["elastic runtime, full width, CE"] / base_tps, 3
            ),
            "elastic CE / plain CE": round(rows["elastic CE (p_full 0.33, per-layer)"] / base_tps, 3),
            "elastic KD / plain KD": round(
                rows["elastic KD (p_full 0.33, per-layer)"] / rows["plain KD (full width)"], 3
            ),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--base", type=Path, default=ROOT / "toy" / "base")
    ap.add_argument("--throughput-steps", type=int, default=12)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = args.base.resolve()
    if not (base / "flex_pretrain.json").exists():
        base = work / "base"
        if not (base / "flex_pretrain.json").exists():
            flex("pretrain", "-o", str(base), "--size", "small", "--steps", "500", "--force", cwd=work)
    info = json.loads((base / "flex_pretrain.json").read_text())
    pre_tokens = info["train_tokens"]
    elastic_tokens = int(0.08 * pre_tokens)
    recipe = work / "elastic.yaml"
    recipe.write_text(
        "stages: [permute, train]\n"
        f"train: {{tokens: {elastic_tokens}, batch_size: 16, seq_len: 256, lr: 3.0e-4, warmup: 5,\n"
        "        distill: 1.0, checkpoint_every: 0, val_samples: 64, val_random_configs: 3}\n"
    )
    res = flex(
        "convert",
        str(base),
        "-o",
        str(work / "elastic"),
        "--recipe",
        str(recipe),
        "--calib",
        "stdlib",
        "--calib-samples",
        "64",
        "--seq-len",
        "256",
        "--force",
        cwd=work,
    )
    t = res["training"]
    before = {r["name"]: r["ppl"] for r in t["before"]}
    after = {r["name"]: r["ppl"] for r in t["after"]}
    orig_ppl = math.exp(info["heldout_loss"])

    tp = training_throughput(base, args.throughput_steps)
    rows = tp["tok_s"]
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "base_model": {"path": str(base), "pretrain_tokens": pre_tokens, "heldout_ppl": round(orig_ppl, 3)},
        "elastic_training": {
            "tokens": t["tokens"],
            "share_of_pretraining": round(t["tokens"] / pre_tokens, 4),
            "steps": t["steps"],
            "recipe": recipe.read_text(),
        },
        "ppl_full": {
            "original": round(orig_ppl, 3),
            "prune_only": before["full"],
            "elastic": after["full"],
            "rel_change": round(after["full"] / orig_ppl - 1, 4),
        },
        "ppl_uniform_50": {"prune_only": before["uniform 50%"], "elastic": after["uniform 50%"]},
        "ppl_all": {"prune_only": before, "elastic": after},
        "throughput_tok_s": rows,
        "throughput_ratios": tp["ratios"],
    }
    results["claims"] = {
        "(a) 50% width well below prune-only": after["uniform 50%"] < 0.75 * before["uniform 50%"],
        "(b) full within 3% of original": after["full"] <= 1.03 * orig_ppl,
        "overhead <= 10% (mechanism at full width)": results["throughput_ratios"][
            "elastic runtime at full width / stock"
        ]
        >= 0.9,
    }
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "elastic_training.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [
        "# Elastic continued training (bench/bench_train.py)",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['threads']} threads, torch {torch.__version__}. "
        f"Base: `flex pretrain --size small` ({pre_tokens:,} tokens of the Python stdlib), held-out ppl {orig_ppl:.2f}. "
        f"Elastic training: {t['tokens']:,} tokens ({t['tokens'] / pre_tokens:.1%} of pretraining), lr 3e-4, "
        "distill 1.0 (KL to the frozen original), p_full 0.33, per-layer sampling.",
        "",
        "| configuration | prune-only ppl | elastic ppl |",
        "|---|---|---|",
    ]
    md += [f"| {k} | {before[k]:.2f} | {after[k]:.2f} |" for k in before]
    md += [
        "",
        f"Full model: original {orig_ppl:.2f} → elastic {after['full']:.2f} "
        f"({results['ppl_full']['rel_change']:+.1%}).",
        "",
        "| training mode | tokens/s |",
        "|---|---|",
    ]
    md += [f"| {k} | {v:.0f} |" for k, v in rows.items()]
    md += ["", "| ratio | value |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in results["throughput_ratios"].items()
    ]
    md += ["", "| claim | holds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in results["claims"].items()]
    (out / "elastic_training.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
