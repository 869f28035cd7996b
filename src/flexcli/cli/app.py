"""The `flex` command line: parse flags into typed options, call one library function, render its result.

Results go to stdout (a table, a path, or with --json exactly one JSON document); progress, logs and
errors go to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 3 infeasible request.
Heavy imports (torch, transformers) happen inside the commands, so `flex --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .. import __version__
from ..errors import EXIT_USAGE
from ..progress import Reporter
from . import render
from .render import STATE, run

T = TypeVar("T")

EPILOG = (
    "Exit codes: 0 ok · 1 runtime failure · 2 bad usage or input · 3 infeasible request · 130 interrupted. "
    "FLEX_DEBUG=1 shows tracebacks."
)
app = typer.Typer(
    name="flex",
    help="Flextron for Hugging Face LLMs: one elastic model, many latency budgets.",
    epilog=EPILOG,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
MaxShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flex {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only results and errors.")] = False,
    verbose: Annotated[
        int, typer.Option("-v", "--verbose", count=True, help="More logs; tracebacks on errors.")
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Flextron for Hugging Face LLMs."""
    STATE["verbosity"] = -1 if quiet else verbose
    if verbose == 0:  # transformers' own warnings and tqdm bars are noise on our stderr
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


def options(cls: type[T], params: dict[str, Any], **values: Any) -> T:
    """`cls` (an options dataclass) from a command's parameters: flags map one to one onto fields of the same
    name (which is how errors about a field are traced back to its flag); `values` are parsed ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in params.items() if k in names and k not in values}, **values)


def _elastic_arg(path: Path | None) -> Path:
    """ELASTIC, or the one recorded in ./flex-project.json."""
    from ..io.project import default_elastic

    return path if path is not None else default_elastic()


ElasticArg = Annotated[
    Path | None,
    typer.Argument(help="Elastic checkpoint [default: the one converted here, from ./flex-project.json]."),
]
RegimeOpt = Annotated[
    str | None,
    typer.Option("--regime", help="Latency-table regime key (or a unique part of it) [default: newest]."),
]


# One line per option reads best: the command signatures are declarations, not logic.
# fmt: off
@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="Local HF model directory, GGUF file, recipe name (llama-2-7b) or hub id.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output directory [default: ./NAME-elastic].")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML (see recipes/).")] = None,
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration text: file, directory, JSONL (text field) or 'stdlib'.")] = None,
    calib_samples: Annotated[int | None, typer.Option("--calib-samples", min=1, help="Number of calibration sequences N.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=2, help="Calibration sequence length L in tokens.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Compute dtype: float32 or bfloat16; for a GGUF source also the stored dtype (default bfloat16).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out text for a perplexity-per-width report.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin (pickle) weights, loaded with weights_only=True.")] = False,
    max_shard_size: MaxShardOpt = "5GB",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Elastic training steps (enables the train stage).")] = None,
    train_tokens: Annotated[int | None, typer.Option("--train-tokens", min=1, help="Elastic training tokens (enables the train stage).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate of elastic training.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Global batch size in sequences.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Training text (default: the calibration text).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue elastic training from the newest checkpoint.")] = False,
    quant_blocks: Annotated[str | None, typer.Option("--quant-blocks", help="k or legacy: round narrowed MLP widths and head counts so their rows are whole llama.cpp quantization blocks (256 or 32 values) [default: the recipe's elastic.quant_blocks].")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank MLP neurons and attention heads, permute them by importance, train every width, write OUT."""
    params = dict(locals())
    from ..commands import convert as cmd
    from .parse import parse_size

    def convert_(rep: Reporter):  # the shard size is parsed inside run(), which maps its error to a flag
        return cmd.convert(
            model, options(cmd.ConvertOptions, params, max_shard_bytes=parse_size(max_shard_size)), rep
        )

    run(convert_, as_json, render.convert_result, {"output": "-o/--output"})


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
    params = dict(locals())
    from ..commands.pretrain import PretrainOptions
    from ..commands.pretrain import pretrain as do_pretrain

    o = options(PretrainOptions, params)
    run(lambda rep: do_pretrain(output, o, rep), as_json, render.pretrain_result)


