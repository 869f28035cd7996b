"""GGUF sources: small GGUF files written with the `gguf` package's writer (several tensor types, GQA,
tied and untied heads) load with the same logits as the same weights in transformers, convert into an
ordinary elastic checkpoint, and bad files fail with one line and nothing written."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_model
from gguf_files import write_gguf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from flexcli.cli import app
from flexcli.io.gguf import GGUFSource
from flexcli.io.source import open_source

runner = CliRunner()

# (tensor type, model shape): K-quant blocks hold 256 values, so those models are 256 wide
CASES = [
    ("F32", {}),
    ("F16", {"tied": True}),
    ("BF16", {}),
    ("Q8_0", {"kv": 1}),
    ("Q4_0", {}),
    ("Q4_1", {"tied": True}),
    ("Q4_K", {"hidden": 256, "inter": 512}),
    ("Q6_K", {"hidden": 256, "inter": 512, "tied": True}),
]


def _reference(model_dir, state):
    """The same weights loaded by transformers itself."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.load_state_dict(state, strict=False)
    ref.tie_weights()
    return ref.eval()


@pytest.mark.parametrize("qtype,shape", CASES, ids=[c[0] for c in CASES])
def test_gguf_loads_with_transformers_logits(tmp_path, tokenizer_dir, qtype, shape):
    model_dir = make_model(tmp_path / "hf", tokenizer_dir, "llama", heads=4, kv=shape.pop("kv", 2), **shape)
    state = write_gguf(tmp_path / "m.gguf", model_dir, qtype)
    src = GGUFSource.open(tmp_path / "m.gguf", "float32")
    assert src.arch.family == "llama" and src.dims.num_kv_heads in (1, 2)
    got = src.load_model(torch.device("cpu"), "float32").eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, have = _reference(model_dir, state)(ids).logits, got(ids).logits
    assert torch.equal(want, have), (want - have).abs().max()


def test_qwen2_gguf_with_qkv_biases(tmp_path, tokenizer_dir):
    """qwen2 files keep Q/K rows in HF order (no rotary permutation) and carry q/k/v biases."""
    model_dir = make_model(tmp_path / "hf", tokenizer_dir, "qwen2", heads=4, kv=2)
    state = write_gguf(tmp_path / "q.gguf", model_dir, "F16", arch="qwen2")
    src = GGUFSource.open(tmp_path / "q.gguf", "float32")
    assert src.arch.family == "qwen2"
    got = src.load_model(torch.device("cpu"), "float32").eval()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(_reference(model_dir, state)(ids).logits, got(ids).logits)


def test_gguf_tokenizer_matches_the_original(tmp_path, tokenizer_dir):
    model_dir = make_model(tmp_path / "hf", tokenizer_dir)
    write_gguf(tmp_path / "m.gguf", model_dir)
    text = "def f(x):\n    return x  # héllo wörld\n\n<|endoftext|>"
    want = AutoTokenizer.from_pretrained(tokenizer_dir)
    got = GGUFSource.open(tmp_path / "m.gguf").tokenizer()
    assert got(text).input_ids == want(text).input_ids
    assert got.eos_token_id == want.eos_token_id


