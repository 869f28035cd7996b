"""Checkpoint I/O: validate Hugging Face model directories, read tensors lazily, write atomically.

Reading never loads a whole model: safetensors headers are parsed by hand (cheap validation before
any heavy work) and tensors come one at a time from ``safe_open``. Writing goes to a temporary sibling
directory that is fsynced and renamed into place, so a crash leaves the old output or none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arch import Architecture, Dims, detect
from .errors import RuntimeFailure, UsageError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
FLEX_FILES = ("flex_elastic.json", "flex_importance.safetensors")


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors header against the file size; raise UsageError if corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UsageError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n == 0 or n > min(size - 8, 100 * 2**20):
                raise UsageError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
            want = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if e - b != want or b < 0:
            raise UsageError(f"{path}: tensor {name!r} has offsets {b}..{e} but needs {want} bytes")
        if e > data_len:
            raise UsageError(f"{path}: truncated (tensor {name!r} ends at byte {e}, data has {data_len})")
        out[name] = info
    return out


@dataclass
class SourceModel:
    """A validated local Hugging Face causal-LM directory."""

    path: Path
    config: dict[str, Any]
    arch: Architecture
    dims: Dims
    weight_files: list[Path]
    pickle: bool
    weight_map: dict[str, Path] = field(default_factory=dict)  # tensor name -> file

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> SourceModel:
        """Check everything cheap (config, architecture, headers, index) before any heavy work."""
        p = Path(path)
        if not p.exists():
            raise UsageError(f"model path {p} does not exist")
        if not p.is_dir():
            raise UsageError(f"model path {p} is not a directory (expected a Hugging Face model directory)")
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise UsageError(f"{p} has no config.json; is it a Hugging Face model directory?")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
        arch = detect(config)
        dims = Dims.from_config(config)
        files, is_pickle, wmap = cls._weights(p, allow_pickle)
        return cls(p, config, arch, dims, files, is_pickle, wmap)

    @staticmethod
    def _weights(p: Path, allow_pickle: bool) -> tuple[list[Path], bool, dict[str, Path]]:
        for index_name, pick in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
            idx = p / index_name
            if idx.is_file():
                if pick and not allow_pickle:
                    break
                try:
                    wm = json.loads(idx.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    raise UsageError(f"{idx}: invalid index (no weight_map)") from None
                files = sorted({p / f for f in wm.values()})
                for f in files:
                    if not f.is_file():
                        raise UsageError(f"{idx} names shard {f.name}, which is missing")
                wmap = {k: p / v for k, v in wm.items()}
                if not pick:
                    for f in files:
                        names = read_safetensors_header(f)
                        for k, v in wmap.items():
                            if v == f and k not in names:
                                raise UsageError(f"{idx} maps {k!r} to {f.name}, which does not contain it")
                return files, pick, wmap
        single = p / "model.safetensors"
        if single.is_file():
            return [single], False, {k: single for k in read_safetensors_header(single)}
        bins = sorted(p.glob("pytorch_model*.bin"))
        if bins:
            if not allow_pickle:
                raise UsageError(f"{p} has only pickle (.bin) weights; pass --allow-pickle to load them "
                                 "(weights_only=True), or convert them to safetensors")
            return bins, True, {}
        raise UsageError(f"{p} has no model weights (model.safetensors or a sharded index)")

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file, in stored order."""
        from safetensors import safe_open

        for f in self.weight_files:
            if self.pickle:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                yield from sd.items()
                del sd
                continue
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    def non_weight_files(self) -> list[Path]:
        """Tokenizer, generation config and everything else that is not weights or flexcli metadata."""
        skip = {"model.safetensors.index.json", "pytorch_model.bin.index.json", *FLEX_FILES}
        return sorted(f for f in self.path.iterdir()
                      if f.is_file() and f.name not in skip and not f.name.endswith(WEIGHT_SUFFIXES))

    def file_hashes(self) -> dict[str, str]:
        return {f.name: sha256_file(f) for f in [self.path / "config.json", *self.weight_files]}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    raise UsageError(f"invalid size {text!r}; use e.g. 5GB or 500MB")


