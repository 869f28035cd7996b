"""`flex convert`: resolve a model, rank units on calibration text, permute, train, write an elastic checkpoint.

Stages: resolve (recipe and source) -> inspect (io.source) -> calibrate (importance scores) -> permute
-> train (optional elastic continued training) -> write (the one writer, then the manifest last, into a
temporary sibling committed atomically).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..arch.spec import QUANT_BLOCKS, ElasticSpec
from ..device import autocast_dtype, resolve_device
from ..elastic.evaluate import UniformWidth, uniform_width_report
from ..elastic.importance import (
    Scores,
    compute_importance,
    compute_importance_layerwise,
    layerwise_supported,
    random_scores,
)
from ..elastic.permute import Perms, identity_permutations, permutations, permute_model_, permute_tensor
from ..elastic.runtime import ElasticModel
from ..errors import RuntimeFailure, UsageError
from ..io import layout
from ..io.atomic import atomic_dir, check_output
from ..io.project import record
from ..io.safetensors import TORCH_TO_ST, write_model
from ..io.source import Source, SourceModel, open_source
from ..progress import Reporter
from ..recipe import Recipe, find_builtin, load_recipe, validate
from ..train import distributed as D
from ..train.checkpoints import Checkpoints, recipe_hash, work_dir
from ..train.data import has_split, load_sequences
from ..train.elastic import TrainReport, run_train_stage, training_data

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass(kw_only=True)
class ConvertOptions:
    """What to convert and where; the recipe fields here override the recipe's (None keeps its value)."""

    output: Path | None = None  # default ./NAME-elastic
    force: bool = False  # replace an existing output
    recipe: Path | None = None  # recipe YAML; default the built-in recipe named MODEL, else the defaults
    allow_pickle: bool = False  # accept .bin weights (loaded with weights_only=True)
    max_shard_bytes: int = 5 * 10**9
    # calibration and evaluation
    calib: str | None = None
    calib_samples: int | None = None
    seq_len: int | None = None
    eval_data: str | None = None
    resume: bool = False  # continue elastic training from the newest checkpoint
    # compute
    device: str | None = None
    dtype: str | None = None
    # elastic training (steps or tokens enable the train stage)
    steps: int | None = None
    train_tokens: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    data: str | None = None
    quant_blocks: str | None = None  # elastic.quant_blocks: k | legacy


@dataclass
class ConvertResult:
    output: str
    source: str
    family: str
    mlp_choices: list[int]
    head_choices: list[int]
    gqa: str
    calibration_tokens: int
    seconds: float
    widths: list[UniformWidth] = field(default_factory=list)  # held-out ppl per uniform width
    training: TrainReport | None = None  # the train stage's report (before/after per configuration)


def default_output(model: str) -> Path:
    """`flex convert NAME` writes ./NAME-elastic (named after the model, never the source itself;
    a GGUF file's name without .gguf)."""
    name = Path(model.rstrip("/")).name
    return Path.cwd() / f"{name[:-5] if name.lower().endswith('.gguf') else name}-elastic"


def resolve_recipe(model: str, o: ConvertOptions) -> Recipe:
    """The recipe file, else the built-in recipe named MODEL, else the defaults; then the overrides."""
    if o.recipe is not None:
        r = load_recipe(o.recipe)
    elif not Path(model).exists() and (p := find_builtin(model)) is not None:
        r = load_recipe(p)
    else:
        r = Recipe()
    c, t = r.calibration, r.train
    c.data, c.samples, c.seq_len = o.calib or c.data, o.calib_samples or c.samples, o.seq_len or c.seq_len
    r.device, r.dtype = o.device or r.device, o.dtype or r.dtype
    r.eval.data = o.eval_data or r.eval.data
    if o.quant_blocks is not None and o.quant_blocks not in QUANT_BLOCKS:
        raise UsageError(
            f"must be {' or '.join(QUANT_BLOCKS)}, got {o.quant_blocks!r}", option="quant_blocks"
        )
    r.elastic.quant_blocks = o.quant_blocks or r.elastic.quant_blocks
    if o.steps is not None or o.train_tokens is not None:
        t.steps, t.tokens = o.steps, o.train_tokens
        if "train" not in r.stages:
            r.stages.append("train")
    t.lr, t.batch_size, t.grad_accum = (
        o.lr or t.lr,
        o.batch_size or t.batch_size,
        o.grad_accum or t.grad_accum,
    )
    t.data = o.data or t.data
    return validate(r)


