"""Model directories: one inspector that collects every problem, and the validated source model.

:func:`inspect` checks everything cheap without trusting any of it: config.json, the family, the
weight files (single, sharded with an index, or pickle), every safetensors header against its file
size, the index against the shards, and tensor names and shapes against the family descriptor.
`SourceModel.open` raises the first problem (convert, extract and eval stop there); `flex validate`
reports them all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from ..arch.dims import Dims
from ..arch.family import Architecture, LayerSizes, detect
from ..errors import FlexError, UsageError
from . import layout
from .atomic import copy_files
from .safetensors import INDEX, SINGLE, ST_TO_TORCH, TORCH_TO_ST, TensorSpec, read_safetensors_header

PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Problem:
    """One thing wrong with a checkpoint directory."""

    file: str
    message: str
    tensor: str | None = None
    expected: Any = None
    found: Any = None


@dataclass
class Inspection:
    """What :func:`inspect` found: the parts it could read, and every problem."""

    path: Path
    config: dict[str, Any] | None = None
    arch: Architecture | None = None
    dims: Dims | None = None
    weight_files: list[Path] = field(default_factory=list)
    pickle: bool = False
    weight_map: dict[str, Path] = field(default_factory=dict)  # tensor name -> file
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)  # safetensors file name -> header
    problems: list[Problem] = field(default_factory=list)

    def bad(
        self, file: str, message: str, tensor: str | None = None, expected: Any = None, found: Any = None
    ) -> None:
        self.problems.append(Problem(file, message, tensor, expected, found))


def inspect(
    path: str | Path, allow_pickle: bool = False, strict: bool = False, per_layer: bool = False
) -> Inspection:
    """Inspect a model directory. `strict` also reports tensors the config does not explain; `per_layer`
    accepts flexcli's per-layer sub-models (config.json `flex_layers`)."""
    p = Path(path)
    ins = Inspection(p)
    if not p.exists():
        ins.bad(str(p), "model path does not exist")
        return ins
    if not p.is_dir():
        ins.bad(str(p), "model path is not a directory (expected a Hugging Face model directory)")
        return ins
    if not _config(ins, per_layer):
        return ins
    if _weights(ins, allow_pickle) and ins.headers and ins.arch is not None and ins.dims is not None:
        _shapes(ins, strict)
    return ins


