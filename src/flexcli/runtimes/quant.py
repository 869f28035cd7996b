"""GGUF weight types, and llama.cpp's own quantizer for the quantized ones (llama_model_quantize).

A type is written `WEIGHTS` or `WEIGHTS/EMBED`:
- WEIGHTS is a llama.cpp file type. f32, f16 and bf16 are written by the exporter (io.gguf_export) as
  they are; every other type is the exporter's 16-bit file quantized by llama.cpp's quantizer through
  llama-cpp-python, with its own per-tensor choices (q4_k_m keeps some ffn_down / attn_v at q6_k, and
  so on). flexcli writes no quantization code.
- EMBED is the ggml type of the token-embedding and output tensors (the quantizer's
  token_embedding_type and output_tensor_type); without it llama.cpp chooses (q6_k for the output of
  most types, q8_0 when its rows are not whole 256-blocks). At small models this tensor is a large part
  of every decode step: SmolLM2-135M's tied 49,152 x 576 head is 28.7 of a q4_0 file's 72.7 MiB.

Rows are quantized in blocks along the input dimension (K-quants and iq4_xs: 256 values, the legacy
types and iq4_nl: 32); a tensor whose rows are not whole blocks falls back to another type. The report
of a quantized file counts its stored types and the fallbacks llama.cpp logged.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import RuntimeFailure, UsageError

PLAIN = ("f32", "f16", "bf16")  # written by the exporter, no quantizer
QUANTIZED = (
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_0",
    "q5_1",
    "q4_k_m",
    "q4_k_s",
    "q4_0",
    "q4_1",
    "iq4_nl",
    "iq4_xs",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)
FILE_TYPES = PLAIN + QUANTIZED
# ggml types an EMBED may name (the embedding / output tensor is stored as exactly this type)
EMBED_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k", "q4_0", "q4_1", "iq4_nl")


@dataclass(frozen=True)
class GGUFType:
    """A parsed `WEIGHTS[/EMBED]`."""

    weights: str
    embed: str | None = None

    @property
    def text(self) -> str:
        return self.weights + (f"/{self.embed}" if self.embed else "")

    @property
    def quantized(self) -> bool:
        return self.weights in QUANTIZED  # parse_type refuses a quantized EMBED with plain weights

    @property
    def block(self) -> int:
        """Values per quantization block of the weights' base type (1 for the plain types)."""
        return block_size(base_type(self.weights))


def parse_type(text: str) -> GGUFType:
    """`q4_k_m`, `q4_0/q8_0`, ... -> GGUFType; a one-line UsageError naming the choices otherwise."""
    weights, _, embed = text.strip().lower().partition("/")
    if weights not in FILE_TYPES:
        raise UsageError(
            f"must be one of {', '.join(FILE_TYPES)} (optionally /EMBED), got {text!r}", option="gguf_type"
        )
    if embed and embed not in EMBED_TYPES:
        raise UsageError(
            f"embedding/output type must be one of {', '.join(EMBED_TYPES)}, got {embed!r}",
            option="gguf_type",
        )
    if embed and weights in PLAIN and embed not in PLAIN:
        raise UsageError(
            f"a quantized embedding needs quantized weights too, got {text!r}", option="gguf_type"
        )
    return GGUFType(weights, embed or None)


def parse_types(text: str) -> list[GGUFType]:
    """A comma-separated list of types (profile --gguf-type q4_0,q8_0,f16), in order, without repeats."""
    out: list[GGUFType] = []
    for part in text.split(","):
        if part.strip():
            t = parse_type(part)
            if t not in out:
                out.append(t)
    if not out:
        raise UsageError("no GGUF type given", option="gguf_type")
    return out


MIX_BLOCK = 32  # values per block of the legacy types (q4_0, q5_1, q8_0, iq4_nl, ...)


