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
from .spec import ElasticSpec, config_to_json

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
    from .evaluate import perplexity

    rows = []
    for r in ratios:
        cfg = elastic.spec.uniform(r, r)
        with elastic.configured(cfg):
            rows.append({"ratio": r, "mlp": cfg[0][0], "heads": cfg[0][1], "ppl": perplexity(elastic.model, seqs)})
    return rows


def convert(model: str, out: Path | None, opts: ConvertOptions, force: bool = False,
            reporter: Reporter | None = None) -> ConvertResult:
    """Resolve MODEL, compute importance, permute, and write the elastic checkpoint OUT atomically."""
    from .elastic import ElasticModel

    rep = reporter or Reporter()
    t0 = time.time()
    recipe = resolve_recipe(model, opts)
    out = (out or default_output(model)).resolve()
    check_output(out, force)
    src, source_desc = resolve_source(model, recipe, opts.allow_pickle)
    if out == src.path.resolve():
        raise UsageError(f"output {out} is the source model itself; choose another -o")
    device = resolve_device(recipe.device)
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

    with rep.task("loading model"):
        hf = load_model(src, device, recipe.dtype)
    order = recipe.importance.order
    if order == "importance":
        with rep.task("calibration (importance)", total=seqs.shape[0]) as task:
            scores = compute_importance(hf, src.arch, src.dims, seqs, c.batch_size, task.advance)
        perms = permutations(scores, src.dims)
    elif order == "random":
        scores = random_scores(src.dims, recipe.importance.seed)
        perms = permutations(scores, src.dims)
    else:
        scores, perms = None, identity_permutations(src.dims)
    permute_model_(hf, src.arch, src.dims, perms)
    widths = []
    if eval_seqs is not None:
        with rep.task("held-out perplexity per width"):
            widths = uniform_width_report(ElasticModel(hf, src.arch, spec), eval_seqs)

    with atomic_dir(out, force) as tmp, rep.task("writing elastic checkpoint"):
        stream = ((n, permute_tensor(n, t, src.arch, src.dims, perms)) for n, t in src.iter_tensors())
        files = write_tensors(tmp, stream, opts.max_shard_size)
        copy_files(src.non_weight_files(), tmp)
        _write_importance(tmp / "flex_importance.safetensors", scores, perms)
        manifest = {
            "format": ELASTIC_FORMAT,
            "flexcli_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": sys.argv,
            "source": {"model": source_desc, "family": src.arch.family, "files": src.file_hashes()},
            "stages": {"permute": {"order": order, "calibration_tokens": int(seqs.numel())}},
            "weights": files,
            "spec": spec.to_dict(),
            "recipe": recipe.to_dict(),
            "reports": {"widths": widths, "full": config_to_json(spec.full()[:1])},
        }
        write_json(tmp / "flex_elastic.json", manifest)  # last: its presence marks a complete checkpoint
    from .project import record

    record(out, source_desc)
    return ConvertResult(str(out), source_desc, src.arch.family, spec.layers[0].mlp, spec.layers[0].heads,
                         spec.gqa, int(seqs.numel()), round(time.time() - t0, 2), widths)


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