@app.command()
def profile(
    elastic: ElasticArg = None,
    runtime: Annotated[str, typer.Option("--runtime", help="torch (transformers on --device) or llama.cpp (llama-cpp-python on this CPU; GGUF files as flex extract --format gguf writes them).")] = "torch",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="torch: float32, bfloat16 or float16 (GPU).")] = "float32",
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="llama.cpp: type of the timed files, WEIGHTS[/EMBED] (f16, q8_0, q4_k_m, q4_0/q4_0, ...); comma-separated for one table per type. Extract with the same type.")] = "f16",
    threads: Annotated[int | None, typer.Option("--threads", help="llama.cpp: threads [default: the CPUs this process may use].")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch size B.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Prefill: tokens per sequence S.")] = 128,
    phase: Annotated[str, typer.Option("--phase", help="prefill (a forward over B x S) or decode (one token per sequence).")] = "prefill",
    kv_len: Annotated[int | None, typer.Option("--kv-len", help="Decode: cached tokens T [default: --seq-len].")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Samples per timing, each paired with one of the full model (median; >= 3).")] = 7,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds per entry, each after a timing of the full model (median of drift-normalized timings; >= 2).")] = 3,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Warm-up seconds per timing (and >= 5 calls).")] = 0.1,
    correct: Annotated[int, typer.Option("--correct", help="Fit a per-regime scale on N measured random per-layer configurations (0: none).")] = 8,
    validate: Annotated[int, typer.Option("--validate", help="Measure N random configurations end to end against the table.")] = 0,
    max_noise: Annotated[float, typer.Option("--max-noise", help="Refuse the table when entries vary by more than this between rounds (median).")] = 0.10,
    min_within: Annotated[float, typer.Option("--min-within", help="With --validate: refuse the table when fewer than this share are within ±10% (drift-normalized).")] = 0.9,
    accept_noisy: Annotated[bool, typer.Option("--accept-noisy", help="Write a table that fails its checks (they are kept in its header).")] = False,
    fit: Annotated[str, typer.Option("--fit", help="bilinear: least-squares smooth the joint table (a + b*mlp + c*heads + d*mlp*heads); none: raw entries.")] = "bilinear",
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Time every entry under CUDA graphs (GPU; use it for decode).")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Measure per-layer latency at every (MLP width, heads) choice on this device into ELASTIC's table."""
    params = dict(locals())
    from ..commands.profile import ProfileOptions
    from ..commands.profile import profile_types as do_profile

    o = options(ProfileOptions, params)
    flags = {"gguf_type": "--gguf-type", "max_noise": "--max-noise", "min_within": "--min-within"}
    run(lambda rep: do_profile(_elastic_arg(elastic), o, rep), as_json, render.profile_result, flags)


