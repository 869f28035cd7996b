"""Writing a sub-model as one llama.cpp GGUF file, streamed tensor by tensor.

A uniform sub-model keeps its family's llama.cpp architecture (`llama` for Llama and Mistral, `qwen2`);
per-layer widths become `deci`, whose loader reads `deci.attention.head_count`, `head_count_kv` and
`feed_forward_length` as per-layer arrays and builds every layer with its own sizes (llama.cpp
src/models/deci.cpp). Widths are exact: nothing is padded.

The `gguf` package writes the file: tensor infos first (shapes and types come from the headers, so the
file layout is fixed before a weight is read), then each tensor as the slicer yields it, so memory holds
one tensor at a time. Q and K rows move into llama.cpp's rotary order (pairs of adjacent values) for the
architectures that rotate that way. The tokenizer is embedded: a model converted from a GGUF keeps that
file's tokenizer block verbatim (layout.GGUF_TOKENIZER in the elastic directory), a Hugging Face
tokenizer is translated, and one that has no llama.cpp equivalent is a one-line error naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch.spec import Config, ElasticSpec
from ..errors import UsageError
from . import layout

GGUF_TYPES = ("f32", "f16", "bf16")  # written here; quantized types are llama.cpp's (runtimes.quant)
# llama.cpp architecture of a uniform sub-model, by flexcli family; per-layer widths are always deci.
UNIFORM_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose rotary embedding pairs adjacent values (llama.cpp's "normal" RoPE): their Q/K rows
# are permuted from the Hugging Face half-split order, as llama.cpp's own converter does.
ADJACENT_ROPE = {"llama", "deci"}
FULL_WIDTH_Q = {"qwen2"}  # llama.cpp architectures whose loader wants heads x head_dim == hidden
ROPE_TYPES = ("default", "linear")

# Hugging Face pre-tokenizers with an exact llama.cpp counterpart (its `tokenizer.ggml.pre` names, whose
# regexes are in llama.cpp src/llama-vocab.cpp). Keys are the canonical form made by `_pre_key`.
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_RE, "Isolated", False), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_RE, "Isolated", False), ("ByteLevel", False)): "qwen2",
}


@dataclass(frozen=True)
class GGUFPlan:
    """What will be written: architecture, tensor infos (GGUF name, numpy-order shape, type) in order."""

    arch: str
    tensors: list[tuple[str, str, list[int], Any]]  # (HF name, GGUF name, shape, GGMLQuantizationType)
    nbytes: int


def gguf_arch(family: str, cfg: Config, spec: ElasticSpec) -> str:
    """`llama` / `qwen2` for a uniform sub-model, `deci` for per-layer widths and for a qwen2 model with
    pruned heads (llama.cpp's qwen2 loader sizes Q as hidden x hidden)."""
    if family not in UNIFORM_ARCH:
        raise UsageError(
            f"family {family!r} has no llama.cpp architecture; GGUF export supports {', '.join(UNIFORM_ARCH)}"
        )
    arch = UNIFORM_ARCH[family]
    if len(set(cfg)) > 1 or (
        arch in FULL_WIDTH_Q and cfg[0][1] * spec.dims.head_dim != spec.dims.hidden_size
    ):
        return "deci"
    return arch


def _qtype(gguf_type: str, shape: list[int]):
    """Storage type of one tensor: vectors stay f32 (as llama.cpp's converter keeps them)."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


def _stored(shape: list[int], q) -> tuple[list[int], np.dtype, int]:
    """(shape as the writer takes it, numpy dtype, bytes) of a tensor stored as `q`: f32 / f16 as arrays,
    other types as the uint8 blocks gguf's quantizer returns."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if q in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if q == Q.F32 else np.float16)
        return list(shape), dtype, math.prod(shape) * dtype.itemsize
    bshape = list(quant_shape_to_byte_shape(shape, q))
    return bshape, np.dtype(np.uint8), math.prod(bshape)


def plan_gguf(
    family: str,
    config: dict[str, Any],
    spec: ElasticSpec,
    cfg: Config,
    specs: Iterable[tuple[str, str, list[int]]],
    gguf_type: str,
) -> GGUFPlan:
    """GGUF names, shapes and types of every tensor of the sub-model, from the headers alone."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}", option="gguf_type")
    arch = gguf_arch(family, cfg, spec)
    _rope_theta(config)  # refuse an unsupported rope type before anything is written
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, len(cfg))
    tied = bool(config.get("tie_word_embeddings"))
    out, total = [], 0
    for hf_name, _, shape in specs:
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        stem, _, suffix = hf_name.rpartition(".")
        g = names.get_name(stem)
        if g is None:
            raise UsageError(f"tensor {hf_name} has no name in llama.cpp's {arch} architecture")
        q = _qtype(gguf_type, shape)
        total += _stored(shape, q)[2]
        out.append((hf_name, f"{g}.{suffix}", list(shape), q))
    return GGUFPlan(arch, out, total)


def _rope_theta(config: dict[str, Any]) -> tuple[float, float | None]:
    """(rope base, linear scaling factor or None); other rope types are refused."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UsageError(
            f"rope type {kind!r} is not exported to GGUF (flexcli writes {', '.join(ROPE_TYPES)})"
        )
    theta = rp.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), (float(rp["factor"]) if kind == "linear" else None)