class ShardedWriter:
    """Stream tensors into safetensors shards of at most `max_shard_bytes`, then write the HF index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 10**9):
        self.out_dir, self.max = out_dir, max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max:
            self._flush()
        self._buf[name] = t.detach().contiguous().cpu()
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish; returns the final file names (model.safetensors or model-XXXXX-of-YYYYY + index)."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        wmap, names = {}, []
        for i, (path, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            names.append(final)
            wmap.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(wmap.items()))}
        write_json(self.out_dir / "model.safetensors.index.json", index)
        return [*names, "model.safetensors.index.json"]


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tensors(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[str]:
    w = ShardedWriter(out_dir, max_shard_bytes)
    for name, t in tensors:
        w.add(name, t)
    return w.close()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TMP_TAG = ".flex-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_siblings(out: Path) -> None:
    """Remove temporary siblings left by killed runs (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        try:
            pid = int(p.name.rsplit("-", 1)[-1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def check_output(out: Path, force: bool) -> None:
    """Fail early (before heavy work) when OUT exists and --force was not given."""
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if not out.parent.exists():
        raise UsageError(f"parent directory of output {out} does not exist")


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling to write into; on success fsync it and rename it to `out`."""
    out = out.resolve()
    check_output(out, force)
    clean_stale_siblings(out)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}{TMP_TAG}old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_files(files: Iterable[Path], dst: Path) -> None:
    for f in files:
        try:
            shutil.copy2(f, dst / f.name)
        except OSError as e:
            raise RuntimeFailure(f"cannot copy {f} to {dst}: {e.strerror}") from None


def update_dir(path: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Replace some files of an existing directory as one atomic step.

    A temporary sibling gets hard links to every other file and the new files (writer(dest_path)), is
    fsynced, and is swapped in by two renames; a crash leaves the old directory (or the new one) whole.
    """
    path = path.resolve()
    clean_stale_siblings(path)
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in path.iterdir():
            if f.name in writers or not f.is_file():
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        for name, write in writers.items():
            write(tmp / name)
        _fsync_tree(tmp)
        old = path.parent / f".{path.name}{TMP_TAG}old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass
class ShardPlan:
    """Where every output tensor goes: shard files, their headers and sizes, computed from shapes only."""

    files: list[str]
    headers: list[dict[str, Any]]  # per shard: name -> {dtype, shape, data_offsets}
    sizes: list[int]  # bytes per shard file (header included)
    shard_of: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    @classmethod
    def make(cls, tensors: list[tuple[str, str, list[int]]], max_shard_bytes: int) -> ShardPlan:
        """tensors: (name, safetensors dtype, shape) in write order."""
        groups: list[list[tuple[str, str, list[int], int]]] = [[]]
        used = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
            if groups[-1] and used + nbytes > max_shard_bytes:
                groups.append([])
                used = 0
            groups[-1].append((name, dtype, list(shape), nbytes))
            used += nbytes
        n = len(groups)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        headers, sizes, shard_of = [], [], {}
        for i, g in enumerate(groups):
            off, h = 0, {"__metadata__": {"format": "pt"}}
            for name, dtype, shape, nbytes in g:
                h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
                off += nbytes
                shard_of[name] = i
            headers.append(h)
            sizes.append(8 + len(_header_bytes(h)) + off)
        return cls(files, headers, sizes, shard_of)


def _header_bytes(h: dict[str, Any]) -> bytes:
    raw = json.dumps(h, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


class StreamingWriter:
    """Write a ShardPlan tensor by tensor: each shard's header first, then bytes as tensors arrive, so the
    working memory is one tensor (not one shard). Tensors must arrive in plan order."""

    def __init__(self, out_dir: Path, plan: ShardPlan):
        self.out_dir, self.plan = out_dir, plan
        self._shard, self._fh = -1, None

    def write(self, name: str, t: torch.Tensor) -> None:
        i = self.plan.shard_of[name]
        info = self.plan.headers[i][name]
        if list(t.shape) != info["shape"] or TORCH_TO_ST.get(t.dtype) != info["dtype"]:
            raise RuntimeFailure(f"tensor {name}: got {TORCH_TO_ST.get(t.dtype)} {list(t.shape)}, "
                                 f"planned {info['dtype']} {info['shape']}")
        if i != self._shard:
            self._open(i)
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard = i
        self._fh = open(self.out_dir / self.plan.files[i], "wb")
        hb = _header_bytes(self.plan.headers[i])
        self._fh.write(struct.pack("<Q", len(hb)) + hb)

    def close(self) -> list[str]:
        if self._fh is not None:
            self._fh.close()
        for f, size in zip(self.plan.files, self.plan.sizes):
            got = (self.out_dir / f).stat().st_size if (self.out_dir / f).exists() else -1
            if got != size:
                raise RuntimeFailure(f"{f}: wrote {got} bytes, planned {size}")
        if len(self.plan.files) == 1:
            return list(self.plan.files)
        wmap = {name: self.plan.files[i] for name, i in self.plan.shard_of.items()}
        total = sum(v["data_offsets"][1] - v["data_offsets"][0] for h in self.plan.headers
                    for k, v in h.items() if k != "__metadata__")
        write_json(self.out_dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})
        return [*self.plan.files, "model.safetensors.index.json"]