def test_convert_gguf_end_to_end(tmp_path, monkeypatch, tokenizer_dir, calib_file):
    """`flex convert m.gguf` from the working directory: ./m-elastic, bf16 safetensors, a stock tokenizer,
    the file's hash in the manifest, and a permuted full model equal to the GGUF's weights."""
    model_dir = make_model(tmp_path / "hf", tokenizer_dir, "llama", heads=4, kv=2)
    state = write_gguf(tmp_path / "m.gguf", model_dir, "Q8_0")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "convert",
            "m.gguf",
            "--calib",
            str(calib_file),
            "--calib-samples",
            "4",
            "--seq-len",
            "32",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "m-elastic"
    assert json.loads(res.stdout)["output"] == str(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    manifest = json.loads((out / "flex_elastic.json").read_text())
    digest = hashlib.sha256((tmp_path / "m.gguf").read_bytes()).hexdigest()
    assert manifest["source"]["files"] == {"m.gguf": digest}
    assert (
        AutoTokenizer.from_pretrained(out)("import os").input_ids
        == AutoTokenizer.from_pretrained(tokenizer_dir)("import os").input_ids
    )
    elastic = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = _reference(model_dir, {k: v.bfloat16().float() for k, v in state.items()})(ids).logits
        assert torch.allclose(elastic(ids).logits, want, atol=1e-3, rtol=1e-3)
    assert json.loads((tmp_path / "flex-project.json").read_text())  # recorded for `flex extract`
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # every file with the usual mode (none left 0600)


def test_gguf_dtype_and_directory_source(tmp_path, tokenizer_dir):
    """A directory holding exactly one .gguf is that file; --dtype float32 stores it losslessly."""
    model_dir = make_model(tmp_path / "hf", tokenizer_dir)
    (tmp_path / "d").mkdir()
    write_gguf(tmp_path / "d" / "only.gguf", model_dir)
    src = open_source(tmp_path / "d", gguf_dtype="float32")
    assert src.path.name == "only.gguf" and {s[1] for s in src.tensor_specs()} == {"F32"}


def _fails_cleanly(tmp_path, monkeypatch, source, needle, calib_file):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app, ["convert", str(source), "-o", "OUT", "--calib", str(calib_file), "--calib-samples", "2"]
    )
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "OUT").exists() and not list(tmp_path.glob(".OUT.flex-tmp-*"))


def test_bad_gguf_files(tmp_path, monkeypatch, tokenizer_dir, calib_file):
    model_dir = make_model(tmp_path / "hf", tokenizer_dir)
    write_gguf(tmp_path / "good.gguf", model_dir, "Q8_0")
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    _fails_cleanly(tmp_path, monkeypatch, tmp_path / "cut.gguf", "not a readable GGUF file", calib_file)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    _fails_cleanly(tmp_path, monkeypatch, tmp_path / "junk.gguf", "not a readable GGUF file", calib_file)
    write_gguf(tmp_path / "mamba.gguf", model_dir, arch="mamba")
    _fails_cleanly(
        tmp_path, monkeypatch, tmp_path / "mamba.gguf", "architecture 'mamba' is not supported", calib_file
    )
    write_gguf(tmp_path / "q81.gguf", model_dir, bad_type="Q8_1")
    _fails_cleanly(tmp_path, monkeypatch, tmp_path / "q81.gguf", "type Q8_1", calib_file)
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(data)
    _fails_cleanly(tmp_path, monkeypatch, tmp_path / "two", "a.gguf, b.gguf", calib_file)


@pytest.mark.slow
def test_real_smollm2_gguf_speaks():
    """The real file of `make bench-real` (skipped until that has fetched it): greedy decoding of the
    converted source answers the capital of France."""
    import os
    from pathlib import Path

    cache = Path(os.environ.get("FLEX_CACHE", Path.home() / ".cache" / "flexcli")).expanduser()
    path = cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not fetched (make bench-real fetches it)")
    src = open_source(path, gguf_dtype="float32")
    assert (src.dims.num_layers, src.dims.num_heads, src.dims.num_kv_heads) == (30, 9, 3)
    tok, model = src.tokenizer(), src.load_model(torch.device("cpu"), "float32")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" Paris")


def test_eval_reads_a_gguf_file(tmp_path, tokenizer_dir):
    """`flex eval m.gguf` scores the dequantized weights exactly as transformers scores them."""
    from flexcli.commands.evaluate import EvalOptions, evaluate
    from flexcli.elastic.evaluate import mean_loss
    from flexcli.train.data import STDLIB, load_sequences

    model_dir = make_model(tmp_path / "hf", tokenizer_dir)
    state = write_gguf(tmp_path / "m.gguf", model_dir, "Q4_0")
    res = evaluate(tmp_path / "m.gguf", EvalOptions(samples=2, seq_len=32))
    seqs = load_sequences(AutoTokenizer.from_pretrained(tokenizer_dir), STDLIB, 2, 32, "heldout")
    assert res.rows[0].loss == pytest.approx(mean_loss(_reference(model_dir, state), seqs), rel=1e-6)
