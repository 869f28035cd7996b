"""The llama.cpp tier (`make test-llamacpp`): exported GGUF files run in a real llama.cpp (llama-cpp-python)
with the sub-model's logits, for every family, uniform and per-layer (deci), GQA, tied heads; the embedded
tokenizer tokenizes as the Hugging Face one does; a broken export fails verification and leaves nothing."""

from __future__ import annotations

import json

import pytest
from conftest import small_elastic
from gguf_files import converted_gguf
from typer.testing import CliRunner

from flexcli.cli import app

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp
runner = CliRunner()


def _extract(el, out, *args, code=0) -> dict:
    r = runner.invoke(app, ["extract", str(el), "-o", str(out), "--format", "gguf", "--json", *args])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout)["models"][0] if code == 0 else {"stderr": r.stderr}


def _per_layer(tmp_path, spec) -> str:
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    cfg = [(mlp[0], heads[-1]), (mlp[-1], heads[0]), (mlp[1], heads[1])]
    (tmp_path / "c.json").write_text(json.dumps([{"mlp": m, "heads": h} for m, h in cfg]))
    return str(tmp_path / "c.json")


@pytest.mark.parametrize(
    "family,heads,kv,tied",
    [("llama", 8, 2, False), ("llama", 8, 8, True), ("mistral", 8, 1, False), ("qwen2", 8, 2, True)],
)
def test_llama_cpp_matches_the_sub_model(tmp_path, tokenizer_dir, calib_file, family, heads, kv, tied):
    """f32 files of random models: the file and llama.cpp's graph are exact (random models have near-tied
    logits, so f16 is checked on a trained model below)."""
    gguf_type = "f32"
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, family, heads, kv, tied=tied)
    for what, args in (
        ("uniform", ["--uniform", "mlp=0.5,heads=0.5"]),
        ("deci", ["--config", _per_layer(tmp_path, spec)]),
    ):
        m = _extract(el, tmp_path / f"{what}.gguf", *args, "--gguf-type", gguf_type)
        # llama.cpp's qwen2 loader wants full-width Q: pruned qwen2 heads are written as deci
        assert m["gguf_arch"] == ("llama" if what == "uniform" and family != "qwen2" else "deci")
        assert m["verified_in"].startswith("llama.cpp") and m["top1_agreement"] >= 0.99, m
        assert m["verified_max_rel_err"] < 1e-3, m


def test_trained_model_agrees_at_every_type(tmp_path):
    """A briefly trained model: f16 (the default) agrees on >= 99% of held-out positions, as extract
    enforces; bf16 is reported; q8_0 (llama.cpp's quantizer) is compared with its own f16 file."""
    from flexcli.commands.convert import ConvertOptions, convert
    from flexcli.commands.pretrain import PretrainOptions, pretrain

    base = pretrain(
        tmp_path / "base",
        PretrainOptions(size="tiny", steps=150, batch_size=8, seq_len=128, precision="fp32"),
    )
    el = convert(
        base.output,
        ConvertOptions(calib="stdlib", calib_samples=8, seq_len=64, device="cpu", output=tmp_path / "el"),
    ).output
    spec = json.loads((tmp_path / "el" / "flex_elastic.json").read_text())["spec"]
    mlp, heads = spec["layers"][0]["mlp"], spec["layers"][0]["heads"]
    (tmp_path / "c.json").write_text(
        json.dumps([{"mlp": mlp[0], "heads": heads[-1]}, {"mlp": mlp[-1], "heads": heads[0]}])
    )
    for gguf_type in ("f16", "bf16", "q8_0"):
        m = _extract(
            el, tmp_path / f"{gguf_type}.gguf", "--config", str(tmp_path / "c.json"), "--gguf-type", gguf_type
        )
        assert m["gguf_arch"] == "deci" and m["top1_agreement"] >= (0.99 if gguf_type == "f16" else 0.9), m
    assert m["f16_top1_agreement"] >= 0.99 and m["ppl_ratio"] == pytest.approx(1.0, abs=0.02), m


