"""Quantized GGUF sub-models without llama.cpp: type names, block-aligned widths, the importance matrix
against a hand-computed one, and the one-line refusals. The quantizer itself runs in the llama.cpp
tier (tests/test_llamacpp.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model, small_elastic
from typer.testing import CliRunner

from flexcli.arch.dims import Dims
from flexcli.arch.spec import ElasticSpec
from flexcli.cli import app
from flexcli.errors import UsageError
from flexcli.runtimes import quant

runner = CliRunner()


def test_type_names_parse_to_llama_cpp_file_types():
    from gguf import LlamaFileType

    t = quant.parse_type("Q4_K_M")
    assert (t.weights, t.embed, t.text, t.quantized, t.block) == ("q4_k_m", None, "q4_k_m", True, 256)
    assert quant.ftype_id("q4_k_m") == LlamaFileType.MOSTLY_Q4_K_M == 15
    assert quant.ftype_id("f32") == LlamaFileType.ALL_F32
    t = quant.parse_type("q4_0/q4_0")
    assert (t.weights, t.embed, t.block) == ("q4_0", "q4_0", 32) and t.text == "q4_0/q4_0"
    assert not quant.parse_type("f16").quantized and quant.parse_type("iq4_nl").block == 32
    assert [quant.base_type(n) for n in ("q5_k_s", "q3_k_l", "q6_k", "iq4_xs", "q8_0")] == [
        "q5_k",
        "q3_k",
        "q6_k",
        "iq4_xs",
        "q8_0",
    ]
    for name in quant.QUANTIZED:  # every type the issue asks for has a llama.cpp file type id
        assert quant.ftype_id(name) > 0
    assert [t.text for t in quant.parse_types("q4_0, q8_0,q4_0,f16")] == ["q4_0", "q8_0", "f16"]


@pytest.mark.parametrize(
    "bad, says", [("q4_k", "q8_0"), ("q4_0/q4_k_m", "embedding/output"), ("f16/q4_0", "quantized weights")]
)
def test_bad_type_names_are_one_line_usage_errors(bad, says):
    with pytest.raises(UsageError, match=says) as e:
        quant.parse_type(bad)
    assert e.value.option == "gguf_type" and "\n" not in str(e.value)


def test_fallback_lines_are_parsed_from_the_quantizer_log():
    log = (
        "llama_model_quantize_impl: ...\nwarning: blk.0.ffn_down.weight                - ncols   1152 not "
        "divisible by 256 (required for type    q6_K) -> falling back to    q8_0\n[ 3/ 30] blk.0.ffn_up.weight"
        "\nwarning: token_embd.weight - ncols    576 not divisible by 256 (required for type q4_K) "
        "(WARNING: must use F16 due to unusual shape) -> falling back to     f16\n"
    )
    got = quant.parse_fallbacks(log)
    assert [(f.tensor, f.ncols, f.wanted, f.got) for f in got] == [
        ("blk.0.ffn_down.weight", 1152, "q6_k", "q8_0"),
        ("token_embd.weight", 576, "q4_k", "f16"),
    ]


SMOL = Dims(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    tied=True,
)


def test_quant_blocks_round_every_narrowed_row_to_whole_blocks():
    """SmolLM2's shape: MLP choices become multiples of 256 (K-quants) or 32 (legacy); 3, 6 heads x 64
    are never whole 256-blocks, so only the full head count remains for K-quants."""
    ratios = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25]
    plain = ElasticSpec.build("llama", SMOL, ratios, [1.0, 0.67, 0.34])
    assert any(m % 256 for m in plain.layers[0].mlp[1:])  # without the option, 1344 etc.
    k = ElasticSpec.build("llama", SMOL, ratios, [1.0, 0.67, 0.34], quant_blocks="k")
    assert k.layers[0].mlp == [1536, 1280, 1024, 768, 512] and k.layers[0].heads == [9]
    legacy = ElasticSpec.build("llama", SMOL, ratios, [1.0, 0.67, 0.34], quant_blocks="legacy")
    assert all(m % 32 == 0 for m in legacy.layers[0].mlp) and legacy.layers[0].heads == [9, 6, 3]
    # head_dim 128 (Llama-2-7B): 2 heads x 128 = one 256-block, so every even head count is whole
    d7 = Dims(32, 4096, 11008, 32, 32, 128, 32000, False)
    s = ElasticSpec.build("llama", d7, ratios, [1.0, 0.75, 0.5, 0.25], quant_blocks="k")
    assert all(h * 128 % 256 == 0 for h in s.layers[0].heads) and all(
        m % 256 == 0 for m in s.layers[0].mlp[1:]
    )
    with pytest.raises(UsageError, match="quant_blocks"):
        ElasticSpec.build("llama", SMOL, ratios, [1.0], quant_blocks="q4")


def test_block_check_names_what_falls_back():
    from flexcli.runtimes.llamacpp import block_check

    spec = ElasticSpec.build("llama", SMOL, [1.0, 0.875], [1.0, 0.67])
    got = block_check(spec, [(1344, 6)] * 2, quant.parse_type("q4_k_m"))
    assert got == {"block": 256, "width_rows_not_whole": 4, "hidden_not_whole": True}
    assert block_check(spec, [(1344, 6)] * 2, quant.parse_type("q4_0"))["width_rows_not_whole"] == 0
    assert block_check(spec, [(1344, 6)], quant.parse_type("f16")) == {}


def test_convert_quant_blocks_flag_and_recipe_key(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 8, 8, hidden=64, layers=2, inter=512)
    r = runner.invoke(
        app,
        [
            "convert",
            str(src),
            "-o",
            str(tmp_path / "el"),
            "--calib",
            str(calib_file),
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
            "--quant-blocks",
            "k",
            "--json",
        ],  # fmt: skip
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mlp_choices"] == [512, 256] and all(m % 256 == 0 for m in out["mlp_choices"])
    rec = json.loads((tmp_path / "el" / "flex_elastic.json").read_text())["recipe"]
    assert rec["elastic"]["quant_blocks"] == "k"
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "e2"), "--quant-blocks", "q4"])
    assert r.exit_code == 2 and "--quant-blocks" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_importance_matrix_matches_a_hand_computed_one(tmp_path, tokenizer_dir, calib_file):
    """Every matrix's entry is the mean over tokens of its input squared, per input channel, computed
    on the sub-model at its widths and named as the GGUF file names the tensor."""
    from flexcli.arch.family import by_family
    from flexcli.elastic.runtime import load_elastic
    from flexcli.elastic.slicing import planned_specs, sliced_model
    from flexcli.io.gguf_export import plan_gguf
    from flexcli.io.source import SourceModel
    from flexcli.runtimes.imatrix import collect, gguf_names

    el_path, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 2, tied=True)
    cfg = [(spec.layers[0].mlp[1], spec.layers[0].heads[1]), spec.full()[0], (spec.layers[0].mlp[-1], 4)]
    src = SourceModel.open(el_path)
    plan = plan_gguf("llama", src.config, spec, cfg, planned_specs(src, spec, cfg), "f32")
    names = gguf_names(plan.tensors, tied=True)
    seqs = torch.randint(0, spec.dims.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    el = load_elastic(el_path)
    with el.configured(cfg):
        got = collect(el.model, seqs, names, batch_size=2)

    # by hand, on the plain sliced model: each layer's inputs recomputed from the hidden states
    sub = sliced_model(el.model, by_family("llama"), spec, cfg)
    want: dict[str, np.ndarray] = {}

    def ms(x):  # (n, T, C) -> (C,) mean over tokens of x^2
        return x.reshape(-1, x.shape[-1]).double().square().mean(0).float().numpy()

    with torch.no_grad():
        h = sub.model.embed_tokens(seqs)  # (3, 16, hidden)
        pos = sub.model.rotary_emb(h, torch.arange(seqs.shape[1])[None])
        for i, layer in enumerate(sub.model.layers):
            a = layer.input_layernorm(h)
            for w in ("q", "k", "v"):
                want[f"blk.{i}.attn_{w}.weight"] = ms(a)
            seen = {}
            hook = layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, args, s=seen: s.update(x=args[0])
            )
            out = layer(h, position_embeddings=pos)
            hook.remove()
            want[f"blk.{i}.attn_output.weight"] = ms(seen["x"])  # (.., heads x head_dim)
            g = layer.post_attention_layernorm(h + layer.self_attn.o_proj(seen["x"]))
            want[f"blk.{i}.ffn_gate.weight"] = want[f"blk.{i}.ffn_up.weight"] = ms(g)
            mlp = layer.mlp
            want[f"blk.{i}.ffn_down.weight"] = ms(
                mlp.act_fn(mlp.gate_proj(g)) * mlp.up_proj(g)
            )  # (.., width)
            h = out[0] if isinstance(out, tuple) else out
        final = sub.model.norm(h)
        want["token_embd.weight"] = ms(final)  # the tied LM head's input
        assert torch.allclose(
            sub.lm_head(final), sub(input_ids=seqs).logits, atol=1e-4
        )  # the forward by hand
    assert set(got) == set(want)
    sizes = {g: shape[-1] for _, g, shape, _ in plan.tensors}
    for name, v in want.items():
        assert got[name].shape == v.shape and got[name].dtype == np.float32
        assert name == "token_embd.weight" or got[name].size == sizes[name]  # the sliced widths
        np.testing.assert_allclose(got[name], v, rtol=2e-4, atol=1e-7, err_msg=name)


def test_mixed_neuron_order_keeps_the_function_and_its_importance_matrix(tmp_path, tokenizer_dir, calib_file):
    """With an importance matrix, a quantized file's MLP neurons are reordered so every 32-block spans the
    importance range: the reordered sub-model computes the same logits, and the matrix computed on it is
    the sub-model's matrix in the same order."""
    import copy

    from flexcli.arch.family import by_family
    from flexcli.elastic.runtime import load_elastic
    from flexcli.elastic.slicing import planned_specs, sliced_model, stream_sliced
    from flexcli.io.gguf_export import plan_gguf
    from flexcli.io.source import SourceModel
    from flexcli.runtimes.imatrix import collect, gguf_names
    from flexcli.runtimes.llamacpp import _mixed_imatrix, _mixed_neurons

    p = quant.mixed_order(100)
    assert sorted(p.tolist()) == list(range(100)) and p[:4].tolist() == [0, 4, 8, 12]  # 4 blocks, strided
    el_path, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 2, tied=True)
    cfg = [(spec.layers[0].mlp[1], 8), spec.full()[0], (spec.layers[0].mlp[-1], 4)]
    src, arch = SourceModel.open(el_path), by_family("llama")
    el = load_elastic(el_path)
    sub = sliced_model(el.model, arch, spec, cfg)
    mixed = copy.deepcopy(sub)
    state = dict(_mixed_neurons(stream_sliced(src, spec, cfg), arch))
    assert not torch.equal(
        state["model.layers.0.mlp.down_proj.weight"], sub.state_dict()["model.layers.0.mlp.down_proj.weight"]
    )
    mixed.load_state_dict(state, strict=False)
    seqs = torch.randint(0, spec.dims.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            mixed(input_ids=seqs).logits, sub(input_ids=seqs).logits, atol=1e-5, rtol=1e-5
        )
    plan = plan_gguf("llama", src.config, spec, cfg, planned_specs(src, spec, cfg), "f32")
    names = gguf_names(plan.tensors, tied=True)
    want, got = collect(mixed, seqs, names), _mixed_imatrix(collect(sub, seqs, names), plan.tensors, arch)
    assert set(got) == set(want)
    for g in want:
        np.testing.assert_allclose(got[g], want[g], rtol=1e-4, atol=1e-7, err_msg=g)
    assert not np.allclose(got["blk.0.ffn_down.weight"], collect(sub, seqs, names)["blk.0.ffn_down.weight"])


def test_quantized_types_need_llama_cpp_and_leave_nothing(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    import flexcli.runtimes.llamacpp as lc

    monkeypatch.setattr(lc, "missing", lambda: "llama-cpp-python is not installed; make install-llamacpp")
    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    out = tmp_path / "q.gguf"
    args = ["extract", str(el), "--uniform", "mlp=0.5,heads=1", "--format", "gguf", "--gguf-type", "q4_k_m"]
    r = runner.invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 2 and "make install-llamacpp" in r.stderr and "q4_k_m" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and list(tmp_path.glob("*q.gguf*")) == []
    # planning needs no quantizer: the dry run says which rows are not whole blocks
    r = runner.invoke(app, [*args, "-o", str(out), "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)["models"][0]
    assert m["gguf_type"] == "q4_k_m" and m["block"] == 256 and m["hidden_not_whole"] is True
    # ffn_down at 64 of 128 neurons in 3 layers (all 8 heads: the model's own attn_output)
    assert m["width_rows_not_whole"] == 3 and m["planned_bytes"] is None and not out.exists()
