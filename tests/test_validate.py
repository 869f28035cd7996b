"""`flex validate`: valid checkpoints pass; each kind of damage is reported with file and tensor, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flexcli.cli import app
from flexcli.commands.convert import ConvertOptions, convert

runner = CliRunner()


@pytest.fixture
def elastic(tmp_path, tokenizer_dir, calib_file) -> Path:
    src = make_model(tmp_path / "src", tokenizer_dir, "qwen2", 4, 2, hidden=64, layers=2)
    return Path(
        convert(
            str(src),
            ConvertOptions(
                calib=str(calib_file), calib_samples=2, seq_len=32, device="cpu", output=tmp_path / "el"
            ),
        ).output
    )


def _run(path):
    res = runner.invoke(app, ["validate", str(path), "--json"])
    return res.exit_code, json.loads(res.stdout)


def test_valid_source_and_elastic(elastic, tmp_path):
    for p in (tmp_path / "src", elastic):
        code, doc = _run(p)
        assert code == 0 and doc["valid"] and doc["problems"] == [], doc
    assert _run(elastic)[1]["kind"] == "elastic"


def _rewrite(path: Path, fn) -> None:
    f = path / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("nan", "NaN or Inf"),
        ("shape", "shape does not match"),
        ("missing", "missing tensor"),
        ("truncate", "truncated"),
        ("perm", "not a permutation"),
        ("extra", "unexpected tensor"),
    ],
)
def test_damage_is_reported(elastic, damage, needle):
    if damage == "nan":
        _rewrite(elastic, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    elif damage == "shape":
        _rewrite(
            elastic,
            lambda t: t.__setitem__(
                "model.layers.0.mlp.down_proj.weight",
                t["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous(),
            ),
        )
    elif damage == "missing":
        _rewrite(elastic, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    elif damage == "extra":
        _rewrite(elastic, lambda t: t.__setitem__("model.layers.0.surprise", torch.zeros(3)))
    elif damage == "truncate":
        f = elastic / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-64])
    elif damage == "perm":
        f = elastic / "flex_importance.safetensors"
        t = load_file(f)
        t["layers.0.neuron_perm"][0] = t["layers.0.neuron_perm"][1]
        save_file(t, str(f))
    code, doc = _run(elastic)
    assert code == 2 and not doc["valid"]
    assert any(needle in p["message"] for p in doc["problems"]), doc["problems"]


def test_router_tensors_must_match_their_record(elastic):
    (elastic / "flex_routers.json").write_text(json.dumps({"sha256": "0" * 64, "static": True}))
    save_file({"static.x": torch.zeros(2)}, str(elastic / "flex_routers.safetensors"))
    code, doc = _run(elastic)
    assert code == 2 and any("router tensors" in p["message"] for p in doc["problems"])