def _metadata(
    w, arch: str, config: dict[str, Any], spec: ElasticSpec, cfg: Config, gguf_type: str, name: str
) -> None:
    from gguf import LlamaFileType

    d = spec.dims
    per_layer = arch == "deci"
    mlp = [m for m, _ in cfg]
    heads = [h for _, h in cfg]
    kv = [spec.kv_heads(h) for h in heads]
    theta, linear = _rope_theta(config)
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(len(cfg))
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(d.hidden_size)
    w.add_feed_forward_length(mlp if per_layer else mlp[0])
    w.add_head_count(heads if per_layer else heads[0])
    w.add_head_count_kv(kv if per_layer else kv[0])
    w.add_key_length(d.head_dim)  # pruned heads: head_dim is no longer hidden / heads
    w.add_value_length(d.head_dim)
    w.add_rope_dimension_count(d.head_dim)
    w.add_rope_freq_base(theta)
    if linear is not None:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(d.vocab_size)
    w.add_file_type(
        {
            "f32": LlamaFileType.ALL_F32,
            "f16": LlamaFileType.MOSTLY_F16,
            "bf16": LlamaFileType.MOSTLY_BF16,
        }[gguf_type]
    )


def _rope_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face (half-split) -> llama.cpp (adjacent pairs) rotary order of Q or K rows (or biases)."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _encode(x: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = x.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return quants.quantize(a, qtype)  # bf16: gguf's exact rounding