def resolve_source(
    model: str, recipe: Recipe, allow_pickle: bool, dtype: str | None = None
) -> tuple[Source, str]:
    """A local directory or GGUF file, or the recipe's / the name's hub id downloaded into the HF cache.
    `dtype` stores a GGUF source's dequantized tensors (default bfloat16)."""
    local = Path(model)
    if local.exists():
        return open_source(local, allow_pickle, dtype), str(local.resolve())
    if recipe.source and Path(recipe.source).exists():
        return open_source(recipe.source, allow_pickle, dtype), str(Path(recipe.source).resolve())
    hub_id = recipe.source if recipe.name == model and recipe.source else model
    if "/" not in hub_id or hub_id.startswith((".", "/")) or hub_id.count("/") > 1:
        raise UsageError(
            f"model path {model} does not exist (and it is neither a recipe in recipes/ nor a hub id)"
        )
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hub_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, missing repo: all one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeFailure(
            f"cannot download {hub_id} from the Hugging Face Hub ({reason}); download it "
            f"elsewhere and pass the local directory: flex convert /path/to/{hub_id.split('/')[-1]}"
        ) from None
    return open_source(path, allow_pickle), hub_id


@dataclass
class _Job:
    """The resolved inputs of one conversion."""

    recipe: Recipe
    src: Source
    source_desc: str
    out: Path
    spec: ElasticSpec
    ckpts: Checkpoints
    tokenizer: Any
    calib: torch.Tensor  # (n, seq_len) calibration sequences
    eval_seqs: torch.Tensor | None
    device: torch.device  # resolved (and refused when absent) before any heavy work

    @property
    def training(self) -> bool:
        return "train" in self.recipe.stages


def convert(
    model: str, options: ConvertOptions | None = None, reporter: Reporter | None = None
) -> ConvertResult:
    """Resolve MODEL, rank and permute units, optionally train elastically, write the output atomically."""
    rep = reporter or Reporter()
    o = options or ConvertOptions()
    t0 = time.time()
    job = _resolve(model, o, rep)
    device = D.init_from_env(job.device)
    rank, _ = D.rank_world()
    resume_from = _resume_point(job.ckpts, job.training, o.resume, o.force and rank == 0)
    train_data = None
    if job.training:
        with rep.task("reading training text"):
            cache = job.ckpts.root / f"data-rank{rank}"  # per rank: no races; a fresh run re-tokenizes
            if resume_from is None:
                shutil.rmtree(cache, ignore_errors=True)
            try:
                train_data = training_data(job.recipe, job.tokenizer, cache)
            except BaseException:  # bad training input leaves nothing behind
                shutil.rmtree(cache, ignore_errors=True)
                if resume_from is None and not job.ckpts.list():
                    shutil.rmtree(job.ckpts.root, ignore_errors=True)
                raise
    hf = None
    if _needs_model(job):
        with rep.task("loading model"):
            hf = job.src.load_model(device, job.recipe.dtype)
    scores, perms = _calibrate(job, hf, device, resume_from, rep)
    if hf is not None:
        permute_model_(hf, job.src.arch, job.src.dims, perms)
    train_report = None
    if job.training:
        assert train_data is not None
        if resume_from is None and rank == 0:
            job.ckpts.root.mkdir(parents=True, exist_ok=True)
            layout.write_importance(job.ckpts.root / "perms.safetensors", scores, perms)
        hf, train_report = run_train_stage(
            hf, ElasticModel(hf, job.src.arch, job.spec), job.recipe, train_data, job.ckpts, resume_from, rep
        )
        if hf is None:  # not the writing rank
            D.barrier()
            D.shutdown()
            return _result(job, t0)
    widths = []
    if job.eval_seqs is not None:
        with rep.task("held-out perplexity per width"):
            widths = uniform_width_report(ElasticModel(hf, job.src.arch, job.spec), job.eval_seqs)
    _write(job, hf, scores, perms, widths, train_report, o, rep)
    if job.training:
        job.ckpts.remove()
    D.barrier()
    D.shutdown()
    record(job.out, job.source_desc)
    return replace(_result(job, t0), widths=widths, training=train_report)