@app.command("train-router")
def train_router_cmd(
    elastic: ElasticArg = None,
    budgets: Annotated[str | None, typer.Option("--budgets", help="Latency targets, e.g. 30ms,40ms,60% [default: 40%,55%,70%,85%].")] = None,
    static: Annotated[bool, typer.Option("--static/--no-static", help="Train the static (budget -> per-layer widths) router.")] = True,
    dynamic: Annotated[bool, typer.Option("--dynamic/--no-dynamic", help="Train the input-adaptive router.")] = True,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Static router steps.")] = 600,
    dynamic_steps: Annotated[int, typer.Option("--dynamic-steps", min=1, help="Input-adaptive router steps.")] = 200,
    dynamic_train: Annotated[str, typer.Option("--dynamic-train", help="Input-adaptive router: direct (the frozen LM's loss at the sampled widths, its gradient through the width mixture, every step) or surrogate (the paper's gated surrogate; an ablation).")] = "direct",
    dynamic_init: Annotated[bool, typer.Option("--dynamic-init/--no-dynamic-init", help="Start the input-adaptive router at the static router's choices.")] = True,
    dynamic_source: Annotated[str, typer.Option("--dynamic-source", metavar="LAYER|each", help="The layer whose input decides its own and every later layer's MLP width, one router call per decode step (earlier layers run the budget's static choice); `each`: every layer routes from its own input.")] = "1",
    joint_steps: Annotated[int, typer.Option("--joint-steps", min=0, help="Joint LLM + static router fine-tuning steps (0 = skip).")] = 0,
    sm_warmup: Annotated[int, typer.Option("--sm-warmup", min=8, help="Surrogate warm-up configurations.")] = 256,
    surrogate: Annotated[bool, typer.Option("--surrogate/--no-surrogate", help="Train the static router through the surrogate model (default) or directly on the LM loss (ablation).")] = True,
    regime: RegimeOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="Text for router training and evaluation [default: the conversion's].")] = None,
    compensate: Annotated[bool, typer.Option("--compensate/--no-compensate", help="Judge every configuration as `flex extract` writes it, narrowed projections refit on calibration text (static router and report).")] = False,
    compensate_tokens: Annotated[int, typer.Option("--compensate-tokens", min=1, help="Calibration tokens for the compensation.")] = 16384,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8)] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train static and input-adaptive routers against the latency table, with the surrogate model."""
    params = dict(locals())
    from ..commands.train_router import (
        DEFAULT_BUDGETS,
        RouterHyper,
        TrainRouterOptions,
        parse_source,
        train_routers,
    )
    from ..plan.budget import parse_budgets

    def work(rep: Reporter):
        h = options(RouterHyper, params, dynamic_source=parse_source(dynamic_source))
        o = options(TrainRouterOptions, params, budgets=parse_budgets(budgets or DEFAULT_BUDGETS), hyper=h)
        return train_routers(_elastic_arg(elastic), o, rep)

    run(work, as_json, render.train_router_result, {"static": "--static/--dynamic"})


BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="40ms, 0.04s, 60% (of the full latency) or 3.5B / 3500M parameters; comma-separated for several.",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="JSON per-layer configuration: [{mlp, heads}, ...].")
]
UniformOpt = Annotated[
    str | None, typer.Option("--uniform", help="The same fractions in every layer, e.g. mlp=0.5,heads=0.75.")
]


@app.command()
def extract(
    elastic: ElasticArg = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output directory (gguf: file) [default: ./NAME-BUDGET, gguf: ./NAME-BUDGET.gguf]; with several budgets, the parent of one per budget.")] = None,
    force: ForceOpt = False,
    budget: BudgetOpt = None,
    config: ConfigOpt = None,
    uniform: UniformOpt = None,
    regime: RegimeOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, stock (uniform only), flex (per-layer sizes, transformers with remote code) or gguf (one llama.cpp file per budget: llama/qwen2 when uniform, deci otherwise).")] = "auto",
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="gguf: WEIGHTS[/EMBED]. f32, f16, bf16 as written; q8_0, q6_k, q5_k_m, q5_k_s, q5_0, q5_1, q4_k_m, q4_k_s, q4_0, q4_1, iq4_nl, iq4_xs, q3_k_l, q3_k_m, q3_k_s, q2_k by llama.cpp's quantizer; /EMBED sets the embedding and output tensors' type (e.g. q4_0/q4_0); auto: for each --budget in ms, the type (one llama.cpp table each) whose configuration has the lowest held-out loss in llama.cpp.")] = "f16",
    imatrix: Annotated[bool, typer.Option("--imatrix/--no-imatrix", help="gguf, quantized types: weigh the quantizer by the sub-model's importance matrix from the conversion's calibration text.")] = True,
    imatrix_tokens: Annotated[int, typer.Option("--imatrix-tokens", min=1, help="Calibration tokens for the importance matrix.")] = 8192,
    compensate: Annotated[bool | None, typer.Option("--compensate/--no-compensate", help="Refit the kept columns of every narrowed down_proj / o_proj by damped least squares on the full model's activations over the conversion's calibration text (same shapes and format) [default: on when the model and its calibration moments fit comfortably in RAM].")] = None,
    compensate_tokens: Annotated[int, typer.Option("--compensate-tokens", min=1, help="Calibration tokens for the compensation.")] = 16384,
    max_shard_size: MaxShardOpt = "5GB",
    verify: Annotated[bool | None, typer.Option("--verify/--no-verify", help="Check logits against the elastic model (gguf: in llama.cpp, when llama-cpp-python is installed) and measure latency [default: on when the model fits comfortably in RAM].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: configuration, shapes, shards and output size from the headers; write nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Slice a standalone sub-model for a budget that loads with stock transformers."""
    params = dict(locals())
    from ..commands.extract import ExtractOptions
    from ..commands.extract import extract as do_extract
    from ..errors import UsageError
    from .parse import parse_size, request

    def work(rep: Reporter):
        req = request(budget, config, uniform)
        if req is None:
            raise UsageError("give exactly one of --budget, --config or --uniform")
        o = options(ExtractOptions, params, request=req, max_shard_bytes=parse_size(max_shard_size))
        return do_extract(_elastic_arg(elastic), o, rep)

    run(work, as_json, render.extract_result, {"fmt": "--format", "output": "-o/--output", "gguf_type": "--gguf-type"})


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A model directory (extracted, source, or elastic) or a GGUF file.")],
    data: Annotated[str, typer.Option("--data", help="Text: file, directory, JSONL (text field) or 'stdlib' (held-out split).")] = "stdlib",
    budget: Annotated[str | None, typer.Option("--budget", help="Elastic checkpoints: budgets to evaluate (as for extract).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Elastic checkpoints: a JSON per-layer configuration.")] = None,
    uniform: Annotated[str | None, typer.Option("--uniform", help="Elastic checkpoints: mlp=F,heads=F.")] = None,
    regime: Annotated[str | None, typer.Option("--regime")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1)] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8)] = 256,
    compensate: Annotated[bool, typer.Option("--compensate/--no-compensate", help="Elastic checkpoints: each configuration as `flex extract` writes it, its narrowed projections refit on calibration text.")] = True,
    compensate_tokens: Annotated[int, typer.Option("--compensate-tokens", min=1, help="Calibration tokens for the compensation.")] = 16384,
    as_json: JsonOpt = False,
) -> None:
    """Held-out perplexity of a model, or of an elastic checkpoint at budgets / configurations."""
    params = dict(locals())
    from ..commands.evaluate import EvalOptions, evaluate
    from .parse import request

    def work(rep: Reporter):
        o = options(EvalOptions, params, request=request(budget, config, uniform))
        return evaluate(model, o, rep)

    run(work, as_json, render.eval_result, {"budget": "--budget/--config/--uniform"})


