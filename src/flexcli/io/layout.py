"""flexcli's own files: every `flex_*` name, its schema version, its reader and its writer.

ELASTIC/                          (flex convert; a loadable HF model directory besides these)
    flex_elastic.json             manifest: format, spec, resolved recipe, provenance, reports
    flex_importance.safetensors   per-layer scores (source order) and permutations (new -> old)
    flex_train_report.json        elastic training before/after report (train stage only)
    flex_latency.json             latency tables, one per regime (flex profile)
    flex_routers.json             router metadata, report and sha256 of the tensors (flex train-router)
    flex_routers.safetensors      router weights
SUB/flex_extract.json             what a sub-model was cut for (flex extract)
SUB/modeling_flexcli.py           per-layer sub-models only: the transformers classes
BASE/flex_pretrain.json           corpus and training settings (flex pretrain)
./flex-project.json               the elastic checkpoints converted in this directory
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..arch.spec import ElasticSpec
from ..errors import UsageError
from .atomic import atomic_write

ELASTIC = "flex_elastic.json"
ELASTIC_FORMAT = "flexcli.elastic/1"
IMPORTANCE = "flex_importance.safetensors"
TRAIN_REPORT = "flex_train_report.json"
LATENCY = "flex_latency.json"
LATENCY_FORMAT = "flexcli.latency/1"
ROUTERS_JSON = "flex_routers.json"
ROUTERS_TENSORS = "flex_routers.safetensors"
ROUTERS_FORMAT = "flexcli.routers/2"  # /2: one router set per regime (router/store.py)
EXTRACT = "flex_extract.json"
PRETRAIN = "flex_pretrain.json"
MODELING = "modeling_flexcli.py"
PROJECT = "flex-project.json"
PROJECT_VERSION = 1
GGUF_TOKENIZER = "flex_gguf_tokenizer.gguf"  # a GGUF source's tokenizer.* keys, embedded by GGUF export
ELASTIC_FILES = (ELASTIC, IMPORTANCE, TRAIN_REPORT, LATENCY, ROUTERS_JSON, ROUTERS_TENSORS, GGUF_TOKENIZER)
PER_LAYER = (
    "flex_layers"  # config.json key of per-layer sub-models: [{intermediate_size, num_attention_heads, ...}]
)


def is_flex_file(name: str) -> bool:
    """flexcli's own metadata (never copied from one artefact into the next)."""
    return name.startswith("flex_")


UNIT_NAMES = ("neuron", "qhead", "kvhead")


def write_json(path: Path, obj: Any) -> None:
    """A JSON document (inside a directory that is committed atomically as a whole)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """A JSON document, or a one-line error naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid JSON ({e})") from None


def is_elastic(path: Path) -> bool:
    return (Path(path) / ELASTIC).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The flex_elastic.json of an elastic checkpoint, or a one-line error."""
    if not Path(path).is_dir():
        raise UsageError(f"elastic checkpoint {path} does not exist")
    if not is_elastic(path):
        raise UsageError(
            f"{path} is not a flexcli elastic checkpoint (no {ELASTIC}); run `flex convert` first"
        )
    manifest = read_json(Path(path) / ELASTIC)
    if not isinstance(manifest, dict) or "spec" not in manifest:
        raise UsageError(f"{path}/{ELASTIC} has no elastic spec; run `flex convert` again")
    return manifest


def read_spec(path: Path) -> ElasticSpec:
    """The ElasticSpec recorded in an elastic checkpoint."""
    return ElasticSpec.from_dict(read_manifest(path)["spec"])


# -- importance and permutations ---------------------------------------------------------------------
def write_importance(
    path: Path, scores: list[dict[str, torch.Tensor]] | None, perms: list[dict[str, torch.Tensor]]
) -> None:
    """layers.{i}.{unit}_perm (new position -> old id) and layers.{i}.{unit}_score (source order)."""
    tensors = {}
    for i, p in enumerate(perms):
        for unit, idx in p.items():
            tensors[f"layers.{i}.{unit}_perm"] = idx.to(torch.int64).contiguous()
        if scores is not None:
            for unit, s in scores[i].items():
                tensors[f"layers.{i}.{unit}_score"] = s.contiguous()
    # bytes through atomic_write: the usual file mode (safetensors' save_file creates files 0600)
    atomic_write(path, save(tensors, metadata={"note": "scores in source order; perm[new] = old unit id"}))


def read_importance(
    path: Path, num_layers: int
) -> tuple[list[dict[str, torch.Tensor]] | None, list[dict[str, torch.Tensor]]]:
    """(scores or None when the order was not importance-based, permutations) of `num_layers` layers."""
    t = load_file(path)
    perms = [{u: t[f"layers.{i}.{u}_perm"] for u in UNIT_NAMES} for i in range(num_layers)]
    scores = None
    if "layers.0.neuron_score" in t:
        scores = [{u: t[f"layers.{i}.{u}_score"] for u in ("neuron", "qhead")} for i in range(num_layers)]
    return scores, perms


def read_importance_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of ELASTIC/flex_importance.safetensors ({} when absent)."""
    f = Path(path) / IMPORTANCE
    return load_file(f) if f.exists() else {}


# -- latency tables ----------------------------------------------------------------------------------
def read_latency(path: Path) -> dict[str, Any]:
    """ELASTIC/flex_latency.json ({"format", "regimes": {key: table}}; empty when absent)."""
    f = Path(path) / LATENCY
    if not f.is_file():
        return {"format": LATENCY_FORMAT, "regimes": {}}
    data = read_json(f)
    if not isinstance(data, dict) or data.get("format") != LATENCY_FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise UsageError(f"{f}: unknown format {got!r}, expected {LATENCY_FORMAT}")
    return data


def write_latency(path: Path, data: dict[str, Any]) -> None:
    """Replace ELASTIC/flex_latency.json atomically."""
    atomic_write(Path(path) / LATENCY, json.dumps(data, indent=1) + "\n")


# -- routers -----------------------------------------------------------------------------------------
def read_routers(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(metadata, tensors) of ELASTIC's routers, None when none were trained; an error when the tensors
    are not the ones the metadata describes."""
    f = Path(path) / ROUTERS_JSON
    if not f.is_file():
        return None
    doc = read_json(f)
    tensors = Path(path) / ROUTERS_TENSORS
    if not tensors.is_file() or hashlib.sha256(tensors.read_bytes()).hexdigest() != doc.get("sha256"):
        raise UsageError(f"{tensors} does not match {f}; run `flex train-router` again")
    return doc, load_file(tensors)


def router_writers(tensors: dict[str, torch.Tensor], doc: dict[str, Any]):
    """Writers for io.atomic.update_dir: the tensors first, then the metadata with their hash."""

    def write_tensors(dest: Path) -> None:
        dest.write_bytes(save(tensors))  # not save_file, which creates files 0600

    def write_doc(dest: Path) -> None:
        sha = hashlib.sha256((dest.parent / ROUTERS_TENSORS).read_bytes()).hexdigest()
        dest.write_text(json.dumps({**doc, "sha256": sha}, indent=1) + "\n")

    return {ROUTERS_TENSORS: write_tensors, ROUTERS_JSON: write_doc}
