"""`flex convert` end to end: outputs load in stock transformers (in a process that never imports
flexcli) with the source's logits; importance is stored; runs are deterministic; the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flex_cmd, make_model
from safetensors.torch import load_file

from flexcli.commands.convert import ConvertOptions, convert

STOCK_CHECK = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
src, out = sys.argv[1], sys.argv[2]
a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
x = torch.randint(0, a.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    la, lb = a(x).logits, b(x).logits
assert "flexcli" not in sys.modules
print(json.dumps({"rel": ((la - lb).abs().max() / la.abs().max()).item(),
                  "changed": any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))}))
"""

CASES = {  # id: (family, heads, kv, tied, shard)
    "llama-mha-tied": ("llama", 4, 4, True, None),
    "mistral-gqa-sharded": ("mistral", 8, 2, False, "60KB"),
    "qwen2-mqa": ("qwen2", 4, 1, False, None),
    "qwen2-gqa-tied-sharded": ("qwen2", 8, 4, True, "60KB"),
}


def _opts(calib: Path, **kw) -> ConvertOptions:
    return ConvertOptions(calib=str(calib), calib_samples=4, seq_len=32, device="cpu", **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_convert_output_loads_in_stock_transformers_with_same_logits(
    tmp_path, tokenizer_dir, calib_file, case
):
    family, heads, kv, tied, shard = CASES[case]
    src = make_model(tmp_path / "src", tokenizer_dir, family, heads, kv, tied, shard=shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    res = convert(str(src), _opts(calib_file, output=tmp_path / "out"))
    out = Path(res.output)
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_CHECK, str(src), str(out)], capture_output=True, text=True, check=True
    )
    got = json.loads(proc.stdout)
    assert got["rel"] <= 1e-5
    assert got["changed"]  # the weights really were permuted
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    manifest = json.loads((out / "flex_elastic.json").read_text())
    assert manifest["format"] == "flexcli.elastic/1"
    assert manifest["spec"]["family"] == family
    assert set(manifest["source"]["files"]) >= {"config.json"}
    assert manifest["recipe"]["calibration"]["samples"] == 4
    assert not list(tmp_path.glob(".out.flex-tmp-*"))


def test_importance_scores_saved_and_sorted(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 8, 2)
    out = Path(convert(str(src), _opts(calib_file, output=tmp_path / "out")).output)
    imp = load_file(out / "flex_importance.safetensors")
    for i in range(2):
        neuron = imp[f"layers.{i}.neuron_score"][imp[f"layers.{i}.neuron_perm"]]
        assert torch.all(neuron[:-1] >= neuron[1:])  # descending after permutation
        q = imp[f"layers.{i}.qhead_score"][imp[f"layers.{i}.qhead_perm"]].view(2, 4)
        assert torch.all(q[:, :-1] >= q[:, 1:])  # descending inside each KV group
        assert q[0].sum() >= q[1].sum()  # groups sorted by total importance
        assert sorted(imp[f"layers.{i}.qhead_perm"].tolist()) == list(range(8))


def test_deterministic(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "qwen2", 8, 2)
    a = Path(convert(str(src), _opts(calib_file, output=tmp_path / "a")).output)
    b = Path(convert(str(src), _opts(calib_file, output=tmp_path / "b")).output)
    for f in ("model.safetensors", "flex_importance.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_cli_json_and_project_file(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "mymodel", tokenizer_dir, "llama", 4, 2)
    proc = subprocess.run(
        [
            *flex_cmd(),
            "convert",
            str(src),
            "--calib",
            str(calib_file),
            "--calib-samples",
            "4",
            "--seq-len",
            "32",
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document
    assert Path(doc["output"]) == tmp_path / "mymodel-elastic"
    assert doc["family"] == "llama" and doc["mlp_choices"][0] == 96 and doc["head_choices"][0] == 4
    project = json.loads((tmp_path / "flex-project.json").read_text())
    assert project["elastic"][0]["path"] == "mymodel-elastic"
    # a second run without --force refuses and leaves the first output alone
    again = subprocess.run(
        [*flex_cmd(), "convert", str(src), "--calib", str(calib_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--force" in again.stderr and again.stdout == ""
    assert (tmp_path / "mymodel-elastic" / "flex_elastic.json").exists()


def test_cli_version_and_help():
    v = subprocess.run([*flex_cmd(), "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("flex ")
    h = subprocess.run([*flex_cmd(), "convert", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--calib" in h.stdout and "--force" in h.stdout


def test_uniform_width_report(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 4)
    res = convert(str(src), _opts(calib_file, eval_data=str(calib_file), output=tmp_path / "out"))
    assert [w.ratio for w in res.widths] == [1.0, 0.75, 0.5, 0.25]
    assert all(w.ppl > 1 for w in res.widths)


def test_prune_only_convert_never_loads_the_model(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    """Without training or evaluation, convert scores the source layer by layer from its files and streams
    the permuted tensors: the whole model is never loaded, and the checkpoint equals the one a
    whole-model conversion (held-out evaluation on, so the model is loaded) writes, byte for byte."""
    from flexcli.io.source import SourceModel

    src = make_model(tmp_path / "src", tokenizer_dir, "mistral", 8, 2, False, layers=3, shard="60KB")
    loaded = convert(str(src), _opts(calib_file, output=tmp_path / "whole", eval_data=str(calib_file)))
    assert loaded.widths  # the model was loaded to evaluate it

    def refuse(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(SourceModel, "load_model", refuse)
    streamed = convert(str(src), _opts(calib_file, output=tmp_path / "layerwise"))
    assert not streamed.widths
    for name in (
        "flex_importance.safetensors",
        *(f.name for f in (tmp_path / "whole").glob("*.safetensors")),
    ):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "layerwise" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