def _resolve(model: str, o: ConvertOptions, rep: Reporter) -> _Job:
    """Recipe, output, source (inspected), elastic spec, calibration and held-out text: everything cheap
    and checkable before the model is loaded."""
    recipe = resolve_recipe(model, o)
    out = (o.output or default_output(model)).resolve()
    check_output(out, o.force)
    device = resolve_device(recipe.device)
    src, source_desc = resolve_source(model, recipe, o.allow_pickle, o.dtype)
    if out == src.path.resolve():
        raise UsageError(f"output {out} is the source model itself; choose another output", option="output")
    e = recipe.elastic
    spec = ElasticSpec.build(
        src.arch.family, src.dims, e.mlp_ratios, e.head_ratios, e.mlp_multiple, e.gqa, e.quant_blocks
    )
    tok = src.tokenizer()
    c = recipe.calibration
    torch.manual_seed(recipe.seed)
    calib = load_sequences(tok, c.data, c.samples, c.seq_len, "train")
    if calib.shape[0] < c.samples:
        rep.warn(
            f"calibration text gives {calib.shape[0]} sequences of {c.seq_len} tokens, fewer than {c.samples}"
        )
    eval_seqs = None
    if recipe.eval.data:
        split = "heldout" if has_split(recipe.eval.data) else "train"
        eval_seqs = load_sequences(tok, recipe.eval.data, recipe.eval.samples, recipe.eval.seq_len, split)
    with rep.task("hashing source files"):  # provenance: SHA-256 of config and weights, read in chunks
        hashes = src.file_hashes()
    ckpts = Checkpoints(work_dir(out), recipe_hash(recipe.to_dict()), hashes)
    return _Job(recipe, src, source_desc, out, spec, ckpts, tok, calib, eval_seqs, device)


def _needs_model(job: _Job) -> bool:
    """Whether the whole model must be loaded: to train it, to evaluate it, or to score it at once.
    A prune-only conversion scores a safetensors source layer by layer and streams the permuted tensors
    from the source files, so its memory is one layer, not the model."""
    imp = job.recipe.importance
    if job.training or job.eval_seqs is not None:
        return True
    return (
        imp.order == "importance"
        and layerwise_supported(job.src, tuple(job.calib.shape), imp.head_score) is not None
    )


def _calibrate(
    job: _Job, hf, device: torch.device, resume_from: Path | None, rep: Reporter
) -> tuple[Scores | None, Perms]:
    """Importance scores and the permutations they induce (read back when resuming, so never re-ranked);
    layer by layer from the source files when the model is not loaded."""
    src, order = job.src, job.recipe.importance.order
    if resume_from is not None:
        return layout.read_importance(job.ckpts.root / "perms.safetensors", src.dims.num_layers)
    if order == "importance" and hf is None:
        assert isinstance(src, SourceModel)
        with rep.task("calibration (importance, layer by layer)", total=src.dims.num_layers) as task:
            scores = compute_importance_layerwise(
                src,
                job.calib,
                device,
                getattr(torch, job.recipe.dtype),
                job.recipe.calibration.batch_size,
                task.advance,
                autocast=autocast_dtype(device, "auto"),
            )
        scores = D.broadcast_object(scores)
        return scores, permutations(scores, src.dims)
    if order == "importance":
        with rep.task("calibration (importance)", total=job.calib.shape[0]) as task:
            scores = compute_importance(
                hf,
                src.arch,
                src.dims,
                job.calib,
                job.recipe.calibration.batch_size,
                task.advance,
                head_score=job.recipe.importance.head_score,
                autocast=autocast_dtype(next(hf.parameters()).device, "auto"),
            )
        scores = D.broadcast_object(scores)
        return scores, permutations(scores, src.dims)
    if order == "random":
        scores = random_scores(src.dims, job.recipe.importance.seed)
        return scores, permutations(scores, src.dims)
    return None, identity_permutations(src.dims)


