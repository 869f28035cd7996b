"""Small GGUF files written with the `gguf` package's writer, the way llama.cpp's converter writes them:
Q/K rows in llama.cpp's rotary order, 2-D weights quantized, norms in F32, a byte-level BPE tokenizer.

`write_gguf` returns the Hugging Face state dict that the file holds *after* quantization (dequantized,
Q/K rows back in HF order, computed here independently of flexcli), so a test can load the same
weights with transformers and compare logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

HF_TO_GGUF = {  # HF tensor name stem (layer-relative under model.layers.{i}.) -> GGUF name
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        i, _, rel = stem[len("model.layers.") :].partition(".")
        return f"blk.{i}.{HF_TO_GGUF[rel]}.{suffix}"
    return f"{HF_TO_GGUF[stem]}.{suffix}"


def rope_order(n_head: int, head_dim: int) -> list[int]:
    """The rotary row layout from its definition, index by index: Hugging Face rotates row i of a head
    with row i + head_dim/2 (half split); llama.cpp rotates adjacent rows 2i and 2i+1. Entry r is the
    Hugging Face row that llama.cpp's row r holds."""
    order = []
    for h in range(n_head):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return order


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face -> llama.cpp rotary order of Q or K rows (what llama.cpp's converter writes)."""
    return w[rope_order(n_head, w.shape[0] // n_head)]


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> Hugging Face rotary order."""
    return w[np.argsort(rope_order(n_head, w.shape[0] // n_head))]


def _k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks with small finite scales (the gguf package cannot quantize to these)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = np.full((rows, cols // block), 0.002, np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    if qtype == GGMLQuantizationType.Q4_K:  # d, dmin first, then 12 bytes of 6-bit scales, 128 of quants
        raw[..., 0:2], raw[..., 2:4] = d, d
    else:  # Q6_K: ql 128, qh 64, int8 scales 16, d last
        raw[..., 192:208] = rng.integers(-8, 8, size=(rows, cols // block, 16)).astype(np.int8).view(np.uint8)
        raw[..., 208:210] = d
    return raw.reshape(rows, -1)


def write_gguf(
    path: Path,
    model_dir: Path,
    qtype: str = "F32",
    arch: str = "llama",
    seed: int = 0,
    bad_type: str | None = None,
) -> dict[str, torch.Tensor]:
    """Write the HF model in `model_dir` as a GGUF file with 2-D weights in `qtype`; return the HF state
    dict the file decodes to. `bad_type` writes the first 2-D weight as zero blocks of that type instead
    (a type the gguf package may not dequantize)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    sd = load_file(str(model_dir / "model.safetensors"))
    rng = np.random.default_rng(seed)
    t = T[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(w, model_dir)
    decoded = {}
    for name, x in sd.items():
        a = x.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = rope_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = rope_permute(a, cfg.num_key_value_heads)
        if bad_type is not None and a.ndim == 2:
            block, size = gguf.GGML_QUANT_SIZES[T[bad_type]]
            w.add_tensor(
                gguf_name(name),
                np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8),
                raw_dtype=T[bad_type],
            )
            bad_type = None
            continue
        if a.ndim == 1 or t == T.F32:
            data, kind = a.astype(np.float32), T.F32
        elif t in (T.Q4_K, T.Q6_K):
            data, kind = _k_quant_blocks(*a.shape, t, rng), t
        else:
            data, kind = gguf.quants.quantize(a, t), t
        w.add_tensor(gguf_name(name), data, raw_dtype=kind)
        back = gguf.quants.dequantize(data, kind).astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            back = rope_unpermute(back, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            back = rope_unpermute(back, cfg.num_key_value_heads)
        decoded[name] = torch.from_numpy(back.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def _add_tokenizer(w, model_dir: Path) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` tokenizer model."""
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    vocab.update(special)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    cfg = json.loads((model_dir / "config.json").read_text())
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])


def converted_gguf(tmp_path: Path, tokenizer_dir: Path, calib_file: Path, qtype: str) -> Path:
    """A tiny Llama written as a GGUF (tmp_path/m.gguf) and converted by the CLI into tmp_path/el."""
    from conftest import make_model
    from typer.testing import CliRunner

    from flexcli.cli import app

    src = make_model(tmp_path / "hf", tokenizer_dir, "llama", heads=4, kv=2)
    write_gguf(tmp_path / "m.gguf", src, qtype)
    r = CliRunner().invoke(
        app,
        ["convert", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "el"), "--calib", str(calib_file),
         "--calib-samples", "2", "--seq-len", "32"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return tmp_path / "el"
