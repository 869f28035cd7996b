"""The `flex` command line: parse, call one library function, render its result.

Results go to stdout (a table, a path, or with --json exactly one JSON document); progress, logs and
errors go to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 3 infeasible request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import EXIT_RUNTIME, EXIT_USAGE, FlexError
from .progress import Reporter

EPILOG = ("Exit codes: 0 ok · 1 runtime failure · 2 bad usage or input · 3 infeasible request · 130 interrupted. "
          "FLEX_DEBUG=1 shows tracebacks.")
app = typer.Typer(name="flex", help="Flextron for Hugging Face LLMs: one elastic model, many latency budgets.",
                  epilog=EPILOG, pretty_exceptions_enable=False, no_args_is_help=True, add_completion=True,
                  rich_markup_mode=None)
STATE = {"verbosity": 0}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


class RichReporter(Reporter):
    """Progress bars on a terminal (transient, on stderr); plain log lines otherwise."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.bars = self.console.is_terminal and not quiet

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Any]:
        if not self.bars:
            if not self.quiet:
                self.console.print(f"[dim]·[/dim] {description} ...", highlight=False)
            yield _LogTask(self, description, total)
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                      console=self.console, transient=True) as prog:
            tid = prog.add_task(description, total=total, info="")
            yield _BarTask(prog, tid)
        self.console.print(f"[green]✓[/green] {description}", highlight=False)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, highlight=False)

    def warn(self, msg: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


class _BarTask:
    def __init__(self, prog, tid):
        self.prog, self.tid = prog, tid

    def advance(self, n: float = 1, **fields: object) -> None:
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        self.prog.update(self.tid, advance=n, info=info)


class _LogTask:
    """Without a terminal: a log line about every 10% of the work (and never with -q)."""

    def __init__(self, rep: RichReporter, desc: str, total: float | None):
        self.rep, self.desc, self.total, self.done, self.next = rep, desc, total, 0.0, 0.1

    def advance(self, n: float = 1, **fields: object) -> None:
        self.done += n
        if self.total and not self.rep.quiet and self.done / self.total >= self.next - 1e-9:
            self.next += 0.1
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            self.rep.console.print(f"  {self.desc}: {self.done:.0f}/{self.total:.0f} {info}", highlight=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flex {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only results and errors.")] = False,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More logs; tracebacks on errors.")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Flextron for Hugging Face LLMs."""
    STATE["verbosity"] = -1 if quiet else verbose
    if verbose == 0:  # transformers' own warnings and tqdm bars are noise on our stderr
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def run(fn: Callable[[Reporter], Any], as_json: bool, render: Callable[[Any], None]) -> Any:
    """Call the library, render the result (returned), map errors to one line on stderr and an exit code."""
    follower = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 reports
    rep = RichReporter(quiet=STATE["verbosity"] < 0 or follower)
    debug = os.environ.get("FLEX_DEBUG") == "1" or STATE["verbosity"] > 0
    try:
        result = fn(rep)
    except FlexError as e:
        _fail(str(e), e.exit_code, as_json, debug)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130, as_json, debug)
    except OSError as e:  # disk full, file too large, permissions: the output was never committed
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"cannot write: {e.strerror or e}{where}; nothing was written", EXIT_RUNTIME, as_json, debug)
    except Exception as e:  # an unexpected failure: still one line unless debugging
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "I/O error" in msg:  # safetensors reports write failures in its own exception type
            _fail(f"cannot write: {msg}; nothing was written", EXIT_RUNTIME, as_json, debug)
        _fail(f"{type(e).__name__}: {msg} (set FLEX_DEBUG=1 for a traceback)", EXIT_RUNTIME, as_json, debug)
    if follower:
        return result
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result))
    else:
        render(result)
    return result


def _fail(msg: str, code: int, as_json: bool, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    typer.echo(f"error: {msg}", err=True)
    if as_json and os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps({"error": msg, "exit_code": code}))
    raise typer.Exit(code)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200).print(t)


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="Local HF model directory, a recipe name (llama-2-7b) or a hub id.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output directory [default: ./NAME-elastic].")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML (see recipes/).")] = None,
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration text: file, directory, JSONL (text field) or 'stdlib'.")] = None,
    calib_samples: Annotated[int | None, typer.Option("--calib-samples", min=1, help="Number of calibration sequences N.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=2, help="Calibration sequence length L in tokens.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Compute dtype: float32 or bfloat16.")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out text for a perplexity-per-width report.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin (pickle) weights, loaded with weights_only=True.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")] = "5GB",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Elastic training steps (enables the train stage).")] = None,
    train_tokens: Annotated[int | None, typer.Option("--train-tokens", min=1, help="Elastic training tokens (enables the train stage).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate of elastic training.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Global batch size in sequences.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Training text (default: the calibration text).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue elastic training from the newest checkpoint.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank MLP neurons and attention heads, permute them by importance, train every width, write OUT."""
    from .checkpoint import parse_size
    from .convert import ConvertOptions
    from .convert import convert as do_convert

    def work(rep: Reporter):
        opts = ConvertOptions(recipe, calib, calib_samples, seq_len, device, dtype, eval_data, allow_pickle,
                              parse_size(max_shard_size), steps, train_tokens, lr, batch_size, grad_accum, data,
                              resume)
        return do_convert(model, output, opts, force=force, reporter=rep)

    def render(r) -> None:
        typer.echo(r.output)
        if r.training:
            t = r.training
            before = {row["name"]: row for row in t["before"]}
            _table(f"held-out perplexity: elastic training ({t['steps']} steps, {t['tokens']:,} tokens, "
                   f"{t['tokens_per_s']:.0f} tok/s)", ["configuration", "mean mlp", "mean heads", "prune-only", "trained"],
                   [[row["name"], f"{sum(row['mlp']) / len(row['mlp']):.0f}", f"{sum(row['heads']) / len(row['heads']):.1f}",
                     f"{before[row['name']]['ppl']:.2f}", f"{row['ppl']:.2f}"] for row in t["after"]])
        if r.widths:
            _table("held-out perplexity at uniform width", ["width", "mlp", "heads", "ppl"],
                   [[f"{w['ratio']:.0%}", w["mlp"], w["heads"], f"{w['ppl']:.2f}"] for w in r.widths])

    run(work, as_json, render)


@app.command()
def pretrain(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output model directory.")],
    corpus: Annotated[str, typer.Option("--corpus", help="Training text: 'stdlib' (the Python standard library), a file, directory or JSONL.")] = "stdlib",
    size: Annotated[str, typer.Option("--size", help="tiny, small (~4M params) or base (~14M).")] = "small",
    steps: Annotated[int, typer.Option("--steps", min=1)] = 600,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8)] = 256,
    lr: Annotated[float, typer.Option("--lr")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 autocast on AMX/AVX512-BF16 CPUs and GPUs), fp32 or bf16.")] = "auto",
    like: Annotated[Path | None, typer.Option("--like", help="Take architecture and tokenizer from this model directory (fresh weights; --size is ignored).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a small Llama base model (and its BPE tokenizer) from scratch on a real text corpus."""
    from .pretrain import pretrain as do_pretrain

    def render(r) -> None:
        typer.echo(r.output)
        typer.echo(f"{r.params / 1e6:.2f}M params, {r.train_tokens} tokens in {r.seconds:.0f}s "
                   f"({r.tokens_per_s:.0f} tok/s); held-out ppl {r.heldout_ppl:.2f}", err=True)

    run(lambda rep: do_pretrain(output, corpus, size, steps, batch_size, seq_len, lr, seed, force, precision, rep, like), as_json, render)


def _elastic_arg(path: Path | None) -> Path:
    """ELASTIC, or the one recorded in ./flex-project.json."""
    from .project import default_elastic

    return path if path is not None else default_elastic()


ElasticArg = Annotated[Path | None, typer.Argument(help="Elastic checkpoint [default: the one converted here, from ./flex-project.json].")]


@app.command()
def profile(
    elastic: ElasticArg = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16 (GPU).")] = "float32",
    batch: Annotated[int, typer.Option("--batch", help="Batch size B.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Prefill: tokens per sequence S.")] = 128,
    phase: Annotated[str, typer.Option("--phase", help="prefill (a forward over B x S) or decode (one token per sequence).")] = "prefill",
    kv_len: Annotated[int | None, typer.Option("--kv-len", help="Decode: cached tokens T [default: --seq-len].")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats per entry (median; >= 3).")] = 7,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Warm-up seconds per entry (and >= 10 calls).")] = 0.2,
    correct: Annotated[int, typer.Option("--correct", help="Fit a per-regime scale on N measured random configurations.")] = 0,
    validate: Annotated[int, typer.Option("--validate", help="Measure N random configurations end to end against the table.")] = 0,
    fit: Annotated[str, typer.Option("--fit", help="bilinear: least-squares smooth the joint table (a + b*mlp + c*heads + d*mlp*heads); none: raw entries.")] = "bilinear",
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Time every entry under CUDA graphs (GPU; use it for decode).")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Measure per-layer latency at every (MLP width, heads) choice on this device into ELASTIC's table."""
    from .profile import ProfileOptions
    from .profile import profile as do_profile

    def work(rep: Reporter):
        o = ProfileOptions(device, dtype, batch, seq_len, phase, kv_len, repeats, warmup_s, correct=correct,
                           validate=validate, seed=seed, fit=fit, cuda_graphs=cuda_graphs)
        return do_profile(_elastic_arg(elastic), o, rep)

    def render(r) -> None:
        typer.echo(f"{r.regime}")
        typer.echo(f"fixed part {r.fixed_ms:.3f} ms · full model {r.full_ms:.3f} ms · smallest {r.smallest_ms:.3f} ms "
                   f"· max spread {r.max_spread:.1%} · scale {r.scale:.3f}")
        mlps = sorted({e["mlp"] for e in r.table}, reverse=True)
        heads = sorted({e["heads"] for e in r.table}, reverse=True)
        ms = {(e["mlp"], e["heads"]): e["layer_ms"] for e in r.table}
        _table("per-layer latency (ms) by MLP width (rows) and heads (columns)", ["mlp", *map(str, heads)],
               [[m, *[f"{ms[(m, h)]:.3f}" for h in heads]] for m in mlps])
        if r.validation:
            v = r.validation
            _table(f"validation: {v['n']} random per-layer configurations, predicted vs measured",
                   ["within ±10%", "within ±5%", "p90 |err|", "mean signed err", "max |err|"],
                   [[f"{v['within_10pct']:.0%}", f"{v['within_5pct']:.0%}", f"{v['p90_abs_err']:.1%}",
                     f"{v['mean_signed_err']:+.1%}", f"{v['max_abs_err']:.1%}"]])
            dn = v["drift_normalized"]
            typer.echo(f"machine drift during validation {v['reference_drift']:.1%} (full model re-timed before each); "
                       f"drift-normalized: {dn['within_10pct']:.0%} within ±10%, p90 |err| {dn['p90_abs_err']:.1%}")

    run(work, as_json, render)


@app.command("train-router")
def train_router_cmd(
    elastic: ElasticArg = None,
    budgets: Annotated[str | None, typer.Option("--budgets", help="Latency targets, e.g. 30ms,40ms,60% [default: 40%,55%,70%,85%].")] = None,
    static: Annotated[bool, typer.Option("--static/--no-static", help="Train the static (budget -> per-layer widths) router.")] = True,
    dynamic: Annotated[bool, typer.Option("--dynamic/--no-dynamic", help="Train the input-adaptive router.")] = True,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Static router steps.")] = 600,
    dynamic_steps: Annotated[int, typer.Option("--dynamic-steps", min=1, help="Input-adaptive router steps.")] = 200,
    joint_steps: Annotated[int, typer.Option("--joint-steps", min=0, help="Joint LLM + static router fine-tuning steps (0 = skip).")] = 0,
    sm_warmup: Annotated[int, typer.Option("--sm-warmup", min=8, help="Surrogate warm-up configurations.")] = 256,
    surrogate: Annotated[bool, typer.Option("--surrogate/--no-surrogate", help="Train the static router through the surrogate model (default) or directly on the LM loss (ablation).")] = True,
    regime: Annotated[str | None, typer.Option("--regime", help="Latency-table regime key (or a unique part of it) [default: newest].")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Text for router training and evaluation [default: the conversion's].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8)] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train static and input-adaptive routers against the latency table, with the surrogate model."""
    from .router_train import RouterHyper
    from .train_router import train_router

    def work(rep: Reporter):
        h = RouterHyper(steps=steps, dynamic_steps=dynamic_steps, joint_steps=joint_steps, sm_warmup=sm_warmup,
                        batch_size=batch_size, seq_len=seq_len, surrogate=surrogate, seed=seed)
        return train_router(_elastic_arg(elastic), budgets, static, dynamic, h, regime, data, reporter=rep)

    def render(r) -> None:
        typer.echo(r.elastic)
        typer.echo(f"regime {r.regime} · full {r.full_ms:.3f} ms · smallest {r.smallest_ms:.3f} ms · "
                   f"surrogate Spearman {r.sm_spearman:.3f}")
        rows = []
        for b in r.budgets:
            mlp = [c["mlp"] for c in b.config]
            heads = [c["heads"] for c in b.config]
            rows.append([b.budget, f"{b.budget_ms:.2f}", f"{b.lut_latency_ms:.2f}", f"{sum(mlp) / len(mlp):.0f}",
                         f"{sum(heads) / len(heads):.1f}", f"{b.ppl:.2f}", f"{b.uniform_ppl:.2f} @ {b.uniform_latency_ms:.2f}",
                         "-" if b.dynamic_ppl is None else f"{b.dynamic_ppl:.2f} @ {b.dynamic_mean_latency_ms:.2f}",
                         "-" if b.joint_ppl is None else f"{b.joint_ppl:.2f}"])
        _table("held-out ppl per budget: static router, uniform width at equal LUT latency, input-adaptive, after joint",
               ["budget", "ms", "LUT ms", "mean mlp", "mean heads", "static ppl", "uniform ppl @ ms",
                "adaptive ppl @ ms", "joint ppl"], rows)
        typer.echo("per-layer configurations: flex train-router --json (budgets[].config)", err=True)

    run(work, as_json, render)


@app.command()
def extract(
    elastic: ElasticArg = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output directory [default: ./NAME-BUDGET]; with several budgets, the parent of one directory per budget.")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help="40ms, 0.04s, 60% (of the full latency) or 3.5B / 3500M parameters; comma-separated for several.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="JSON per-layer configuration: [{mlp, heads}, ...].")] = None,
    uniform: Annotated[str | None, typer.Option("--uniform", help="The same fractions in every layer, e.g. mlp=0.5,heads=0.75.")] = None,
    regime: Annotated[str | None, typer.Option("--regime", help="Latency-table regime key (or a unique part of it) [default: newest].")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, stock (uniform only) or flex (per-layer sizes).")] = "auto",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")] = "5GB",
    verify: Annotated[bool | None, typer.Option("--verify/--no-verify", help="Check logits against the elastic model and measure latency [default: on when the model fits comfortably in RAM].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: configuration, shapes, shards and output size from the headers; write nothing.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Slice a standalone sub-model for a budget that loads with stock transformers."""
    from .checkpoint import parse_size
    from .extract import extract as do_extract

    def work(rep: Reporter):
        return do_extract(_elastic_arg(elastic), output, budget, config, uniform, regime, fmt,
                          parse_size(max_shard_size), verify, force, rep, dry_run)

    def render(r) -> None:
        for m in r.models:
            typer.echo(m.output if m.planned_bytes is None else
                       f"{m.output} (dry run: {m.planned_bytes / 1e9:.2f} GB in {len(m.planned_files)} files)")
        rows = []
        for m in r.models:
            mlp = [c["mlp"] for c in m.config]
            heads = [c["heads"] for c in m.config]
            rows.append([m.budget or "-", m.format + (" (remote code)" if m.needs_remote_code else ""),
                         " ".join(f"{a}/{b}" for a, b in zip(mlp, heads)), f"{m.params / 1e6:.2f}M",
                         "-" if m.predicted_latency_ms is None else f"{m.predicted_latency_ms:.3f}",
                         "-" if m.measured_latency_ms is None else f"{m.measured_latency_ms:.3f}", m.method])
        _table("extracted", ["budget", "format", "mlp/heads per layer", "params", "predicted ms", "measured ms", "chosen by"],
               rows)

    run(work, as_json, render)


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A model directory (extracted, source, or elastic).")],
    data: Annotated[str, typer.Option("--data", help="Text: file, directory, JSONL (text field) or 'stdlib' (held-out split).")] = "stdlib",
    budget: Annotated[str | None, typer.Option("--budget", help="Elastic checkpoints: budgets to evaluate (as for extract).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Elastic checkpoints: a JSON per-layer configuration.")] = None,
    uniform: Annotated[str | None, typer.Option("--uniform", help="Elastic checkpoints: mlp=F,heads=F.")] = None,
    regime: Annotated[str | None, typer.Option("--regime")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1)] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8)] = 256,
    as_json: JsonOpt = False,
) -> None:
    """Held-out perplexity of a model, or of an elastic checkpoint at budgets / configurations."""
    from .evalcmd import evaluate

    def render(r) -> None:
        _table(f"held-out perplexity ({r.tokens:,} tokens of {r.data})", ["model", "params", "predicted ms", "ppl"],
               [[x["name"], f"{x['params'] / 1e6:.2f}M", "-" if x["predicted_latency_ms"] is None else f"{x['predicted_latency_ms']:.3f}",
                 f"{x['ppl']:.3f}"] for x in r.rows])

    run(lambda rep: evaluate(model, data, budget, config, uniform, regime, samples, seq_len, rep), as_json, render)


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A source, elastic or extracted checkpoint directory.")],
    no_data: Annotated[bool, typer.Option("--no-data", help="Skip the NaN/Inf scan (headers and metadata only).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check headers, index, shapes vs config, NaN/Inf and flexcli metadata; exit 2 listing the problems."""
    from .validate import validate as do_validate

    def work(rep: Reporter):
        with rep.task("validating"):
            return do_validate(path, check_data=not no_data)

    def render(r) -> None:
        typer.echo(f"{r.path}: {r.kind} checkpoint, {r.tensors} tensors, "
                   f"{'valid' if r.valid else f'{len(r.problems)} problem(s)'}")
        for p in r.problems:
            extra = "" if p.expected is None and p.found is None else f" (expected {p.expected}, found {p.found})"
            typer.echo(f"  {p.file}{' ' + p.tensor if p.tensor else ''}: {p.message}{extra}")

    if not run(work, as_json, render).valid:
        raise typer.Exit(EXIT_USAGE)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        sys.exit(code)