def _write(
    job: _Job,
    hf,
    scores: Scores | None,
    perms: Perms,
    widths: list[UniformWidth],
    train_report: TrainReport | None,
    o: ConvertOptions,
    rep: Reporter,
) -> None:
    """The elastic checkpoint: weights under the source's names and dtypes, the source's other files
    verbatim, importance, reports, and the manifest last (its presence marks a complete checkpoint)."""
    src = job.src
    with atomic_dir(job.out, o.force) as tmp, rep.task("writing elastic checkpoint"):
        specs = src.tensor_specs()
        if train_report is not None:  # the trained weights, in the source's stored dtypes
            state = hf.state_dict()
            to_torch = {v: k for k, v in TORCH_TO_ST.items()}
            stream = ((n, state[n].to(to_torch[dt])) for n, dt, _ in specs)
        else:  # the source's own tensors, permuted (bit-identical otherwise)
            stream = ((n, permute_tensor(n, t, src.arch, src.dims, perms)) for n, t in src.iter_tensors())
        files = write_model(tmp, specs, stream, o.max_shard_bytes)
        src.write_metadata(tmp)
        layout.write_importance(tmp / layout.IMPORTANCE, scores, perms)
        stages: dict[str, Any] = {
            "permute": {"order": job.recipe.importance.order, "calibration_tokens": int(job.calib.numel())}
        }
        reports: dict[str, Any] = {"widths": [w.__dict__ for w in widths]}
        if train_report is not None:
            report = train_report.to_dict()
            stages["train"] = {k: v for k, v in report.items() if k not in ("before", "after", "loss_curve")}
            reports["train"] = report
            layout.write_json(tmp / layout.TRAIN_REPORT, report)
        layout.write_json(
            tmp / layout.ELASTIC,
            {
                "format": layout.ELASTIC_FORMAT,
                "flexcli_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": sys.argv,
                "source": {"model": job.source_desc, "family": src.arch.family, "files": job.ckpts.source},
                "stages": stages,
                "weights": files,
                "spec": job.spec.to_dict(),
                "recipe": job.recipe.to_dict(),
                "reports": reports,
            },
        )


def _result(job: _Job, t0: float) -> ConvertResult:
    layer0 = job.spec.layers[0]
    return ConvertResult(
        str(job.out),
        job.source_desc,
        job.src.arch.family,
        layer0.mlp,
        layer0.heads,
        job.spec.gqa,
        int(job.calib.numel()),
        round(time.time() - t0, 2),
    )


def _resume_point(ckpts: Checkpoints, training: bool, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from; refuse to silently discard an earlier run's checkpoints."""
    if resume:
        if not training:
            raise UsageError("resuming needs the train stage (train.steps or train.tokens)", option="resume")
        latest = ckpts.latest()
        if latest is None:
            raise UsageError(f"no checkpoint to resume from in {ckpts.root}", option="resume")
        ckpts.check(latest)
        return latest
    if ckpts.list():
        if not force:
            raise UsageError(
                f"checkpoints of an earlier run are in {ckpts.root}; pass {{flag:resume=True}} to continue it "
                "or {flag:force=True} to start over"
            )
        ckpts.remove()
    return None
