"""safetensors files: headers checked against file sizes, and the one writer.

Reading never loads a whole model: headers are parsed by hand (cheap validation before any heavy work)
and tensors come one at a time from ``safe_open``. Writing is planned from names, dtypes and shapes
(:class:`ShardPlan`: shard files, headers and offsets) and then streamed tensor by tensor
(:class:`StreamingWriter`), so the working memory is one tensor, never one shard or the model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RuntimeFailure, UsageError

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
TORCH_TO_ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TensorSpec = tuple[str, str, list[int]]  # (name, safetensors dtype, shape)


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
    def make(cls, tensors: list[TensorSpec], max_shard_bytes: int) -> ShardPlan:
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
        files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
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
            raise RuntimeFailure(
                f"tensor {name}: got {TORCH_TO_ST.get(t.dtype)} {list(t.shape)}, "
                f"planned {info['dtype']} {info['shape']}"
            )
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
        total = sum(
            v["data_offsets"][1] - v["data_offsets"][0]
            for h in self.plan.headers
            for k, v in h.items()
            if k != "__metadata__"
        )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.plan.files, INDEX]


def write_model(
    out_dir: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> list[str]:
    """Write `tensors` (arriving in the order of `specs`) as HF safetensors shards (+ index when several);
    returns the file names. One tensor is in memory at a time."""
    w = StreamingWriter(out_dir, ShardPlan.make(specs, max_shard_bytes))
    for name, t in tensors:
        w.write(name, t)
        del t
    return w.close()