@app.command("generate")
def generate_cmd(
    args: Annotated[list[str], typer.Argument(metavar="[ELASTIC] PROMPT", help="Elastic checkpoint [default: the one converted here, from ./flex-project.json] and the prompt ('-': read it from stdin).", show_default=False)],
    budget: BudgetOpt = None,
    adaptive: Annotated[bool, typer.Option("--adaptive", help="Input-adaptive routing: every token's MLP widths chosen at every decode step; head counts fixed at prefill.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate (greedy).")] = 64,
    regime: RegimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stream text from an elastic checkpoint at a budget (static or input-adaptive), extracting nothing."""
    params = dict(locals())
    from ..commands.generate import GenerateOptions, generate
    from ..errors import UsageError as _UsageError
    from ..plan.budget import parse_budgets

    def work(rep: Reporter):
        if len(args) > 2:
            raise _UsageError(f"expected [ELASTIC] PROMPT, got {len(args)} arguments (quote the prompt)")
        path = Path(args[0]) if len(args) == 2 else None
        prompt = sys.stdin.read() if args[-1] == "-" else args[-1]
        bs = parse_budgets(budget) if budget else None
        if bs is not None and len(bs) != 1:
            raise _UsageError("flex generate takes one budget", option="budget")
        stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        o = options(GenerateOptions, params, prompt=prompt, budget=bs[0] if bs else None, on_text=stream)
        return generate(_elastic_arg(path), o, rep)

    run(work, as_json, render.generate_result)


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A source, elastic or extracted checkpoint directory.")],
    no_data: Annotated[bool, typer.Option("--no-data", help="Skip the NaN/Inf scan (headers and metadata only).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check headers, index, shapes vs config, NaN/Inf and flexcli metadata; exit 2 listing the problems."""
    from ..commands.validate import validate as do_validate

    def work(rep: Reporter):
        with rep.task("validating"):
            return do_validate(path, check_data=not no_data)

    if not run(work, as_json, render.validate_result).valid:
        raise typer.Exit(EXIT_USAGE)


# fmt: on
def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        sys.exit(code)