def mixed_order(n: int, block: int = MIX_BLOCK) -> torch.Tensor:
    """(n,) new position -> importance rank: block b of `block` consecutive positions holds ranks
    b, b + nb, b + 2 nb, ... (nb = ceil(n / block)), so every block spans the whole importance range.

    flexcli's permutation sorts the MLP neurons by importance, so each block of ffn_down's rows (its input
    columns) holds neurons of one importance, and the importance matrix has nothing to weigh within a
    block. Measured on SmolLM2-135M after make demo's training (full model, q4_0 with the importance
    matrix, held-out code / prose ppl; f16 11.93 / 17.98 in every order): importance order 12.80 / 20.91,
    this order 12.52 / 18.87, a random order 12.34 / 18.86; at q4_k_m 12.29 / 18.60 against 12.23 / 18.54.
    Without the matrix the sorted order is better on code (13.66 against 14.21), so it is used only with
    it, and only for the 32-block types: compensated sub-models of the same checkpoint at q4_0, this order
    against importance order, MLP 75% with 6 of 9 heads 28.47 / 46.13 against 29.91 / 50.88 (f16 26.37 /
    41.69), MLP 50% 23.91 / 43.98 against 23.28 / 45.68 (f16 22.36 / 39.55); at q4_k_m (256-value
    super-blocks, their own weighted search) it was within 1% either way, slightly worse on both.
    """
    nb = -(-n // block)
    return torch.tensor([b + nb * j for b in range(nb) for j in range(block) if b + nb * j < n])


def base_type(name: str) -> str:
    """The ggml type a file type's bulk is stored in: q4_k_m -> q4_k, q8_0 -> q8_0, iq4_xs -> iq4_xs."""
    return re.sub(r"_[sml]$", "", name) if "_k_" in name else name


def ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def block_size(name: str) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[ggml_type(name)][0]


def ftype_id(name: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType["ALL_F32" if name == "f32" else f"MOSTLY_{name.upper()}"])


def intermediate(checkpoint_dtypes: set[str]) -> str:
    """The exporter's type for a file the quantizer reads: bf16 for bf16 checkpoints (exact; f16 could
    overflow their values), else f16, as llama.cpp's own convert-then-quantize path does."""
    return "bf16" if "BF16" in checkpoint_dtypes and "F16" not in checkpoint_dtypes else "f16"


@dataclass
class Fallback:
    tensor: str
    ncols: int  # the row length that is not whole blocks
    wanted: str
    got: str


@dataclass
class QuantReport:
    """What a GGUF file stores: effective bits per weight (all tensor bytes over all values), the count of
    tensors per stored type, and the quantizer's fallbacks."""

    bits_per_weight: float
    types: dict[str, int]
    file_bytes: int
    fallbacks: list[Fallback] = field(default_factory=list)


def file_report(path: Path) -> QuantReport:
    """Stored types and bits per weight of any GGUF file, read from its tensor infos."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    values = sum(int(math.prod(int(d) for d in t.shape)) for t in r.tensors)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    types = Counter(t.tensor_type.name.lower() for t in r.tensors)
    return QuantReport(round(nbytes * 8 / values, 3), dict(sorted(types.items())), path.stat().st_size)


_FALLBACK = re.compile(
    r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible.*?required for type\s+(\S+)\).*?falling back to\s+(\S+)"
)


def parse_fallbacks(log: str) -> list[Fallback]:
    """The quantizer's fallback lines ("warning: blk.0.ffn_down.weight - ncols 1152 not divisible by 256
    (required for type q6_K) -> falling back to q8_0") as records."""
    return [Fallback(m[1], int(m[2]), m[3].lower(), m[4].lower()) for m in _FALLBACK.finditer(log)]


def quantize(
    src: Path,
    dst: Path,
    t: GGUFType,
    imatrix: dict[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> QuantReport:
    """Quantize the f16/bf16/f32 GGUF `src` into `dst` with llama.cpp's quantizer (default parameters,
    plus `t.embed` and the importance matrix `imatrix`: GGUF tensor name -> (in_features,) float32)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype_id(t.weights)
    p.nthread = threads or 0
    if t.embed:
        p.token_embedding_type = p.output_tensor_type = int(ggml_type(t.embed))
    keep = []  # the arrays the C structs point into stay alive until the call returns
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-terminated
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            a = np.ascontiguousarray(v, dtype=np.float32)
            if not np.isfinite(a).all():
                raise RuntimeFailure(f"the importance matrix of {name} is not finite")
            keep.append(a)
            entries[i].name = name.encode()
            entries[i].data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = a.size
        p.imatrix = entries
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level, text, _user):
        log.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    text = "".join(log)
    if rc != 0:
        why = [ln for ln in text.splitlines() if "failed" in ln or "error" in ln.lower()]
        raise RuntimeFailure(
            f"llama.cpp could not quantize to {t.text}: {(why or ['rc ' + str(rc)])[-1].strip()}"
        )
    rep = file_report(dst)
    rep.fallbacks = parse_fallbacks(text)
    return rep
