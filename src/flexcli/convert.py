"""`flex convert`: resolve a model, rank units on calibration text, permute, write an elastic checkpoint."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import SourceModel, atomic_dir, check_output, copy_files, write_json, write_tensors
from .data import STDLIB, load_sequences
from .errors import RuntimeFailure, UsageError
from .importance import compute_importance, random_scores
from .permute import identity_permutations, permutations, permute_model_, permute_tensor
from .progress import Reporter
from .recipe import Recipe, find_builtin, load_recipe, validate
from .spec import ElasticSpec

ELASTIC_FORMAT = "flexcli.elastic/1"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass
class ConvertOptions:
    """Command-line overrides of the recipe (None = keep the recipe's value)."""

    recipe: Path | None = None
    calib: str | None = None
    calib_samples: int | None = None
    seq_len: int | None = None
    device: str | None = None
    dtype: str | None = None
    eval_data: str | None = None
    allow_pickle: bool = False
    max_shard_size: int = 5 * 10**9
    steps: int | None = None
    train_tokens: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    data: str | None = None
    resume: bool = False


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
    widths: list[dict[str, Any]] = field(default_factory=list)  # held-out ppl per uniform width
    training: dict[str, Any] | None = None  # the train stage's report (before/after per configuration)


def default_output(model: str) -> Path:
    """`flex convert NAME` writes ./NAME-elastic (named after the model, never the source itself)."""
    return Path.cwd() / f"{Path(model.rstrip('/')).name}-elastic"


def resolve_recipe(model: str, opts: ConvertOptions) -> Recipe:
    if opts.recipe is not None:
        r = load_recipe(opts.recipe)
    elif not Path(model).exists() and (p := find_builtin(model)) is not None:
        r = load_recipe(p)
    else:
        r = Recipe()
    c = r.calibration
    c.data = opts.calib or c.data
    c.samples = opts.calib_samples or c.samples
    c.seq_len = opts.seq_len or c.seq_len
    r.device = opts.device or r.device
    r.dtype = opts.dtype or r.dtype
    r.eval.data = opts.eval_data or r.eval.data
    t = r.train
    if opts.steps is not None or opts.train_tokens is not None:
        t.steps, t.tokens = opts.steps, opts.train_tokens
        if "train" not in r.stages:
            r.stages.append("train")
    t.lr = opts.lr or t.lr
    t.batch_size = opts.batch_size or t.batch_size
    t.grad_accum = opts.grad_accum or t.grad_accum
    t.data = opts.data or t.data
    return validate(r)


def resolve_source(model: str, recipe: Recipe, allow_pickle: bool) -> tuple[SourceModel, str]:
    """A local directory, or the recipe's / the name's hub id downloaded into the HF cache."""
    local = Path(model)
    if local.exists():
        return SourceModel.open(local, allow_pickle), str(local.resolve())
    if recipe.source and Path(recipe.source).exists():
        return SourceModel.open(recipe.source, allow_pickle), str(Path(recipe.source).resolve())
    hub_id = recipe.source if recipe.name == model and recipe.source else model
    if "/" not in hub_id or hub_id.startswith((".", "/")) or hub_id.count("/") > 1:
        raise UsageError(f"model path {model} does not exist (and it is neither a recipe in recipes/ nor a hub id)")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hub_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, missing repo: all one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeFailure(f"cannot download {hub_id} from the Hugging Face Hub ({reason}); "
                             f"download it elsewhere and pass the local directory: flex convert /path/to/{hub_id.split('/')[-1]}"
                             ) from None
    return SourceModel.open(path, allow_pickle), hub_id


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


def load_model(src: SourceModel, device: torch.device, dtype: str):
    """Load the source with transformers' own model class (never remote code)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=getattr(torch, dtype), local_files_only=True, trust_remote_code=False,
            use_safetensors=not src.pickle)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load {src.path}: {str(e).splitlines()[0]}") from None
    return model.to(device)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


def uniform_width_report(elastic, seqs: torch.Tensor, ratios=(1.0, 0.75, 0.5, 0.25)) -> list[dict[str, Any]]:
    """Held-out perplexity at uniform MLP and head fractions."""
    from .elastic_train import width_report

    cfgs = [(f"{r:.0%}", elastic.spec.uniform(r, r)) for r in ratios]
    return [{"ratio": r, "mlp": row.mlp[0], "heads": row.heads[0], "ppl": row.ppl}
            for r, row in zip(ratios, width_report(elastic, seqs, cfgs))]


def convert(model: str, out: Path | None, opts: ConvertOptions, force: bool = False,
            reporter: Reporter | None = None) -> ConvertResult:
    """Resolve MODEL, rank and permute units, optionally train elastically, write OUT atomically."""
    from . import distributed as D
    from .elastic import ElasticModel
    from .train_ckpt import Checkpoints, recipe_hash, work_dir

    rep = reporter or Reporter()
    t0 = time.time()
    recipe = resolve_recipe(model, opts)
    out = (out or default_output(model)).resolve()
    check_output(out, force)
    src, source_desc = resolve_source(model, recipe, opts.allow_pickle)
    if out == src.path.resolve():
        raise UsageError(f"output {out} is the source model itself; choose another -o")
    training = "train" in recipe.stages
    ckpts = Checkpoints(work_dir(out), recipe_hash(recipe.to_dict()), src.file_hashes())
    device = D.init_from_env(resolve_device(recipe.device))
    rank, world = D.rank_world()
    resume_from = _resume_point(ckpts, training, opts.resume, force and rank == 0)
    spec = ElasticSpec.build(src.arch.family, src.dims, recipe.elastic.mlp_ratios, recipe.elastic.head_ratios,
                             recipe.elastic.mlp_multiple, recipe.elastic.gqa)
    tok = load_tokenizer(src.path)
    c = recipe.calibration
    torch.manual_seed(recipe.seed)
    seqs = load_sequences(tok, c.data, c.samples, c.seq_len, "train")
    if seqs.shape[0] < c.samples:
        rep.warn(f"calibration text gives {seqs.shape[0]} sequences of {c.seq_len} tokens, fewer than {c.samples}")
    eval_seqs = None
    if recipe.eval.data:
        split = "heldout" if recipe.eval.data == STDLIB else "train"
        eval_seqs = load_sequences(tok, recipe.eval.data, recipe.eval.samples, recipe.eval.seq_len, split)

    train_data = None
    if training:
        from .elastic_train import training_data

        with rep.task("reading training text"):
            train_data = training_data(recipe, tok)
    with rep.task("loading model"):
        hf = load_model(src, device, recipe.dtype)
    order = recipe.importance.order
    if resume_from is not None:
        scores, perms = _read_importance(ckpts.root / "perms.safetensors", src.dims)
    elif order == "importance":
        with rep.task("calibration (importance)", total=seqs.shape[0]) as task:
            scores = compute_importance(hf, src.arch, src.dims, seqs, c.batch_size, task.advance)
        scores = D.broadcast_object(scores)
        perms = permutations(scores, src.dims)
    elif order == "random":
        scores = random_scores(src.dims, recipe.importance.seed)
        perms = permutations(scores, src.dims)
    else:
        scores, perms = None, identity_permutations(src.dims)
    permute_model_(hf, src.arch, src.dims, perms)
    elastic = ElasticModel(hf, src.arch, spec)

    train_report = None
    if training:
        from .elastic_train import run_train_stage

        if resume_from is None and rank == 0:
            ckpts.root.mkdir(parents=True, exist_ok=True)
            _write_importance(ckpts.root / "perms.safetensors", scores, perms)
        hf, train_report = run_train_stage(hf, elastic, recipe, train_data, ckpts, resume_from, rep)
        if hf is None:  # not the writing rank
            D.barrier()
            D.shutdown()
            return ConvertResult(str(out), source_desc, src.arch.family, spec.layers[0].mlp, spec.layers[0].heads,
                                 spec.gqa, int(seqs.numel()), round(time.time() - t0, 2))
        elastic = ElasticModel(hf, src.arch, spec)
    widths = []
    if eval_seqs is not None:
        with rep.task("held-out perplexity per width"):
            widths = uniform_width_report(elastic, eval_seqs)

    with atomic_dir(out, force) as tmp, rep.task("writing elastic checkpoint"):
        if training:  # the trained weights, under the source's names and dtypes
            state = hf.state_dict()
            stream = ((n, state[n].to(t.dtype)) for n, t in src.iter_tensors())
        else:  # the source's own tensors, permuted (bit-identical otherwise)
            stream = ((n, permute_tensor(n, t, src.arch, src.dims, perms)) for n, t in src.iter_tensors())
        files = write_tensors(tmp, stream, opts.max_shard_size)
        copy_files(src.non_weight_files(), tmp)
        _write_importance(tmp / "flex_importance.safetensors", scores, perms)
        stages: dict[str, Any] = {"permute": {"order": order, "calibration_tokens": int(seqs.numel())}}
        reports: dict[str, Any] = {"widths": widths}
        if train_report is not None:
            stages["train"] = {k: v for k, v in train_report.to_dict().items() if k not in ("before", "after", "loss_curve")}
            reports["train"] = train_report.to_dict()
            write_json(tmp / "flex_train_report.json", train_report.to_dict())
        manifest = {
            "format": ELASTIC_FORMAT,
            "flexcli_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": sys.argv,
            "source": {"model": source_desc, "family": src.arch.family, "files": ckpts.source},
            "stages": stages,
            "weights": files,
            "spec": spec.to_dict(),
            "recipe": recipe.to_dict(),
            "reports": reports,
        }
        write_json(tmp / "flex_elastic.json", manifest)  # last: its presence marks a complete checkpoint
    if training:
        ckpts.remove()
    D.barrier()
    D.shutdown()
    from .project import record

    record(out, source_desc)
    return ConvertResult(str(out), source_desc, src.arch.family, spec.layers[0].mlp, spec.layers[0].heads,
                         spec.gqa, int(seqs.numel()), round(time.time() - t0, 2), widths,
                         train_report.to_dict() if train_report else None)


def _resume_point(ckpts, training: bool, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from; refuse to silently discard an earlier run's checkpoints."""
    if resume:
        if not training:
            raise UsageError("--resume needs the train stage (train.steps / --steps or --train-tokens)")
        latest = ckpts.latest()
        if latest is None:
            raise UsageError(f"--resume: no checkpoint in {ckpts.root}")
        ckpts.check(latest)
        return latest
    if ckpts.list():
        if not force:
            raise UsageError(f"checkpoints of an earlier run are in {ckpts.root}; pass --resume to continue it "
                             "or --force to start over")
        ckpts.remove()
    return None


def _read_importance(path: Path, dims):
    from safetensors.torch import load_file

    t = load_file(path)
    perms = [{u: t[f"layers.{i}.{u}_perm"] for u in ("neuron", "qhead", "kvhead")} for i in range(dims.num_layers)]
    scores = None
    if "layers.0.neuron_score" in t:
        scores = [{u: t[f"layers.{i}.{u}_score"] for u in ("neuron", "qhead")} for i in range(dims.num_layers)]
    return scores, perms


def _write_importance(path: Path, scores, perms) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, p in enumerate(perms):
        for unit, idx in p.items():
            tensors[f"layers.{i}.{unit}_perm"] = idx.to(torch.int64).contiguous()
        if scores is not None:
            for unit, s in scores[i].items():
                tensors[f"layers.{i}.{unit}_score"] = s.contiguous()
    save_file(tensors, str(path), metadata={"note": "scores in source order; perm[new] = old unit id"})