def write_gguf(
    path: Path,
    plan: GGUFPlan,
    stream: Iterator[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    spec: ElasticSpec,
    cfg: Config,
    gguf_type: str,
    tokenizer_dir: Path,
    name: str,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Write the file at `path` (the caller commits it); returns the parameters written. `provenance`
    is kept as JSON under the key `flexcli.extract` (llama.cpp ignores keys it does not know)."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, plan.arch)
    try:
        _metadata(w, plan.arch, config, spec, cfg, gguf_type, name)
        add_tokenizer(w, tokenizer_dir, spec.dims.vocab_size)
        if provenance is not None:
            w.add_string("flexcli.extract", json.dumps(provenance))
        for _, gname, shape, q in plan.tensors:
            stored, dtype, nbytes = _stored(shape, q)
            w.add_tensor_info(gname, stored, dtype, nbytes, raw_dtype=None if dtype != np.uint8 else q)
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        want = {hf: (gname, q) for hf, gname, _, q in plan.tensors}
        order = [hf for hf, *_ in plan.tensors]
        permute = plan.arch in ADJACENT_ROPE
        written, i = 0, 0
        for hf_name, x in stream:
            if hf_name not in want:
                continue  # the tied LM head
            if hf_name != order[i]:
                raise RuntimeError(f"tensor stream out of order: {hf_name} where {order[i]} was planned")
            i += 1
            hit = _qk_projection(hf_name)
            if permute and hit is not None:
                layer, which = hit
                h = cfg[layer][1]
                x = _rope_rows(x, h if which == "q" else spec.kv_heads(h))
            w.write_tensor_data(_encode(x, want[hf_name][1]))
            written += x.numel()
        if i != len(order):
            raise RuntimeError(f"tensor stream ended after {i} of {len(order)} tensors")
    finally:
        w.close()
    return written


def _qk_projection(hf_name: str) -> tuple[int, str] | None:
    """(layer, 'q' | 'k') for the Q/K projections (weights and biases) of the families flexcli exports."""
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[-3] == "self_attn" and parts[-2] in ("q_proj", "k_proj"):
        return int(parts[-4]), parts[-2][0]
    return None


# -- tokenizer ----------------------------------------------------------------------------------------


def _copy_tokenizer_keys(reader: Any, w: Any) -> None:
    """Every tokenizer.* key of a GGUF reader into a writer, with its value types."""
    from gguf import GGUFValueType

    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def save_tokenizer_block(reader: Any, dst: Path) -> None:
    """Keep the tokenizer.* keys of a GGUF source as a tensor-free GGUF file in `dst`."""
    from gguf import GGUFWriter

    arch = str(reader.fields["general.architecture"].contents())
    w = GGUFWriter(dst / layout.GGUF_TOKENIZER, arch)
    _copy_tokenizer_keys(reader, w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def add_tokenizer(w: Any, src: Path, n_vocab: int) -> None:
    """The tokenizer.* keys: copied from a kept GGUF block, else translated from the HF tokenizer files."""
    block = src / layout.GGUF_TOKENIZER
    if block.exists():
        from gguf import GGUFReader

        _copy_tokenizer_keys(GGUFReader(block), w)
        return
    tokens, scores, types, model, pre = hf_vocab(src, n_vocab)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    from gguf import SpecialVocab

    SpecialVocab(src, load_merges=model == "gpt2", n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def check_tokenizer(src: Path, n_vocab: int) -> None:
    """Fail before any work when the tokenizer in `src` cannot be embedded."""
    if not (src / layout.GGUF_TOKENIZER).exists():
        hf_vocab(src, n_vocab)


def _pre_key(pre: dict[str, Any] | None) -> tuple:
    """A Hugging Face pre_tokenizer JSON in the canonical form PRE_TOKENIZERS is keyed by."""
    steps = (
        (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    )
    key = []
    for s in steps:
        t = s.get("type")
        if t == "ByteLevel":
            if s.get("add_prefix_space"):
                return (("ByteLevel(add_prefix_space=True)",),)
            key.append(("ByteLevel", bool(s.get("use_regex", True))))
        elif t == "Digits":
            key.append(("Digits", bool(s.get("individual_digits"))))
        elif t == "Split":
            pattern = s.get("pattern", {})
            key.append(
                (
                    "Split",
                    pattern.get("Regex", pattern.get("String")),
                    s.get("behavior"),
                    bool(s.get("invert")),
                )
            )
        else:
            key.append((t,))
    return tuple(key)


def _describe(key: tuple) -> str:
    return " + ".join(k[0] for k in key) or "none"


def hf_vocab(src: Path, n_vocab: int) -> tuple[list[str], list[float] | None, list[int], str, str]:
    """(tokens, scores, token types, tokenizer.ggml.model, tokenizer.ggml.pre) of the tokenizer in `src`,
    padded to the model's vocabulary size; UsageError naming the tokenizer when llama.cpp has no match."""
    from gguf import TokenType

    tj = src / "tokenizer.json"
    if not tj.exists():
        if (src / "tokenizer.model").exists():
            return _spm_vocab(src, n_vocab)
        raise UsageError(f"{src} has no tokenizer.json or tokenizer.model to embed in the GGUF file")
    data = json.loads(tj.read_text())
    model = data.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _spm_vocab(src, n_vocab)  # SentencePiece-style BPE (Llama 2, Mistral): llama.cpp's "llama"
    pre_key = _pre_key(data.get("pre_tokenizer"))
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel" or pre_key not in PRE_TOKENIZERS:
        raise UsageError(
            f"the tokenizer in {tj} ({model.get('type')} model, pre-tokenizer {_describe(pre_key)}, "
            f"decoder {decoder}) has no llama.cpp equivalent flexcli can write; export --format flex or stock"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special: dict[int, bool] = {}
    for t in data.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    if max(vocab.values()) >= n_vocab:
        raise UsageError(
            f"the tokenizer in {tj} has ids up to {max(vocab.values())}, the model only {n_vocab}"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(
            TokenType.NORMAL
            if i not in special
            else TokenType.CONTROL
            if special[i]
            else TokenType.USER_DEFINED
        )
    return tokens, None, types, "gpt2", PRE_TOKENIZERS[pre_key]


def _spm_vocab(src: Path, n_vocab: int) -> tuple[list[str], list[float] | None, list[int], str, str]:
    """A SentencePiece vocabulary (llama.cpp's "llama" tokenizer) through the gguf package's readers."""
    from gguf import TokenType
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab

    try:
        v = SentencePieceVocab(src) if (src / "tokenizer.model").exists() else LlamaHfVocab(src)
    except (FileNotFoundError, ImportError, ValueError, TypeError) as e:
        raise UsageError(f"cannot translate the SentencePiece tokenizer in {src} to GGUF: {e}") from None
    toks = list(v.all_tokens())
    if len(toks) > n_vocab:
        raise UsageError(f"the tokenizer in {src} has {len(toks)} tokens, the model only {n_vocab}")
    pad = n_vocab - len(toks)
    tokens = [t.decode("utf-8", errors="replace") for t, _, _ in toks] + [f"[PAD{i}]" for i in range(pad)]
    scores = [float(s) for _, s, _ in toks] + [-1000.0] * pad
    types = [int(k) for _, _, k in toks] + [int(TokenType.UNUSED)] * pad
    return tokens, scores, types, "llama", "default"