ISSUE_TYPES = (
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_0",
    "q5_1",
    "q4_k_m",
    "q4_k_s",
    "q4_0",
    "q4_1",
    "q3_k_m",
    "q2_k",
    "iq4_nl",
)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A briefly trained 256-wide model (4 layers, 8 heads of 32, MLP 704) converted with
    --quant-blocks k: every narrowed row is whole 256-value blocks."""
    from flexcli.commands.convert import ConvertOptions, convert
    from flexcli.commands.pretrain import PretrainOptions, pretrain

    tmp = tmp_path_factory.mktemp("aligned")
    base = pretrain(
        tmp / "base", PretrainOptions(size="small", steps=60, batch_size=8, seq_len=64, precision="fp32")
    )
    out = convert(
        base.output,
        ConvertOptions(
            calib="stdlib", calib_samples=8, seq_len=64, device="cpu", output=tmp / "el", quant_blocks="k"
        ),
    )
    assert out.mlp_choices == [704, 512, 256] and out.head_choices == [8], out  # 8 heads x 32 = one block
    return tmp / "el", tmp


@pytest.mark.parametrize("gguf_type", ISSUE_TYPES)
def test_every_llama_cpp_type_from_its_quantizer(aligned, gguf_type):
    """Each type is written by llama.cpp's quantizer with the sub-model's importance matrix, loads and
    runs in llama.cpp, and at block-aligned widths no tensor falls back to another type."""
    from flexcli.runtimes.quant import base_type

    el, tmp = aligned
    m = _extract(
        el, tmp / f"{gguf_type}.gguf", "--uniform", "mlp=0.73,heads=0.75", "--gguf-type", gguf_type, "--force"
    )
    assert m["config"][0] == {"mlp": 512, "heads": 8} and m["imatrix"] is True
    assert base_type(gguf_type) in m["stored_types"], m["stored_types"]
    assert m["fallbacks"] == 0, m["fallback_tensors"]
    assert 2 < m["bits_per_weight"] < 9.5 and m["file_bytes"] == (tmp / f"{gguf_type}.gguf").stat().st_size
    assert m["f16_top1_agreement"] >= 0.99 and m["verified_in"].startswith("llama.cpp")
    assert 0.9 < m["ppl_ratio"] < (1.1 if gguf_type in ("q8_0", "q6_k") else 2.0), m
    assert m["top1_agreement"] >= (0.9 if gguf_type in ("q8_0", "q6_k") else 0.3), m


def test_unaligned_rows_fall_back_and_say_why(aligned):
    """At the model's own MLP width (704, not whole 256-blocks) ffn_down falls back: counted as forced by
    the model's shape; the embedding type can be chosen, and the importance matrix can be left out."""
    el, tmp = aligned
    m = _extract(el, tmp / "full.gguf", "--uniform", "mlp=1,heads=1", "--gguf-type", "q4_k_m", "--force")
    assert m["fallbacks"] == 4 == m["fallbacks_from_model_shape"] and m["fallbacks_from_widths"] == 0
    assert all("ffn_down" in f for f in m["fallback_tensors"])
    plain = _extract(
        el, tmp / "p.gguf", "--uniform", "mlp=1,heads=1", "--gguf-type", "q4_0", "--no-imatrix", "--force"
    )
    small = _extract(el, tmp / "e.gguf", "--uniform", "mlp=1,heads=1", "--gguf-type", "q4_0/q4_0", "--force")
    assert plain["imatrix"] is False and small["imatrix"] is True
    assert plain["stored_types"].get("q6_k") == 1  # llama.cpp's choice for the tied output: q6_K
    assert small["stored_types"].get("q6_k") is None and small["file_bytes"] < plain["file_bytes"]


