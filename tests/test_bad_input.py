"""Every bad input is one line on stderr, the documented exit code, and no output left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_model
from typer.testing import CliRunner

from flexcli.cli import app

runner = CliRunner()


def _run(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    return runner.invoke(
        app, ["convert", *args, "-o", str(tmp_path / "OUT"), "--calib-samples", "2", "--seq-len", "32"]
    )


def _assert_clean_failure(res, tmp_path, code=2, needle=""):
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert res.stdout == ""
    assert not (tmp_path / "OUT").exists()
    assert not list(tmp_path.glob(".OUT.flex-tmp-*"))


@pytest.fixture
def src(tmp_path, tokenizer_dir):
    return make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2)


@pytest.fixture
def sharded(tmp_path, tokenizer_dir):
    return make_model(tmp_path / "sharded", tokenizer_dir, "mistral", 4, 2, shard="60KB")


def test_missing_path(tmp_path, monkeypatch, calib_file):
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(tmp_path / "nope"), "--calib", str(calib_file)),
        tmp_path,
        needle="does not exist",
    )


def test_dir_without_config(tmp_path, monkeypatch, calib_file):
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(tmp_path / "empty"), "--calib", str(calib_file)),
        tmp_path,
        needle="config.json",
    )


def test_unsupported_architecture(tmp_path, monkeypatch, src, calib_file):
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    res = _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file))
    _assert_clean_failure(res, tmp_path, needle="unsupported architecture")
    assert "LlamaForCausalLM" in res.stderr and "Qwen2ForCausalLM" in res.stderr


def test_truncated_safetensors(tmp_path, monkeypatch, src, calib_file):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file)), tmp_path, needle="truncated"
    )


def test_corrupt_safetensors_header(tmp_path, monkeypatch, src, calib_file):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:30] = b"\xff" * 20
    f.write_bytes(bytes(data))
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file)), tmp_path, needle="corrupt"
    )


def test_index_names_missing_shard(tmp_path, monkeypatch, sharded, calib_file):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(sharded), "--calib", str(calib_file)), tmp_path, needle="missing"
    )


def test_pickle_weights_need_allow_pickle(tmp_path, monkeypatch, src, calib_file):
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file)), tmp_path, needle="--allow-pickle"
    )
    ok = _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file), "--allow-pickle")
    assert ok.exit_code == 0, ok.stderr
    assert (tmp_path / "OUT" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary" * 50, "binary"),
        (b"def f(): pass\n", "shorter than one sequence"),
    ],
)
def test_bad_calibration_text(tmp_path, monkeypatch, src, content, needle):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(src), "--calib", str(calib)), tmp_path, needle=needle
    )


def test_output_exists_without_force(tmp_path, monkeypatch, src, calib_file):
    (tmp_path / "OUT").mkdir()
    (tmp_path / "OUT" / "keep.txt").write_text("precious")
    res = _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file))
    assert res.exit_code == 2 and "--force" in res.stderr
    assert (tmp_path / "OUT" / "keep.txt").read_text() == "precious"
    forced = _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert not (tmp_path / "OUT" / "keep.txt").exists() and (tmp_path / "OUT" / "flex_elastic.json").exists()


@pytest.mark.parametrize(
    "text,needle",
    [
        ("elastic:\n  mlp_ratio: [1.0]\n", "unknown key 'elastic.mlp_ratio'"),
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("calibration:\n  samples: many\n", "calibration.samples"),
        ("stages: [permute, fly]\n", "unknown stage"),
    ],
)
def test_bad_recipe(tmp_path, monkeypatch, src, calib_file, text, needle):
    r = tmp_path / "recipe.yaml"
    r.write_text(text)
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(src), "--recipe", str(r), "--calib", str(calib_file)),
        tmp_path,
        needle=needle,
    )


def test_unreachable_hub_suggests_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _run(tmp_path, monkeypatch, "llama-2-7b")
    _assert_clean_failure(res, tmp_path, code=1, needle="meta-llama/Llama-2-7b-hf")
    assert "local" in res.stderr


def test_json_error_document(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["convert", str(tmp_path / "nope"), "--json"])
    assert res.exit_code == 2
    want = (
        f"model path {tmp_path / 'nope'} does not exist (and it is neither a recipe in recipes/ nor a hub id)"
    )
    assert json.loads(res.stdout) == {"error": want, "exit_code": 2}
    assert res.stderr.strip() == f"error: {want}"


def test_cuda_without_gpu(tmp_path, monkeypatch, src, calib_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _assert_clean_failure(
        _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file), "--device", "cuda"),
        tmp_path,
        needle="no CUDA device",
    )


def test_output_is_source(tmp_path, monkeypatch, src, calib_file):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["convert", str(src), "-o", str(src), "--force", "--calib", str(calib_file)])
    assert res.exit_code == 2 and "source model itself" in res.stderr
    assert (src / "model.safetensors").exists()
    shutil.rmtree(src)


def test_remote_code_in_a_source_is_never_run(tmp_path, monkeypatch, src, calib_file):
    marker = tmp_path / "PWNED"
    (src / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        "AutoConfig": "modeling_evil.EvilConfig",
    }
    (src / "config.json").write_text(json.dumps(cfg))
    res = _run(tmp_path, monkeypatch, str(src), "--calib", str(calib_file))
    assert not marker.exists()  # never executed: converted with transformers' own Llama class
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "OUT" / "flex_elastic.json").exists()


def test_recipe_reads_exponent_floats_without_a_dot(tmp_path):
    """YAML 1.1 reads `lr: 1e-4` as the string '1e-4'; the recipe takes it as the float it means, and a
    word in a float field is still a one-line error."""
    from flexcli.errors import UsageError
    from flexcli.recipe import load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("train:\n  lr: 1e-4\n  blockwise_lr: 3E-3\n  temperature: 2\n")
    t = load_recipe(r).train
    assert (t.lr, t.blockwise_lr, t.temperature) == (1e-4, 3e-3, 2.0)
    r.write_text("train:\n  lr: fast\n")
    with pytest.raises(UsageError, match="train.lr must be float"):
        load_recipe(r)
