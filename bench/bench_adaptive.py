"""Benchmark: static vs input-adaptive routing on an elastic checkpoint (issue 25) -> docs/results/adaptive.{md,json}.

Per trained budget: held-out ppl on code (stdlib's held-out files), prose (pydoc topics) and text that
alternates 64-token chunks of the two; the adaptive router's mean table latency per corpus and its share of
tokens at each MLP width per corpus (does it spend width where the text is hard?); and PyTorch CPU decode
ms/token from `flex generate`'s own loop (greedy, KV cache, router inside the timed step), static and
adaptive alternated prompt by prompt so drift hits both alike.

    python bench/bench_adaptive.py ELASTIC [--regime KEY]   (routers trained for that table, e.g. by make demo)

Against a decode table (`flex profile --phase decode`, routers trained for it) the budgets are ms per
token, and the latency model is checked: `flex generate`'s predicted ms/token (static: the table's
latency of the configuration; adaptive: the table's mean over each step's choices plus the router's
measured cost per step) against its measured steps, prompt by prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, heldout_text  # noqa: E402

PROMPTS = ["def parse_args(argv):\n", "The history of the printing press", "import os\n\n\nclass Cache:\n",
           "Water boils at a temperature of", "The difference between a list and a tuple is"]  # fmt: skip


def alternating(code: torch.Tensor, prose: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(n, T): 64-token chunks taken in turn from a code and a prose sequence."""
    out = code.clone()
    for s in range(chunk, code.shape[1], 2 * chunk):
        out[:, s : s + chunk] = prose[:, s : s + chunk]
    return out


@torch.no_grad()
def adaptive_stats(el, router, table, targets, ms, seqs, overhead_ms: float) -> dict:
    """Held-out ppl, mean table latency (+ the router's cost per step) and per-width token share of
    adaptive routing at `ms`."""
    from flexcli.elastic.adaptive import DynamicRuntime
    from flexcli.router.models import encode_budget
    from flexcli.router.training import eval_dynamic

    loss, lat = eval_dynamic(el, router, table, targets, ms, seqs, overhead_ms=overhead_ms)
    rt = DynamicRuntime(el, router)
    rt.budget = encode_budget(ms, targets)[None].expand(seqs.shape[0], -1)
    el.model(input_ids=seqs, use_cache=False)
    mlp = el.spec.layers[0].mlp
    count = Counter(k for km, _ in rt.choices for k in km.flatten().tolist())
    rt.close()
    total = sum(count.values())
    return {"ppl": round(math.exp(loss), 3), "table_ms": round(lat, 2),
            "mlp_share": {str(mlp[k]): round(c / total, 4) for k, c in sorted(count.items())}}  # fmt: skip


