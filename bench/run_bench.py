"""`make bench`: the paper's claims (method.md §6) at small scale, measured on this machine, published as
docs/RESULTS.md + docs/results/bench.json + plots. BENCH_SCALE (default 1) scales the work: 0.25 is a
quick smoke run, 2 a larger run, and below 0.1 a tiny run used by the test suite.

Stages, each a flexcli library call (the code behind the `flex` commands), cached in WORK/stages/NAME.json
so that `--resume` skips finished ones:

  base       pretrain a Llama on T tokens of the stdlib corpus (code)
  convert    importance order: permute only (prune-only) and + elastic training on <= 8% of T;
             random order: permute only and + the same elastic training
  submodels  uniform 75/50/25% sub-models extracted from the Flextron model (stock format)
  scratch    the same three architectures trained from scratch on T tokens (`flex pretrain --like`)
  quality    held-out perplexity of all of these on stdlib (code) and pydoc (English prose)
  identity   claims 1-2: permutation is lossless; extracted == elastic at the same mask; parameter formula
  profile    latency table of this CPU with its validation on random per-layer configurations
  routers    static + input-adaptive routers through the surrogate; on copies: without the surrogate
             (ablation) and with joint fine-tuning
  pareto     measured latency and perplexity of router, uniform and input-adaptive configurations
  extract    `flex extract` at several budgets: predicted vs measured latency, speed-up, identity
  systems    elastic-training throughput vs plain training; out-of-core extraction vs cp; GPU kernels
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402

WIDTHS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class Plan:
    """Everything BENCH_SCALE changes."""

    scale: float
    size: str  # flex pretrain --size
    steps: int  # pretraining steps (T = steps * batch * seq tokens)
    batch: int
    seq: int
    eval_samples: int  # held-out sequences per corpus
    calib_samples: int
    latency_seq: int  # profiled regime: batch 1 x latency_seq tokens, prefill, fp32
    repeats: int
    warmup_s: float
    warmup_calls: int
    validate: int
    router_steps: int
    dynamic_steps: int
    sm_warmup: int
    joint_steps: int
    throughput_steps: int
    extract_shape: str  # synthetic checkpoint for the out-of-core extraction benchmark
    seed: int = 0

    @classmethod
    def for_scale(cls, s: float) -> Plan:
        if s <= 0:
            raise SystemExit(f"BENCH_SCALE must be positive, got {s}")
        tiny, f = s < 0.1, min(1.0, s)
        return cls(
            scale=s,
            size="tiny" if tiny else "small",
            steps=max(20, round(500 * s)),
            batch=8 if tiny else 16,
            seq=64 if tiny else 256,
            eval_samples=8 if tiny else 64,
            calib_samples=8 if tiny else 64,
            latency_seq=32 if tiny else 128,
            repeats=3 if tiny else 7,
            warmup_s=0.01 if tiny else 0.2,
            warmup_calls=2 if tiny else 10,
            validate=4 if tiny else (20 if s >= 0.5 else 10),
            router_steps=max(16, round(600 * f)),
            dynamic_steps=max(8, round(200 * f)),
            sm_warmup=max(16, round(256 * f)),
            joint_steps=max(4, round(60 * f)),
            throughput_steps=2 if tiny else max(4, round(12 * f)),
            extract_shape="tiny" if tiny else ("7b" if s >= 1 else "1b"),
        )


class Ctx:
    def __init__(self, plan: Plan, work: Path, rep):
        self.plan, self.work, self.rep = plan, work, rep
        self.results: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        return self.work / name


def _rep():
    from flexcli.cli.render import RichReporter

    return RichReporter(quiet=False)


# ---------------------------------------------------------------- stages


def st_base(c: Ctx) -> dict:
    from flexcli.commands.pretrain import PretrainOptions, pretrain

    p = c.plan
    o = PretrainOptions(
        size=p.size, steps=p.steps, batch_size=p.batch, seq_len=p.seq, seed=p.seed, force=True
    )
    r = pretrain(c.path("base"), o, reporter=c.rep)
    return asdict(r)


def _recipe(c: Ctx, name: str, order: str, train: bool) -> Path:
    p, T = c.plan, c.results["base"]["train_tokens"]
    tokens = max(int(0.08 * T), 2 * p.batch * p.seq)
    text = f"importance: {{order: {order}, seed: {p.seed}}}\n"
    text += "stages: [permute, train]\n" if train else "stages: [permute]\n"
    if train:
        text += (
            f"train: {{tokens: {tokens}, batch_size: {p.batch}, seq_len: {p.seq}, lr: 3.0e-4, warmup: 5, "
            "distill: 1.0, checkpoint_every: 0, val_samples: 8, val_random_configs: 0}\n"
        )
    f = c.path(f"{name}.yaml")
    f.write_text(text)
    return f


def st_convert(c: Ctx) -> dict:
    from flexcli.commands.convert import ConvertOptions, convert

    p, out = c.plan, {}
    for name, order, train in (
        ("prune-importance", "importance", False),
        ("flextron", "importance", True),
        ("prune-random", "random", False),
        ("random-trained", "random", True),
    ):
        opts = ConvertOptions(
            recipe=_recipe(c, name, order, train),
            calib="stdlib",
            calib_samples=p.calib_samples,
            seq_len=p.seq,
            output=c.path(name),
            force=True,
        )
        r = convert(str(c.path("base")), opts, reporter=c.rep)
        t = r.training
        out[name] = {
            "output": r.output,
            "seconds": r.seconds,
            "order": order,
            "trained": train,
            "train_tokens": t and t.tokens,
            "train_steps": t and t.steps,
            "train_tokens_per_s": t and t.tokens_per_s,
            "mlp_choices": r.mlp_choices,
            "head_choices": r.head_choices,
        }
    out["share_of_pretraining"] = out["flextron"]["train_tokens"] / c.results["base"]["train_tokens"]
    return out


def st_submodels(c: Ctx) -> dict:
    from flexcli.commands.extract import ExtractOptions, extract
    from flexcli.plan.search import Request

    out = {}
    for r in WIDTHS[1:]:
        o = ExtractOptions(
            request=Request(uniform=(r, r), label=f"mlp{r}-heads{r}"),
            output=c.path(f"sub-{int(r * 100)}"),
            force=True,
        )
        res = extract(c.path("flextron"), o, reporter=c.rep)
        out[str(r)] = asdict(res.models[0])
    return out


def st_scratch(c: Ctx) -> dict:
    from flexcli.commands.pretrain import PretrainOptions, pretrain

    p, out = c.plan, {}
    for r in WIDTHS[1:]:
        o = PretrainOptions(
            steps=p.steps,
            batch_size=p.batch,
            seq_len=p.seq,
            seed=p.seed,
            force=True,
            like=c.path(f"sub-{int(r * 100)}"),
        )
        res = pretrain(c.path(f"scratch-{int(r * 100)}"), o, reporter=c.rep)
        out[str(r)] = asdict(res)
    return out


class Evaluator:
    """Held-out sequences of both corpora, tokenized once with the base model's tokenizer."""

    def __init__(self, c: Ctx):
        from transformers import AutoTokenizer

        from flexcli.train.data import PYDOC, STDLIB, load_sequences

        tok = AutoTokenizer.from_pretrained(c.path("base"))
        n, s = c.plan.eval_samples, c.plan.seq
        self.seqs = {
            "stdlib": load_sequences(tok, STDLIB, n, s, "heldout"),
            "pydoc": load_sequences(tok, PYDOC, n, s),
        }

    def ppl(self, model) -> dict[str, float]:
        from flexcli.elastic.evaluate import mean_loss

        return {k: math.exp(mean_loss(model, v)) for k, v in self.seqs.items()}