def _config(ins: Inspection, per_layer: bool) -> bool:
    f = ins.path / "config.json"
    if not f.is_file():
        ins.bad("config.json", "missing; is this a Hugging Face model directory?")
        return False
    try:
        config = json.loads(f.read_text())
        assert isinstance(config, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        ins.bad("config.json", f"invalid JSON ({e})")
        return False
    ins.config = config
    try:
        names = config.get("architectures") or []
        if per_layer:  # Flex<Family>ForCausalLM is the family's own class with per-layer sizes
            names = [a.removeprefix("Flex") for a in names]
        ins.arch = detect({**config, "architectures": names})
        if not per_layer and layout.PER_LAYER in config:
            raise UsageError("has per-layer sizes (flex_layers); a source model must be uniform")
        ins.dims = Dims.from_config(config)
    except FlexError as e:
        ins.bad("config.json", str(e).removeprefix("config.json: "))
    return True


def _weights(ins: Inspection, allow_pickle: bool) -> bool:
    """Find the weight files and read every safetensors header; False when there are none to read."""
    p = ins.path
    for index_name, pick in ((INDEX, False), (PICKLE_INDEX, True)):
        idx = p / index_name
        if not idx.is_file() or (pick and not allow_pickle):
            continue
        try:
            wm = json.loads(idx.read_text())["weight_map"]
            assert isinstance(wm, dict)
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, AssertionError):
            ins.bad(index_name, "invalid index (no weight_map)")
            return False
        ins.pickle, ins.weight_map = pick, {k: p / v for k, v in wm.items()}
        ins.weight_files = sorted(set(ins.weight_map.values()))
        for f in ins.weight_files:
            if not f.is_file():
                ins.bad(index_name, f"names shard {f.name}, which is missing", None, f.name, None)
        ins.weight_files = [f for f in ins.weight_files if f.is_file()]
        if not pick:
            _headers(ins)
            for name, f in ins.weight_map.items():
                if f.name in ins.headers and name not in ins.headers[f.name]:
                    ins.bad(index_name, f"maps {name!r} to {f.name}, which does not contain it", name, f.name)
            for fname, h in ins.headers.items():
                for name in h:
                    if ins.weight_map.get(name) != p / fname:
                        ins.bad(fname, "tensor not listed in the index", name)
        return True
    if (p / SINGLE).is_file():
        ins.weight_files = [p / SINGLE]
        _headers(ins)
        ins.weight_map = {k: p / SINGLE for k in ins.headers.get(SINGLE, {})}
        return True
    bins = sorted(p.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        ins.bad(
            str(p),
            "has only pickle (.bin) weights; pass --allow-pickle to load them (weights_only=True), "
            "or convert them to safetensors",
        )
    elif bins:
        ins.weight_files, ins.pickle = bins, True
        return True
    else:
        ins.bad("(weights)", "no model weights (model.safetensors or a sharded index)")
    return False


def _headers(ins: Inspection) -> None:
    for f in ins.weight_files:
        try:
            ins.headers[f.name] = read_safetensors_header(f)
        except UsageError as e:
            ins.bad(f.name, str(e).split(": ", 1)[-1])


def _shapes(ins: Inspection, strict: bool) -> None:
    """Names and shapes in the headers against the family descriptor and config.json."""
    assert ins.arch is not None and ins.dims is not None and ins.config is not None
    layers = None
    if layout.PER_LAYER in ins.config:
        try:
            layers = [
                LayerSizes(
                    int(x["intermediate_size"]), int(x["num_attention_heads"]), int(x["num_key_value_heads"])
                )
                for x in ins.config[layout.PER_LAYER]
            ]
        except (KeyError, TypeError, ValueError):
            ins.bad("config.json", "invalid flex_layers")
            return
    want = ins.arch.expected_shapes(ins.config, ins.dims, layers)
    seen: dict[str, str] = {}
    for fname, header in ins.headers.items():
        for name, info in header.items():
            if name in seen:
                ins.bad(fname, "duplicate tensor (also in another file)", name, seen[name], fname)
            seen[name] = fname
            if name not in want:
                if strict:
                    ins.bad(fname, "unexpected tensor for this config", name)
            elif list(info["shape"]) != want[name]:
                ins.bad(fname, "shape does not match config.json", name, want[name], info["shape"])
    for name in sorted(set(want) - set(seen)):
        ins.bad("(weights)", "missing tensor", name, want[name], None)


@dataclass
class SourceModel:
    """A validated local Hugging Face causal-LM directory (uniform widths)."""

    path: Path
    config: dict[str, Any]
    arch: Architecture
    dims: Dims
    weight_files: list[Path]
    pickle: bool
    weight_map: dict[str, Path] = field(default_factory=dict)
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> SourceModel:
        """Check everything cheap before any heavy work; the first problem is a one-line UsageError."""
        ins = inspect(path, allow_pickle)
        if ins.problems:
            pr = ins.problems[0]
            where = pr.file if pr.file.startswith(str(ins.path)) else str(ins.path / pr.file)
            raise UsageError(f"{where}: {pr.message}")
        assert ins.config is not None and ins.arch is not None and ins.dims is not None
        return cls(
            ins.path,
            ins.config,
            ins.arch,
            ins.dims,
            ins.weight_files,
            ins.pickle,
            ins.weight_map,
            ins.headers,
        )

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file, in stored order."""
        for f in self.weight_files:
            if self.pickle:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                yield from sd.items()
                del sd
                continue
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    def tensor_names(self) -> list[str]:
        """Every tensor name (safetensors sources: from the index or the header)."""
        return list(self.weight_map)

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors only, read from their safetensors files (nothing else is touched)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                out.update({n: st.get_tensor(n) for n in ns})
        return out

    def tensor_specs(self) -> list[TensorSpec]:
        """(name, dtype, shape) of every tensor in stored order: from the headers, or for pickle weights
        from a memory-mapped pass."""
        if self.pickle:
            return [(n, TORCH_TO_ST[t.dtype], list(t.shape)) for n, t in self.iter_tensors()]
        out = []
        for f in self.weight_files:
            with safe_open(str(f), framework="pt") as st:  # stored order, as iter_tensors reads it
                for name in st.keys():
                    info = self.headers[f.name][name]
                    out.append((name, info["dtype"], list(info["shape"])))
        return out

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """Tensor name -> the torch dtype it is stored in."""
        return {name: ST_TO_TORCH[dtype] for name, dtype, _ in self.tensor_specs()}

    def non_weight_files(self) -> list[Path]:
        """Tokenizer, generation config and everything else that is not weights or flexcli metadata."""
        skip = {INDEX, PICKLE_INDEX, *layout.ELASTIC_FILES}
        return sorted(
            f
            for f in self.path.iterdir()
            if f.is_file() and f.name not in skip and not f.name.endswith(WEIGHT_SUFFIXES)
        )

    def weights_identity(self) -> tuple:
        """What identifies these weights without reading them: each file's device, inode, size and mtime
        (a hard-linked copy, as benchmarks make, is the same weights; a rewrite is not). Keys in-process
        caches of what is computed from the weights (compensation moments, importance matrices)."""
        st = [f.stat() for f in [self.path / "config.json", *self.weight_files]]
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in st)

    def file_hashes(self) -> dict[str, str]:
        return {f.name: sha256_file(f) for f in [self.path / "config.json", *self.weight_files]}

    def tokenizer(self):
        return load_tokenizer(self.path)

    def load_model(self, device: torch.device, dtype: str):
        return load_model(self, device, dtype)

    def write_metadata(self, dst: Path) -> None:
        """The directory's other files (config, tokenizer, generation config...) verbatim."""
        copy_files(self.non_weight_files(), dst)


class Source(Protocol):
    """What convert reads from a model: a Hugging Face directory (SourceModel) or a GGUF file."""

    path: Path
    config: dict[str, Any]
    arch: Architecture
    dims: Dims

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...
    def tensor_specs(self) -> list[TensorSpec]: ...  # in iter_tensors' order
    def file_hashes(self) -> dict[str, str]: ...
    def tokenizer(self) -> Any: ...
    def load_model(self, device: torch.device, dtype: str) -> Any: ...
    def write_metadata(self, dst: Path) -> None: ...  # config, tokenizer: all but the weights


def open_source(path: str | Path, allow_pickle: bool = False, gguf_dtype: str | None = None) -> Source:
    """A GGUF file (or a directory holding exactly one, without config.json), else a HF directory.
    GGUF tensors are stored as `gguf_dtype` (default bfloat16)."""
    from .gguf import GGUFSource, find_gguf

    p = Path(path)
    if (f := find_gguf(p)) is not None:
        return GGUFSource.open(f, gguf_dtype or "bfloat16")
    return SourceModel.open(p, allow_pickle)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def load_model(src: SourceModel, device: torch.device, dtype: str):
    """Load the source with transformers' own model class (never remote code)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path,
            dtype=getattr(torch, dtype),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=not src.pickle,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load {src.path}: {str(e).splitlines()[0]}") from None
    return model.to(device)


def load_tokenizer(path: Path):
    """The directory's tokenizer (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