@torch.inference_mode()
def interleaved_steps(
    path: Path, tok, cfg, dyn, targets, ms: float, prompts: list[str], new_tokens: int
) -> dict:
    """Decode steps of the static configuration and of adaptive routing taken in turn, one of each (who
    goes first alternating), on two copies of the model, each greedy on its own continuation with its own
    KV cache: the ratio of each adjacent pair sees the same moment of a machine whose speed drifts."""
    from transformers import DynamicCache

    from flexcli.elastic.adaptive import DynamicRuntime
    from flexcli.elastic.runtime import load_elastic
    from flexcli.latency.timing import cache_kw
    from flexcli.router.models import encode_budget

    st, ad = load_elastic(path), load_elastic(path)
    st.set_config(cfg)
    rt = DynamicRuntime(ad, dyn)
    rt.budget = encode_budget(ms, targets)[None]
    kw = cache_kw(st.model)
    t_st, t_ad, ratios = [], [], []
    try:
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids  # (1, P)
            caches = [DynamicCache(config=st.model.config), DynamicCache(config=ad.model.config)]
            nxt = [int(st.model(input_ids=ids, use_cache=True, **{kw: caches[0]}).logits[0, -1].argmax())]
            rt.fixed_heads, rt.choices = None, []  # a new sequence: heads chosen at its prefill
            nxt.append(int(ad.model(input_ids=ids, use_cache=True, **{kw: caches[1]}).logits[0, -1].argmax()))
            rt.fixed_heads, rt.choices = [kh for _, kh in rt.choices], []
            rt.lookahead_decode()  # as flex generate runs it
            for step in range(new_tokens):
                ms_of = [0.0, 0.0]
                for j in (0, 1) if step % 2 == 0 else (1, 0):
                    m = (st, ad)[j].model
                    t0 = time.perf_counter()
                    out = m(input_ids=torch.tensor([[nxt[j]]]), use_cache=True, **{kw: caches[j]})
                    ms_of[j] = (time.perf_counter() - t0) * 1e3
                    nxt[j] = int(out.logits[0, -1].argmax())
                rt.choices = []
                t_st.append(ms_of[0])
                t_ad.append(ms_of[1])
                ratios.append(ms_of[1] / ms_of[0])
    finally:
        rt.close()
    q = statistics.quantiles(ratios, n=4)
    return {"static_ms": round(statistics.median(t_st), 2), "adaptive_ms": round(statistics.median(t_ad), 2),
            "ratio": [round(statistics.median(ratios), 4), round(q[0], 4), round(q[2], 4)], "pairs": len(ratios)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("elastic", type=Path)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="decode timing rounds over the prompts")
    ap.add_argument("--regime", help="the latency table (and its routers) [default: the newest]")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "adaptive")
    ap.add_argument(
        "--note", default="", help="where the checkpoint and its routers came from (into the report)"
    )
    a = ap.parse_args()
    from flexcli.commands.generate import GenerateOptions, generate
    from flexcli.elastic.evaluate import mean_loss
    from flexcli.elastic.runtime import load_elastic
    from flexcli.io.source import load_tokenizer
    from flexcli.latency.table import load_table
    from flexcli.plan.budget import parse_budget
    from flexcli.router.models import static_config
    from flexcli.router.store import load_router, router_cost_ms

    torch.manual_seed(0)
    el, tok, table = load_elastic(a.elastic), load_tokenizer(a.elastic), load_table(a.elastic, a.regime)
    st, doc = load_router(a.elastic, "static", table.regime.key)
    dyn, _ = load_router(a.elastic, "dynamic", table.regime.key)
    targets = doc["targets_ms"]
    overhead = router_cost_ms(doc) or 0.0
    corp = heldout_text(tok, a.samples, 256)
    corp["alternating"] = alternating(corp["code"], corp["prose"])
    rows = []
    for ms in targets:
        cfg = static_config(st, el.spec, targets, ms)
        with el.configured(cfg):
            static = {k: round(math.exp(mean_loss(el.model, v)), 3) for k, v in corp.items()}
        adaptive = {k: adaptive_stats(el, dyn, table, targets, ms, v, overhead) for k, v in corp.items()}
        b = parse_budget(f"{ms}ms")
        dec: dict[str, list[float]] = {"static": [], "adaptive": []}
        pred: dict[str, list[float]] = {"static": [], "adaptive": []}
        for rnd in range(a.rounds):  # alternated prompt by prompt, who goes first alternated by round
            for p in PROMPTS:
                for kind in ("static", "adaptive")[:: 1 if rnd % 2 == 0 else -1]:
                    o = GenerateOptions(prompt=p, budget=b, adaptive=kind == "adaptive", max_new_tokens=a.new_tokens,
                                        regime=table.regime.key)  # fmt: skip
                    g = generate(a.elastic, o)
                    dec[kind].append(g.ms_per_token)
                    pred[kind].append(g.predicted_ms)
        paired = sorted(x / y for x, y in zip(dec["adaptive"], dec["static"]))  # same prompt, same round
        steps = interleaved_steps(a.elastic, tok, cfg, dyn, targets, ms, PROMPTS * a.rounds, a.new_tokens)
        rows.append({"budget_ms": round(ms, 2), "share": round(ms / table.full_ms(), 3),
                     "static_table_ms": round(table.predict(cfg), 2), "static_ppl": static, "adaptive": adaptive,
                     "decode_ms_per_token": {k: round(statistics.median(v), 2) for k, v in dec.items()},
                     # adaptive / static ms per token of the same prompt in the same round: median, quartiles
                     "decode_paired_ratio": [round(statistics.median(paired), 4),
                                             *(round(q, 4) for q in statistics.quantiles(paired, n=4)[::2])],
                     # decode steps of the two taken in turn, one of each (interleaved_steps)
                     "interleaved_steps": steps,
                     "decode_predicted_ms_per_token": {k: round(statistics.median(v), 2) for k, v in pred.items()},
                     # the latency model, prompt by prompt: predicted / measured - 1
                     "decode_model_error": {k: [round(p / m - 1, 4) for p, m in zip(pred[k], dec[k])] for k in dec}})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    res = {"elastic": str(a.elastic), "note": a.note, "regime": table.regime.key, "full_ms": table.full_ms(),
           "router_step_ms": overhead,
           "machine": platform.platform(), "torch": torch.__version__, "samples": a.samples,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [
        "# Static vs input-adaptive routing (bench/bench_adaptive.py)",
        "",
        f"{a.elastic.name}, latency table `{table.regime.key}` (full {table.full_ms():.1f} ms). Held-out ppl on "
        f"{a.samples} x 256 tokens per corpus; adaptive latency is the table's mean over its per-token "
        f"choices{f' plus the router cost per step, {overhead:.2f} ms' if overhead else ''}; decode ms/token is "
        "the median of `flex generate`'s timed steps over "
        f"{a.rounds} rounds x {len(PROMPTS)} prompts x {a.new_tokens} tokens, static and adaptive alternated "
        "(who goes first alternated by round); paired is adaptive / static ms per token of the same prompt "
        "and round, median [quartiles]; interleaved is adaptive / static of single decode steps taken in "
        "turn on two copies of the model (each greedy on its own continuation, same prompts and rounds), "
        "median [quartiles], the finer pairing on a machine whose speed drifts; predicted is generate's "
        "latency model for the same steps (the table's regime).",
        "",
        *([a.note, ""] if a.note else []),
        "| budget | static ms | adaptive ms (code/prose/alt) | static ppl code/prose/alt | adaptive ppl "
        "code/prose/alt | decode ms/token static / adaptive | paired | interleaved | predicted static / adaptive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ad = r["adaptive"]
        md.append(
            f"| {r['budget_ms']:.1f} ms ({r['share']:.0%}) | {r['static_table_ms']:.1f} | "
            + " / ".join(f"{ad[k]['table_ms']:.1f}" for k in ("code", "prose", "alternating"))
            + " | "
            + " / ".join(f"{r['static_ppl'][k]:.2f}" for k in ("code", "prose", "alternating"))
            + " | "
            + " / ".join(f"{ad[k]['ppl']:.2f}" for k in ("code", "prose", "alternating"))
            + f" | {r['decode_ms_per_token']['static']:.1f} / {r['decode_ms_per_token']['adaptive']:.1f}"
            + " | {:.3f} [{:.3f}, {:.3f}]".format(*r["decode_paired_ratio"])
            + " | {:.3f} [{:.3f}, {:.3f}]".format(*r["interleaved_steps"]["ratio"])
            + f" | {r['decode_predicted_ms_per_token']['static']:.1f} / {r['decode_predicted_ms_per_token']['adaptive']:.1f} |"
        )
    errs = {k: [e for r in rows for e in r["decode_model_error"][k]] for k in ("static", "adaptive")}
    md += ["", "Latency model (predicted / measured ms per token - 1, over every prompt and budget): " + "; ".join(
        f"{k} median {statistics.median(v):+.1%}, worst {max(v, key=abs):+.1%}" for k, v in errs.items()) + "."]  # fmt: skip
    md += ["", "Share of (token, layer) choices at each MLP width, per corpus:", ""]
    for r in rows:
        for k in ("code", "prose", "alternating"):
            md.append(f"- {r['budget_ms']:.1f} ms, {k}: {r['adaptive'][k]['mlp_share']}")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
