"""Conversion recipes: YAML validated into typed dataclasses; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

STAGES = ("permute", "train")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
P_FULL = 0.33  # probability of the full model per micro-batch (Megatron-LM's default [S2])


@dataclass
class ElasticSection:
    """Width choices, as fractions of the full width (rounded per layer, see spec.py)."""

    mlp_ratios: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25])
    head_ratios: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    mlp_multiple: int = 64
    gqa: str = "group"  # group (drop whole KV groups) | query (drop query heads inside every group)
    # k | legacy: narrowed rows stay whole llama.cpp quantization blocks (256 | 32 values), so a
    # quantized sub-model's ffn_down / attn_output do not fall back to a larger type; null: no rounding
    quant_blocks: str | None = None


@dataclass
class CalibrationSection:
    data: str = "stdlib"  # text file, directory, JSONL, or the built-in corpus "stdlib"
    samples: int = 256
    seq_len: int = 1024
    batch_size: int = 4


@dataclass
class ImportanceSection:
    order: str = "importance"  # importance | random (ablation baseline) | identity
    head_score: str = "norm"  # norm (head output L2 norm) | taylor (|a . dL/da|, one backward per batch)
    seed: int = 0


@dataclass
class EvalSection:
    """Held-out text for the perplexity report after conversion (null: no report)."""

    data: str | None = None
    samples: int = 64
    seq_len: int = 256


@dataclass
class TrainSection:
    """Elastic continued training (method.md §2.3); runs when "train" is in `stages`."""

    steps: int | None = None  # optimizer steps; or set `tokens`
    tokens: int | None = None  # training tokens (steps = tokens / (batch_size * seq_len * grad_accum))
    batch_size: int = 8  # global batch in sequences
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    p_full: float = P_FULL  # probability of the full model per micro-batch
    sampling: str = "layerwise"  # layerwise (per-layer random) | uniform (one width for all) | mixed
    sandwich: bool = False  # full + smallest + one random sub-network every micro-batch
    # JSON file of configurations (a list of [{mlp, heads} per layer], e.g. the budgets a router
    # deploys): sub-networks are drawn among them instead of at random (the full model still p_full)
    configs: str | None = None
    distill: float = 1.0  # weight of KL(frozen original || sub-network) vs LM loss; 0 = plain LM loss
    temperature: float = 1.0  # distillation temperature
    # keep the token embeddings and the LM head as converted: they are not elastic, and training them
    # moves the full model (SmolLM2, 20k tokens: full-model prose ppl +2.4% trained, +0.2% frozen)
    freeze_embeddings: bool = True
    # block-wise reconstruction warm start (train/blockwise.py) before the end-to-end steps: tokens
    # cached from the training stream (0 = none), passes over them, and its peak learning rate
    blockwise_tokens: int = 0
    blockwise_epochs: int = 1
    blockwise_lr: float = 1e-4
    data: str | None = None  # training text (default: calibration.data)
    val_samples: int = 32  # held-out sequences for the report
    val_random_configs: int = 3  # random per-layer configurations in the report
    checkpoint_every: int = 100  # steps between checkpoints (0 = none)
    keep_checkpoints: int = 2


@dataclass
class Recipe:
    name: str | None = None
    source: str | None = None  # hub id or local path the recipe name resolves to
    dtype: str = "float32"  # compute dtype for calibration (weights keep their stored dtype)
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["permute"])
    elastic: ElasticSection = field(default_factory=ElasticSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"recipe: {where} must be a list")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    raise UsageError(f"recipe: {where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise UsageError(f"recipe: {where or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            raise UsageError(
                f"recipe: unknown key {(where + '.' if where else '') + str(k)!r}; "
                f"valid keys here: {', '.join(names)}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def validate(r: Recipe) -> Recipe:
    """Check value ranges; raises UsageError with the offending key."""
    for s in r.stages:
        if s not in STAGES:
            raise UsageError(f"recipe: unknown stage {s!r}; stages: {', '.join(STAGES)}")
    e = r.elastic
    for key, ratios in (("elastic.mlp_ratios", e.mlp_ratios), ("elastic.head_ratios", e.head_ratios)):
        if not ratios or any(not 0 < x <= 1 for x in ratios):
            raise UsageError(f"recipe: {key} must be a non-empty list of fractions in (0, 1]")
    if e.gqa not in ("query", "group"):
        raise UsageError(f"recipe: elastic.gqa must be 'query' or 'group', got {e.gqa!r}")
    if e.mlp_multiple < 1:
        raise UsageError("recipe: elastic.mlp_multiple must be >= 1")
    if e.quant_blocks not in (None, "k", "legacy"):
        raise UsageError(f"recipe: elastic.quant_blocks must be k, legacy or null, got {e.quant_blocks!r}")
    c = r.calibration
    if c.samples < 1 or c.seq_len < 2 or c.batch_size < 1:
        raise UsageError("recipe: calibration.samples, seq_len and batch_size must be positive")
    if r.importance.head_score not in ("norm", "taylor"):
        raise UsageError(
            f"recipe: importance.head_score must be norm or taylor, got {r.importance.head_score!r}"
        )
    if r.importance.order not in ("importance", "random", "identity"):
        raise UsageError(
            f"recipe: importance.order must be importance, random or identity, got {r.importance.order!r}"
        )
    t = r.train
    if not 0 <= t.p_full <= 1:
        raise UsageError(f"recipe: train.p_full must be in [0, 1], got {t.p_full}")
    if t.sampling not in ("layerwise", "uniform", "mixed"):
        raise UsageError(f"recipe: train.sampling must be layerwise, uniform or mixed, got {t.sampling!r}")
    if not 0 <= t.distill <= 1 or t.temperature <= 0:
        raise UsageError("recipe: train.distill must be in [0, 1] and train.temperature positive")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"recipe: train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if t.batch_size < 1 or t.grad_accum < 1 or t.seq_len < 2 or t.lr <= 0 or t.keep_checkpoints < 1:
        raise UsageError(
            "recipe: train.batch_size, grad_accum, seq_len, lr and keep_checkpoints must be positive"
        )
    if t.configs is not None and t.sandwich:
        raise UsageError("recipe: train.configs and train.sandwich exclude each other")
    if t.blockwise_tokens < 0 or t.blockwise_epochs < 1 or t.blockwise_lr <= 0:
        raise UsageError(
            "recipe: train.blockwise_tokens must be >= 0, blockwise_epochs >= 1 and blockwise_lr positive"
        )
    if (t.steps is not None and t.steps < 1) or (t.tokens is not None and t.tokens < 1):
        raise UsageError("recipe: train.steps and train.tokens must be positive")
    if "train" in r.stages and t.steps is None and t.tokens is None:
        raise UsageError(
            "recipe: the train stage needs train.steps or train.tokens (or --steps / --train-tokens)"
        )
    if r.dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"recipe: dtype must be float32, bfloat16 or float16, got {r.dtype!r}")
    if r.device.split(":")[0] not in ("auto", "cpu", "cuda"):
        raise UsageError(f"recipe: device must be auto, cpu or cuda, got {r.device!r}")
    return r


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe YAML file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe {p}: invalid YAML ({str(e).splitlines()[0]})") from None
    return validate(_build(Recipe, raw, ""))


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped in recipes/."""
    root = resources.files("flexcli.recipes")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def find_builtin(name: str) -> Path | None:
    return builtin_recipes().get(name)