def test_profile_one_table_per_type_and_extract_in_it(aligned, monkeypatch):
    """`--gguf-type q4_0,f16` measures two tables (the quantized files timed as extract writes them); a
    q4_0 extract is then timed in the q4_0 regime, an f16 one is not; train-router trains a router per
    table, and --gguf-type auto picks the type whose configuration has the lowest held-out loss."""
    el, tmp = aligned
    r = runner.invoke(
        app,
        ["profile", str(el), "--runtime", "llama.cpp", "--gguf-type", "q4_0,f16", "--phase", "decode", "--kv-len", "16",
         "--rounds", "2", "--repeats", "3", "--correct", "0", "--accept-noisy", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    tables = json.loads(r.stdout)["tables"]
    assert ["|q4_0|" in tables[0]["regime"], "|f16|" in tables[1]["regime"]] == [True, True]
    q = _extract(
        el,
        tmp / "t.gguf",
        "--uniform",
        "mlp=0.5,heads=0.5",
        "--gguf-type",
        "q4_0",
        "--regime",
        "|q4_0|",
        "--force",
    )
    assert q["regime"] == tables[0]["regime"] and q["measured_latency_ms"] > 0
    f = _extract(el, tmp / "t.gguf", "--uniform", "mlp=0.5,heads=0.5", "--regime", "|q4_0|", "--force")
    assert f["measured_latency_ms"] is None and "not timed in the q4_0 regime" in f["latency_note"]
    # a router per table, then --gguf-type auto: each type's configuration scored in llama.cpp
    share = 100 * (1 + max(t["smallest_ms"] / t["full_ms"] for t in tables)) / 2  # feasible in every table
    r = runner.invoke(
        app,
        ["train-router", str(el), "--regime", "llama.cpp", "--no-dynamic", "--budgets", f"{share:.1f}%", "--steps",
         "20", "--sm-warmup", "8", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [x["regime"] for x in json.loads(r.stdout)["runs"]] == [t["regime"] for t in tables]
    lo, hi = max(t["smallest_ms"] for t in tables), min(t["full_ms"] for t in tables)
    budget = (lo + hi) / 2 if lo < hi else 0.99 * max(t["full_ms"] for t in tables)
    a = _extract(el, tmp / "auto.gguf", "--budget", f"{budget:.4f}ms", "--gguf-type", "auto", "--force")
    cands = a["candidates"]
    assert {c["gguf_type"] for c in cands} <= {"q4_0", "f16"} and sum(c["chosen"] for c in cands) == 1
    assert len(cands) == 2 or lo >= hi  # both types when the budget is feasible in both tables
    best = min(cands, key=lambda c: c["heldout_loss"])
    assert best["chosen"] and a["gguf_type"] == best["gguf_type"] and (tmp / "auto.gguf").is_file()
    assert all(c["measured_latency_ms"] > 0 and c["predicted_latency_ms"] <= budget * 1.05 for c in cands), (
        cands
    )
    assert not list(tmp.glob(".auto.gguf*"))  # the runners-up are gone


def test_a_broken_export_fails_verification_and_leaves_nothing(
    tmp_path, tokenizer_dir, calib_file, monkeypatch
):
    import flexcli.io.gguf_export as ge

    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    monkeypatch.setattr(ge, "_rope_rows", lambda x, n: x)  # Q/K left in the Hugging Face rotary order
    r = _extract(el, tmp_path / "bad.gguf", "--uniform", "mlp=1,heads=1", "--gguf-type", "f32", code=1)
    assert "verification failed" in r["stderr"] and "nothing was written" in r["stderr"]
    assert list(tmp_path.glob("*bad.gguf*")) == []


def _train_tokenizer(pre_tokenizer, path):
    """A byte-level BPE tokenizer with the given pre-tokenizer, trained on a slice of the stdlib."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flexcli.train.data import iter_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    docs = []
    for d in iter_documents("stdlib"):
        docs.append(d)
        if sum(map(len, docs)) > 200_000:
            break
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def _pre(name):
    from tokenizers import Regex, pre_tokenizers

    from flexcli.io.gguf_export import _LLAMA3_RE, _QWEN2_RE

    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = {"llama-bpe": _LLAMA3_RE, "qwen2": _QWEN2_RE}.get(name)
    if name == "gpt-2":
        return bl
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl])
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_translated_tokenizer_tokenizes_as_hugging_face(tmp_path, calib_file, pre):
    from transformers import AutoTokenizer

    from flexcli.train.data import iter_documents

    tok_dir = _train_tokenizer(_pre(pre), tmp_path / "tok")
    el, _, _ = small_elastic(tmp_path, tok_dir, calib_file, "llama", 4, 4)
    m = _extract(el, tmp_path / "u.gguf", "--uniform", "mlp=1,heads=1", "--no-verify")
    assert m["gguf_arch"] == "llama"
    hf = AutoTokenizer.from_pretrained(el)
    lc = llama_cpp.Llama(str(tmp_path / "u.gguf"), vocab_only=True, verbose=False)
    texts = [d[:3000] for _, d in zip(range(8), iter_documents("stdlib", "heldout"))]
    texts += ["x = 12345 + 0.5e-3  # digits\n\n\tindent  'quote's", "Ünïcödé — ok? 2024年"]
    for t in texts:
        want = hf.encode(t, add_special_tokens=False)
        assert lc.tokenize(t.encode(), add_bos=False, special=False) == want, t[:60]


def test_gguf_source_tokenizer_round_trips(tmp_path, tokenizer_dir, calib_file):
    """A model converted from a GGUF tokenizes in its exported GGUF exactly as in the source file."""
    converted_gguf(tmp_path, tokenizer_dir, calib_file, "F16")
    m = _extract(tmp_path / "el", tmp_path / "u.gguf", "--uniform", "mlp=0.5,heads=0.5", "--gguf-type", "f32")
    assert m["top1_agreement"] >= 0.99
    a = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    b = llama_cpp.Llama(str(tmp_path / "u.gguf"), vocab_only=True, verbose=False)
    text = calib_file.read_text()[:5000].encode()
    assert a.tokenize(text) == b.tokenize(text)


def test_profile_in_llama_cpp_then_route_and_extract_against_it(
    tmp_path, tokenizer_dir, calib_file, monkeypatch
):
    """The llama.cpp regime end to end: a table measured in llama.cpp (GGUF per configuration), a router
    trained against it, and an extracted GGUF timed in llama.cpp in pairs with the full model."""
    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 2)
    (el / "flex_latency.json").unlink()  # only the llama.cpp table
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the timed GGUF files go
    r = runner.invoke(
        app,
        ["profile", str(el), "--runtime", "llama.cpp", "--gguf-type", "f32", "--seq-len", "32", "--rounds", "2", "--repeats", "3",
         "--correct", "2", "--validate", "3", "--accept-noisy", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    prof = json.loads(r.stdout)
    assert prof["regime"].startswith("llama.cpp:") and prof["runtime"] == "llama.cpp"
    assert "|f32|b1|s32|prefill|" in prof["regime"] and prof["smallest_ms"] <= prof["full_ms"]
    table = json.loads((el / "flex_latency.json").read_text())["regimes"][prof["regime"]]
    assert table["header"]["llama_cpp"].startswith("llama.cpp via llama-cpp-python")
    assert list(scratch.iterdir()) == []  # the timed GGUF files and their directory are gone
    budget = f"{(prof['smallest_ms'] + prof['full_ms']) / 2:.4f}ms"
    r = runner.invoke(
        app,
        ["train-router", str(el), "--regime", "llama.cpp", "--no-dynamic", "--budgets", budget, "--steps", "20",
         "--sm-warmup", "8", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = _extract(
        el, tmp_path / "b.gguf", "--budget", budget, "--gguf-type", "f32"
    )  # random model: exact type
    assert m["regime"] == prof["regime"] and m["measured_latency_ms"] > 0 and m["reference_ms"] > 0
    # the median of per-pair ratios (time_alongside), not the ratio of the medians: equal up to the
    # spread of the pairs, not to rounding
    assert m["measured_at_table_speed_ms"] == pytest.approx(
        m["measured_latency_ms"] / (1 + m["reference_drift"]), rel=0.05
    )
    r = runner.invoke(app, ["extract", str(el), "--budget", budget, "-o", str(tmp_path / "st"), "--json"])
    st = json.loads(r.stdout)["models"][0]
    assert st["measured_latency_ms"] is None and "not timed in the llama.cpp regime" in st["latency_note"]
