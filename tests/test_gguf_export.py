"""`flex extract --format gguf` without llama.cpp: files read back with the `gguf` reader tensor by tensor
against the sliced sub-model, `llama` files loaded by transformers' own GGUF loader with the elastic
model's logits, `deci` per-layer arrays, tensor types, the embedded tokenizer, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import reference_logits, rel_err, small_elastic
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, dequantize
from gguf_files import converted_gguf, rope_unpermute
from typer.testing import CliRunner

from flexcli.arch.spec import config_from_json
from flexcli.cli import app
from flexcli.elastic.slicing import stream_sliced
from flexcli.io.source import SourceModel

runner = CliRunner()


def _extract(el, out, *args) -> dict:
    r = runner.invoke(
        app, ["extract", str(el), "-o", str(out), "--format", "gguf", "--json", "--no-compensate", *args]
    )  # the exporter's tensors against the plain slice (test_compensate covers the refit)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["models"][0]


def _fields(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


def _tensors(path) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (dequantized numpy-order array, type)."""
    return {t.name: (dequantize(t.data, t.tensor_type), t.tensor_type) for t in GGUFReader(path).tensors}


def _check_tensors(el, spec, cfg, path, permute: bool, tol: float) -> None:
    """Every tensor of the file against the sub-model sliced from the elastic checkpoint."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.DECI, len(cfg))
    got = _tensors(path)
    seen = set()
    for hf, x in stream_sliced(SourceModel.open(el), spec, cfg):
        stem, _, suffix = hf.rpartition(".")
        g = f"{names.get_name(stem)}.{suffix}"
        if g not in got:
            assert hf == "lm_head.weight" and spec.dims.tied  # llama.cpp reuses token_embd
            continue
        a, _ = got[g]
        parts = hf.split(".")
        if permute and parts[-2] in ("q_proj", "k_proj"):
            h = cfg[int(parts[2])][1]
            a = rope_unpermute(a, h if parts[-2] == "q_proj" else spec.kv_heads(h))
        assert list(a.shape) == list(x.shape), hf
        assert rel_err(torch.from_numpy(np.array(a)), x) <= tol, hf
        seen.add(g)
    assert seen == set(got)


@pytest.mark.parametrize("family,tied", [("mistral", False), ("qwen2", True)])
def test_per_layer_is_deci_with_exact_widths(tmp_path, tokenizer_dir, calib_file, family, tied):
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, family, 8, 2, tied=tied)
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    cfg = [(mlp[0], heads[0]), (mlp[-1], heads[-1]), (mlp[1], heads[1])]
    (tmp_path / "c.json").write_text(json.dumps([{"mlp": m, "heads": h} for m, h in cfg]))
    m = _extract(
        el, tmp_path / "sub.gguf", "--config", str(tmp_path / "c.json"), "--gguf-type", "f32", "--no-verify"
    )
    assert m["gguf_arch"] == "deci" and m["verified_in"] is None and m["verify_note"] is None
    f = _fields(tmp_path / "sub.gguf")
    assert f["general.architecture"] == "deci"
    assert f["deci.block_count"] == 3 and f["deci.attention.key_length"] == spec.dims.head_dim
    assert f["deci.feed_forward_length"] == [c[0] for c in cfg]
    assert f["deci.attention.head_count"] == [c[1] for c in cfg]
    assert f["deci.attention.head_count_kv"] == [spec.kv_heads(c[1]) for c in cfg]
    assert json.loads(f["flexcli.extract"])["config"] == m["config"]
    # deci rotates adjacent pairs: Q/K rows (and qwen2's Q/K biases) are in llama.cpp's order
    _check_tensors(el, spec, cfg, tmp_path / "sub.gguf", permute=True, tol=0)
    assert m["params"] == sum(int(np.prod(a.shape)) for a, _ in _tensors(tmp_path / "sub.gguf").values())


@pytest.mark.parametrize("family,tied", [("mistral", False), ("llama", True)])
def test_uniform_loads_in_transformers_gguf_loader(tmp_path, tokenizer_dir, calib_file, family, tied):
    from transformers import AutoModelForCausalLM

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, family, 8, 2, tied=tied)
    m = _extract(
        el, tmp_path / "u.gguf", "--uniform", "mlp=0.5,heads=0.5", "--gguf-type", "f32", "--no-verify"
    )
    cfg = config_from_json(m["config"])
    assert m["gguf_arch"] == "llama"
    _check_tensors(el, spec, cfg, tmp_path / "u.gguf", permute=True, tol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="u.gguf", dtype=torch.float32).eval()
    x = torch.randint(0, spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert rel_err(got, reference_logits(el, cfg)) < 1e-4


def test_qwen2_full_heads_keep_qwen2_pruned_heads_become_deci(tmp_path, tokenizer_dir, calib_file):
    """qwen2 rotates half-split, as Hugging Face does: no permutation. llama.cpp's qwen2 loader sizes Q as
    hidden x hidden, so a qwen2 model with pruned heads is written as deci (which takes biases too)."""
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "qwen2", 8, 2)
    m = _extract(el, tmp_path / "u.gguf", "--uniform", "mlp=0.5,heads=1", "--gguf-type", "f32", "--no-verify")
    assert m["gguf_arch"] == "qwen2" and _fields(tmp_path / "u.gguf")["qwen2.attention.head_count"] == 8
    _check_tensors(el, spec, config_from_json(m["config"]), tmp_path / "u.gguf", permute=False, tol=0)
    m = _extract(el, tmp_path / "h.gguf", "--uniform", "mlp=1,heads=0.5", "--gguf-type", "f32", "--no-verify")
    assert m["gguf_arch"] == "deci" and _fields(tmp_path / "h.gguf")["deci.attention.head_count"] == [4] * 3
    _check_tensors(el, spec, config_from_json(m["config"]), tmp_path / "h.gguf", permute=True, tol=0)


def test_tensor_types_and_dry_run(tmp_path, tokenizer_dir, calib_file):
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    for gt, want, tol in (("f16", Q.F16, 1e-3), ("bf16", Q.BF16, 1e-2)):
        out = tmp_path / f"{gt}.gguf"
        plan = _extract(el, out, "--uniform", "mlp=0.5,heads=0.75", "--gguf-type", gt, "--dry-run")
        m = _extract(el, out, "--uniform", "mlp=0.5,heads=0.75", "--gguf-type", gt, "--no-verify")
        assert (
            plan["planned_files"] == [out.name]
            and plan["params"] == m["params"]
            and not plan["output"] != m["output"]
        )
        assert 0 < plan["planned_bytes"] < out.stat().st_size
        types = {n: q for n, (_, q) in _tensors(out).items()}
        assert all(q == Q.F32 for n, q in types.items() if "norm" in n)  # vectors stay f32
        assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
        _check_tensors(el, spec, config_from_json(m["config"]), out, permute=True, tol=tol)


def test_tokenizer_is_translated(tmp_path, tokenizer_dir, calib_file):
    from transformers import AutoTokenizer

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    _extract(el, tmp_path / "u.gguf", "--uniform", "mlp=1,heads=1", "--no-verify")
    f = _fields(tmp_path / "u.gguf")
    tok = AutoTokenizer.from_pretrained(el)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(spec.dims.vocab_size)))
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL: parsed as a special token
    assert len(f["tokenizer.ggml.merges"]) > 0


def test_untranslatable_tokenizer_is_one_line_and_writes_nothing(tmp_path, tokenizer_dir, calib_file):
    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    tj = json.loads((el / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (el / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "x.gguf"
    r = runner.invoke(
        app, ["extract", str(el), "--uniform", "mlp=1,heads=1", "--format", "gguf", "-o", str(out)]
    )
    assert r.exit_code == 2
    assert "pre-tokenizer Whitespace" in r.stderr and "no llama.cpp equivalent" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.glob("*x.gguf*")) == []


def test_gguf_source_keeps_its_tokenizer_block(tmp_path, tokenizer_dir, calib_file):
    converted_gguf(tmp_path, tokenizer_dir, calib_file, "F32")
    _extract(tmp_path / "el", tmp_path / "u.gguf", "--uniform", "mlp=0.5,heads=0.5", "--no-verify")
    want = {k: v for k, v in _fields(tmp_path / "m.gguf").items() if k.startswith("tokenizer.")}
    got = {k: v for k, v in _fields(tmp_path / "u.gguf").items() if k.startswith("tokenizer.")}
    assert got == want and want["tokenizer.ggml.pre"] == "default"  # verbatim, not re-derived ("gpt-2")


def test_without_llama_cpp_the_json_says_why(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    import flexcli.runtimes.llamacpp

    monkeypatch.setattr(
        flexcli.runtimes.llamacpp, "missing", lambda: "llama-cpp-python is not installed; make it"
    )
    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    m = _extract(el, tmp_path / "u.gguf", "--uniform", "mlp=0.5,heads=0.5", "--verify")
    assert m["verified_in"] is None and m["verify_note"].startswith("llama-cpp-python is not installed")
    assert (tmp_path / "u.gguf").exists()


def test_bad_gguf_type_and_existing_output(tmp_path, tokenizer_dir, calib_file):
    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    r = runner.invoke(
        app, ["extract", str(el), "--uniform", "mlp=1,heads=1", "--format", "gguf", "--gguf-type", "q4_k"]
    )
    assert r.exit_code == 2 and "--gguf-type" in r.stderr and "q8_0" in r.stderr
    (tmp_path / "e.gguf").write_text("x")
    r = runner.invoke(
        app,
        [
            "extract",
            str(el),
            "--uniform",
            "mlp=1,heads=1",
            "--format",
            "gguf",
            "-o",
            str(tmp_path / "e.gguf"),
        ],
    )
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert (tmp_path / "e.gguf").read_text() == "x"


def test_llama_cpp_runtime_needs_llama_cpp_python(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    import flexcli.runtimes.llamacpp

    monkeypatch.setattr(
        flexcli.runtimes.llamacpp, "missing", lambda: "llama-cpp-python is not installed; make it"
    )
    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    r = runner.invoke(app, ["profile", str(el), "--runtime", "llama.cpp"])
    assert r.exit_code == 2 and "llama-cpp-python is not installed" in r.stderr
    r = runner.invoke(app, ["profile", str(el), "--runtime", "onnx"])
    assert r.exit_code == 2 and "--runtime" in r.stderr


@pytest.mark.parametrize("n_head,head_dim", [(1, 2), (2, 8), (3, 64)])
def test_rotary_rows_follow_llamacpp_layout(n_head, head_dim):
    """The exporter's Q/K row order against the layout's definition (gguf_files.rope_order, index by
    index): llama.cpp's rows 2i and 2i+1 of a head are Hugging Face's rows i and i + head_dim/2."""
    from gguf_files import rope_order

    from flexcli.io.gguf_export import _rope_rows

    rows = torch.arange(n_head * head_dim)
    assert _rope_rows(rows[:, None].expand(-1, 3), n_head)[:, 0].tolist() == rope_order(n_head, head_dim)
    assert _rope_rows(rows, n_head).tolist() == rope_order(n_head, head_dim)  # biases too
    assert rope_order(1, 4) == [0, 2, 1, 3]  # the definition itself, by hand