def layer_share(spec, cfg) -> float:
    """Share of the transformer layers' parameters (~ their compute) a configuration keeps."""
    d, hd = spec.dims.hidden_size, spec.dims.head_dim

    def layer(m: int, h: int) -> int:
        return 3 * d * m + d * hd * (2 * h + 2 * spec.kv_heads(h))

    return sum(layer(m, h) for m, h in cfg) / sum(layer(m, h) for m, h in spec.full())


def _param_counter(elastic_dir: Path, spec):
    """cfg -> parameter count of the sliced model (flexcli's formula, from the family descriptor)."""
    from flexcli.plan.search import param_counter

    return param_counter(spec, json.loads((Path(elastic_dir) / "config.json").read_text()))


def st_quality(c: Ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from flexcli import register_auto_classes
    from flexcli.elastic.runtime import load_elastic

    register_auto_classes()  # sub-models whose head count does not divide hidden_size use the flex format
    ev, rows = Evaluator(c), []
    with c.rep.task("held-out perplexity (stdlib, pydoc)", total=4 * len(WIDTHS) + 4) as task:
        base = AutoModelForCausalLM.from_pretrained(c.path("base"), dtype=torch.float32).eval()
        rows.append(
            {
                "method": "base",
                "width": 1.0,
                "layer_share": 1.0,
                "params": sum(q.numel() for q in base.parameters()),
                **ev.ppl(base),
            }
        )
        task.advance(1)
        for name in ("flextron", "prune-importance", "random-trained", "prune-random"):
            el = load_elastic(c.path(name))
            param_count = _param_counter(c.path(name), el.spec)
            for r in WIDTHS:
                cfg = el.spec.uniform(r, r)
                with el.configured(cfg):
                    rows.append(
                        {
                            "method": name,
                            "width": r,
                            "layer_share": layer_share(el.spec, cfg),
                            "params": param_count(cfg),
                            **ev.ppl(el.model),
                        }
                    )
                task.advance(1)
        components = []  # which ranking helps: MLP neurons alone, heads alone (prune-only, 50%)
        for name in ("prune-importance", "prune-random"):
            el = load_elastic(c.path(name))
            for mr, hr in ((0.5, 1.0), (1.0, 0.5)):
                with el.configured(el.spec.uniform(mr, hr)):
                    components.append({"method": name, "mlp": mr, "heads": hr, **ev.ppl(el.model)})
        for r in WIDTHS[1:]:
            m = AutoModelForCausalLM.from_pretrained(
                c.path(f"scratch-{int(r * 100)}"), dtype=torch.float32
            ).eval()
            rows.append(
                {
                    "method": "scratch",
                    "width": r,
                    "layer_share": layer_share(el.spec, el.spec.uniform(r, r)),
                    "params": sum(q.numel() for q in m.parameters()),
                    **ev.ppl(m),
                }
            )
            task.advance(1)
    return {
        "rows": rows,
        "components": components,
        "eval_tokens": {k: int(v.numel()) for k, v in ev.seqs.items()},
    }


def identity(elastic_dir: Path, sub_dir: Path, cfg, seqs: torch.Tensor) -> dict:
    """Max |logit difference| between an extracted sub-model (loaded with transformers) and the elastic
    model at the same configuration, and its parameter count against the formula."""
    from transformers import AutoModelForCausalLM

    from flexcli import register_auto_classes
    from flexcli.elastic.runtime import load_elastic

    register_auto_classes()
    el = load_elastic(elastic_dir)
    param_count = _param_counter(elastic_dir, el.spec)
    sub = AutoModelForCausalLM.from_pretrained(sub_dir, dtype=torch.float32).eval()
    with torch.no_grad(), el.configured(cfg):
        a = el.model(input_ids=seqs).logits
        b = sub(input_ids=seqs).logits
    n = sum(q.numel() for q in sub.parameters())
    return {
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "logit_scale": a.abs().max().item(),
        "params": n,
        "params_formula": param_count(cfg),
        "params_match": n == param_count(cfg),
    }


def st_identity(c: Ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from flexcli.elastic.runtime import load_elastic

    seqs = Evaluator(c).seqs["stdlib"][:2]
    base = AutoModelForCausalLM.from_pretrained(c.path("base"), dtype=torch.float32).eval()
    perm = {}
    for name in ("prune-importance", "prune-random"):
        el = load_elastic(c.path(name))
        with torch.no_grad():
            a, b = base(input_ids=seqs).logits, el.model(input_ids=seqs).logits
        perm[name] = {"max_abs_logit_diff": (a - b).abs().max().item(), "logit_scale": a.abs().max().item()}
    el = load_elastic(c.path("flextron"))
    subs = {
        str(r): identity(c.path("flextron"), c.path(f"sub-{int(r * 100)}"), el.spec.uniform(r, r), seqs)
        for r in WIDTHS[1:]
    }
    return {"permutation": perm, "uniform_submodels": subs}


def _profile_options(c: Ctx, **kw):
    from flexcli.latency.profile import ProfileOptions

    p = c.plan
    return ProfileOptions(
        seq_len=p.latency_seq,
        repeats=p.repeats,
        warmup_s=p.warmup_s,
        min_warmup_calls=p.warmup_calls,
        seed=p.seed,
        **kw,
    )


def st_profile(c: Ctx) -> dict:
    from flexcli.commands.profile import NoisyTable, profile
    from flexcli.latency.table import load_table

    # A table that fails its own checks (rounds that disagree, a smallest sub-network not faster than the
    # full model, a failed validation) is refused; it is measured again, and after 3 refusals the last is
    # kept with its problems recorded (a tiny model at BENCH_SCALE < 0.1 is mostly fixed overhead).
    for attempt in range(1, 4):
        try:
            o = _profile_options(c, validate=c.plan.validate, accept_noisy=attempt == 3)
            r = profile(c.path("flextron"), o, c.rep)
            break
        except NoisyTable as e:
            c.rep.warn(f"profile attempt {attempt}: {e}")
    table = load_table(c.path("flextron"), None)
    return {**asdict(r), "attempts": attempt, "validation_configs": table.validation["configs"]}


def _budgets(c: Ctx, fractions: tuple[float, ...]) -> str:
    full, small = c.results["profile"]["full_ms"], c.results["profile"]["smallest_ms"]
    return ",".join(f"{small + f * (full - small):.6f}ms" for f in fractions)


def st_routers(c: Ctx) -> dict:
    from flexcli.commands.train_router import RouterHyper, TrainRouterOptions, train_router
    from flexcli.plan.budget import parse_budgets

    p = c.plan
    budgets = _budgets(c, (0.1, 0.25, 0.4, 0.55, 0.7, 0.85))
    h = dict(
        steps=p.router_steps,
        dynamic_steps=p.dynamic_steps,
        sm_warmup=p.sm_warmup,
        seed=p.seed,
        seq_len=min(128, p.seq),
    )
    out = {"budgets": budgets}
    main = train_router(
        c.path("flextron"),
        TrainRouterOptions(budgets=parse_budgets(budgets), hyper=RouterHyper(**h)),
        reporter=c.rep,
    )
    out["main"] = asdict(main)
    for name, kw in (("no_surrogate", {"surrogate": False}), ("joint", {"joint_steps": p.joint_steps})):
        copy = c.path(f"flextron-{name}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(c.path("flextron"), copy)
        o = TrainRouterOptions(budgets=parse_budgets(budgets), dynamic=False, hyper=RouterHyper(**h, **kw))
        out[name] = asdict(train_router(copy, o, reporter=c.rep))
        shutil.rmtree(copy)
    return out


def _timed(fn, o) -> float:
    """Median ms of fn() with the profile options' warm-up and repeats (no re-measurement above 15% spread)."""
    from flexcli.latency.timing import TimingPolicy, time_fn

    return time_fn(fn, lambda: None, TimingPolicy(o.repeats, o.warmup_s, o.min_warmup_calls, 0.15)).ms


def _time_dynamic(c: Ctx, el, router, targets, budget_ms: float, seqs: torch.Tensor, o) -> float:
    """Median ms of a forward through the input-adaptive runtime on real held-out text (mean over seqs)."""
    from flexcli.elastic.adaptive import DynamicRuntime
    from flexcli.router.models import encode_budget

    rt = DynamicRuntime(el, router)
    try:
        rt.budget = encode_budget(budget_ms, targets)[None]
        ms = [_timed(lambda x=x: el.model(input_ids=x[None], use_cache=False), o) for x in seqs]
    finally:
        rt.close()
    return sum(ms) / len(ms)


def st_pareto(c: Ctx) -> dict:
    from flexcli.arch.spec import config_from_json, config_to_json
    from flexcli.elastic.runtime import load_elastic
    from flexcli.latency.profile import measure_configs
    from flexcli.latency.table import load_table
    from flexcli.router.store import load_router
    from flexcli.router.training import eval_dynamic

    el, table = load_elastic(c.path("flextron")), load_table(c.path("flextron"), None)
    spec, ev, o = el.spec, Evaluator(c), _profile_options(c)
    main = c.results["routers"]["main"]
    points = [{"kind": "full", "budget_ms": None, "config": spec.full()}]
    points += [
        {"kind": "static router", "budget_ms": b["budget_ms"], "config": config_from_json(b["config"])}
        for b in main["budgets"]
        if b["budget_ms"] < main["full_ms"]
    ]
    points += [{"kind": "uniform", "budget_ms": None, "config": cfg} for cfg in spec.uniform_configs()]
    meas, refs = measure_configs(
        c.path("flextron"), [pt["config"] for pt in points], o, c.rep, with_full=True
    )
    out = []
    with c.rep.task("held-out perplexity of the configurations", total=len(points)) as task:
        for pt, m, ref in zip(points, meas, refs):
            with el.configured(pt["config"]):
                ppl = ev.ppl(el.model)
            out.append(
                {
                    **pt,
                    "config": config_to_json(pt["config"]),
                    "lut_ms": table.predict(pt["config"]),
                    "measured_ms": m,
                    "full_measured_before_ms": ref,
                    "layer_share": layer_share(spec, pt["config"]),
                    **ppl,
                }
            )
            task.advance(1)
    router, doc = load_router(c.path("flextron"), "dynamic")
    seqs = ev.seqs["stdlib"][:3, : c.plan.latency_seq]
    with torch.inference_mode():
        eager_full = sum(
            _timed(lambda x=x: el.model(input_ids=x[None], use_cache=False), o) for x in seqs
        ) / len(seqs)
    with c.rep.task(
        "input-adaptive routing: perplexity and measured latency", total=len(doc["targets_ms"])
    ) as task:
        for t in doc["targets_ms"]:
            row = {"kind": "input-adaptive", "budget_ms": t}
            for corpus, s in ev.seqs.items():
                loss, lut = eval_dynamic(el, router, table, doc["targets_ms"], t, s)
                row[corpus] = math.exp(loss)
                row[f"lut_ms_{corpus}"] = lut
            with torch.inference_mode():
                row["measured_ms"] = _time_dynamic(c, el, router, doc["targets_ms"], t, seqs, o)
            row["lut_ms"] = row["lut_ms_stdlib"]
            out.append(row)
            task.advance(1)
    mixed = torch.cat([ev.seqs["stdlib"], ev.seqs["pydoc"]])
    mixed_rows = []
    for b in main["budgets"]:
        if b["budget_ms"] >= main["full_ms"]:
            continue
        with el.configured(config_from_json(b["config"])):
            from flexcli.elastic.evaluate import mean_loss

            st = math.exp(mean_loss(el.model, mixed))
        loss, lut = eval_dynamic(el, router, table, doc["targets_ms"], b["budget_ms"], mixed)
        mixed_rows.append(
            {
                "budget_ms": b["budget_ms"],
                "static_ppl": st,
                "static_lut_ms": b["lut_latency_ms"],
                "dynamic_ppl": math.exp(loss),
                "dynamic_lut_ms": lut,
            }
        )
    return {"points": out, "elastic_full_eager_ms": eager_full, "mixed": mixed_rows}


def st_extract(c: Ctx) -> dict:
    from flexcli.arch.spec import config_from_json
    from flexcli.commands.extract import ExtractOptions, extract
    from flexcli.plan.budget import parse_budgets
    from flexcli.plan.search import Request

    budgets = _budgets(c, (0.2, 0.45, 0.7, 0.9)) + ",100%"
    o = ExtractOptions(request=Request(budgets=parse_budgets(budgets)), output=c.path("subs"), force=True)
    res = extract(c.path("flextron"), o, reporter=c.rep)
    seqs = Evaluator(c).seqs["stdlib"][:2]
    models = []
    for m in res.models:
        ident = identity(c.path("flextron"), Path(m.output), config_from_json(m.config), seqs)
        models.append({**asdict(m), "identity": ident})
    return {"budgets": budgets, "models": models}


def st_systems(c: Ctx) -> dict:
    import bench_extract
    import bench_train

    p, out = c.plan, {}
    out["training_throughput"] = bench_train.training_throughput(
        c.path("base"), p.throughput_steps, p.batch, p.seq
    )
    out["extraction"] = bench_extract.extraction_bench(c.path("extract-bench"), p.extract_shape)
    found = sorted(
        (ROOT / "docs" / "results").glob("kernels_*.json")
    )  # written by `make bench-kernels` on a GPU
    out["kernels"] = (
        {
            "measured": True,
            "files": [f"results/{f.name}" for f in found],
            "results": {f.stem: json.loads(f.read_text()) for f in found},
        }
        if found
        else {
            "measured": False,
            "why": "not measured: no GPU on this machine, and no GPU results in the repository yet. "
            "`make bench-kernels` on a CUDA machine writes docs/results/kernels_<device>.json, "
            "which this report then includes.",
        }
    )
    return out


STAGES = [
    ("base", st_base),
    ("convert", st_convert),
    ("submodels", st_submodels),
    ("scratch", st_scratch),
    ("quality", st_quality),
    ("identity", st_identity),
    ("profile", st_profile),
    ("routers", st_routers),
    ("pareto", st_pareto),
    ("extract", st_extract),
    ("systems", st_systems),
]


def header(plan: Plan) -> dict:
    import platform
    import subprocess

    import transformers

    import flexcli

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gib": round(mem, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": triton_v,
            "flexcli": flexcli.__version__,
            "commit": commit or None,
        },
        "seed": plan.seed,
        "scale": plan.scale,
        "plan": asdict(plan),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run(plan: Plan, work: Path, out: Path, resume: bool = False, only_report: bool = False) -> dict:
    """Run (or resume) every stage, write bench.json, RESULTS.md and plots; returns the results."""
    import report

    if not resume and not only_report and work.exists():
        shutil.rmtree(work)
    (work / "stages").mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # flex-project.json (convert records its outputs in the working directory) goes here
    torch.manual_seed(plan.seed)
    c = Ctx(plan, work, _rep())
    timings = {}
    for name, fn in STAGES:
        f = work / "stages" / f"{name}.json"
        if (resume or only_report) and f.exists():
            c.results[name] = json.loads(f.read_text())
            continue
        if only_report:
            raise SystemExit(f"bench: stage {name} has no results in {work}; run without --report-only")
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        c.results[name] = fn(c)
        timings[name] = round(time.time() - t, 1)
        c.results[name]["_seconds"] = timings[name]
        f.write_text(json.dumps(c.results[name], indent=1, default=str) + "\n")
    seconds = {n: c.results[n].get("_seconds") for n, _ in STAGES}
    results = {
        "header": header(plan),
        **c.results,
        "seconds": seconds,
        "wall_s": round(sum(v or 0 for v in seconds.values()), 1),
    }
    report.write(results, out)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=float(os.environ.get("BENCH_SCALE", "1")))
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "paper")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="RESULTS.md goes here, JSON and plots in results/"
    )
    ap.add_argument("--resume", action="store_true", help="reuse finished stages in --work")
    ap.add_argument("--report-only", action="store_true", help="only re-render the report from --work")
    a = ap.parse_args()
    res = run(Plan.for_scale(a.scale), a.work.resolve(), a.out.resolve(), a.resume, a.report_only)
    print((a.out / "RESULTS.md").read_text())
    print(f"[bench] done in {res['wall_s']:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
