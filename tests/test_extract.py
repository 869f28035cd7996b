"""`flex extract` and `flex eval`: extracted == elastic at the configuration, stock loading of uniform
outputs in a process that never imports flexcli, the remote-code path, budget resolution and edges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_logits, rel_err, small_elastic
from typer.testing import CliRunner

from flexcli.arch.spec import config_from_json
from flexcli.cli import app

runner = CliRunner()
PLAIN = [
    "--no-compensate"
]  # these tests hold the slicer to the elastic model exactly (test_compensate: the refit)

FRESH = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
sub, remote = sys.argv[1], sys.argv[2] == "1"
m = AutoModelForCausalLM.from_pretrained(sub, dtype=torch.float32, trust_remote_code=remote).eval()
x = torch.randint(0, m.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = m(input_ids=x).logits
assert "flexcli" not in sys.modules
torch.save(logits, sys.argv[3])
print(json.dumps({"class": type(m).__name__, "params": sum(p.numel() for p in m.parameters())}))
"""


def _fresh(sub: Path, remote: bool, tmp_path) -> tuple[dict, torch.Tensor]:
    out = tmp_path / "logits.pt"
    p = subprocess.run(
        [sys.executable, "-c", FRESH, str(sub), "1" if remote else "0", str(out)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout), torch.load(out)


@pytest.mark.parametrize(
    "family,heads,kv,tied", [("mistral", 8, 2, False), ("qwen2", 4, 4, True), ("llama", 8, 4, False)]
)
def test_uniform_extract_is_stock_and_matches(tmp_path, tokenizer_dir, calib_file, family, heads, kv, tied):
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, family, heads, kv, tied)
    res = runner.invoke(
        app,
        ["extract", str(el), "--uniform", "mlp=0.5,heads=0.5", "-o", str(tmp_path / "sub"), "--json", *PLAIN],
    )
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)["models"][0]
    assert m["format"] == "stock" and m["needs_remote_code"] is False
    cfg = config_from_json(m["config"])
    info, logits = _fresh(tmp_path / "sub", False, tmp_path)
    assert info["class"].endswith("ForCausalLM") and not info["class"].startswith("Flex")
    assert info["params"] == m["params"]  # counted from the tensors written (biases and tying included)
    assert rel_err(logits, reference_logits(el, cfg)) <= 1e-5
    assert m["verified_max_rel_err"] <= 1e-5 and m["measured_latency_ms"] is None  # synthetic-regime table


def test_per_layer_extract_needs_remote_code_or_flexcli(tmp_path, tokenizer_dir, calib_file):
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "mistral", 8, 2)
    cfg = [
        (spec.layers[0].mlp[0], spec.layers[0].heads[-1]),
        (spec.layers[1].mlp[-1], spec.layers[1].heads[0]),
        (spec.layers[2].mlp[2], spec.layers[2].heads[1]),
    ]
    cfile = tmp_path / "cfg.json"
    cfile.write_text(json.dumps([{"mlp": m, "heads": h} for m, h in cfg]))
    res = runner.invoke(
        app, ["extract", str(el), "--config", str(cfile), "-o", str(tmp_path / "sub"), "--json", *PLAIN]
    )
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)["models"][0]
    assert m["format"] == "flex" and m["needs_remote_code"] is True
    assert (tmp_path / "sub" / "modeling_flexcli.py").exists()
    want = reference_logits(el, cfg)
    info, logits = _fresh(tmp_path / "sub", True, tmp_path)  # trust_remote_code, no flexcli import
    assert info["class"] == "FlexMistralForCausalLM" and info["params"] == m["params"]
    assert rel_err(logits, want) <= 1e-5
    # in a process that imported flexcli: no remote code needed
    from transformers import AutoModelForCausalLM

    import flexcli

    flexcli.register_auto_classes()
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "sub", dtype=torch.float32).eval()
    x = torch.randint(0, spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(local(input_ids=x).logits, want) <= 1e-5


def test_budgets_search_edges_and_many(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    el, spec, table = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "extract",
            str(el),
            "--budget",
            "60%,1.5ms,120K",
            "-o",
            str(tmp_path / "many"),
            "--json",
            "--no-verify",
        ],
    )
    assert res.exit_code == 0, res.stderr
    models = json.loads(res.stdout)["models"]
    assert [Path(m["output"]).name for m in models] == ["60pct", "1.5ms", "120K"]
    for m in models[:2]:
        assert m["predicted_latency_ms"] <= m["budget_ms"] * (1 + 1e-9)
        assert m["method"] == "importance search over the latency table"
    assert models[0]["budget_ms"] == pytest.approx(0.6 * table.full_ms())
    assert models[2]["params"] <= 120_000 and "parameter" in models[2]["method"]
    low = runner.invoke(app, ["extract", str(el), "--budget", "0.01ms", "-o", str(tmp_path / "low")])
    assert low.exit_code == 3 and "smallest" in low.stderr and not (tmp_path / "low").exists()
    high = runner.invoke(
        app, ["extract", str(el), "--budget", "100ms", "-o", str(tmp_path / "high"), "--json", "--no-verify"]
    )
    assert high.exit_code == 0 and "at or above the full model" in high.stderr
    assert json.loads(high.stdout)["models"][0]["config"] == [{"mlp": 128, "heads": 8}] * 3
    (el / "flex_latency.json").unlink()
    nolut = runner.invoke(app, ["extract", str(el), "--budget", "40ms", "-o", str(tmp_path / "x")])
    assert nolut.exit_code == 2 and "flex profile" in nolut.stderr
    for bad, needle in (
        (["--budget", "40"], "unit"),
        (["--uniform", "mlp=2"], "--uniform"),
        ([], "exactly one"),
    ):
        r = runner.invoke(app, ["extract", str(el), *bad, "-o", str(tmp_path / "y")])
        assert r.exit_code == 2 and needle in r.stderr, r.stderr


def test_defaults_from_project_file_and_eval(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    el, spec, table = small_elastic(
        tmp_path, tokenizer_dir, calib_file, "llama", 4, 4
    )  # records ./flex-project.json
    res = runner.invoke(
        app, ["extract", "--budget", "70%", "--json"]
    )  # as typed by a user: no ELASTIC, no -o
    assert res.exit_code == 0, res.stderr
    out = Path(json.loads(res.stdout)["models"][0]["output"])
    assert out == tmp_path / "el-70pct" and (out / "flex_extract.json").exists()
    ev = runner.invoke(
        app,
        [
            "eval",
            str(el),
            "--data",
            str(calib_file),
            "--budget",
            "70%",
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--json",
        ],
    )
    assert ev.exit_code == 0, ev.stderr
    rows = json.loads(ev.stdout)["rows"]
    assert [r["name"] for r in rows] == ["full", "70%"] and all(r["ppl"] > 1 for r in rows)
    assert rows[0]["compensated"] is None and rows[1]["compensated"] is True  # as extract wrote it
    sub = runner.invoke(
        app, ["eval", str(out), "--data", str(calib_file), "--samples", "2", "--seq-len", "32", "--json"]
    )
    assert sub.exit_code == 0, sub.stderr
    assert json.loads(sub.stdout)["rows"][0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-4)
    assert json.loads(res.stdout)["models"][0]["compensation"]["tensors"] > 0


def test_dry_run_plan_matches_real_output(tmp_path, tokenizer_dir, calib_file):
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "qwen2", 8, 2)
    args = [
        "extract",
        str(el),
        "--uniform",
        "mlp=0.5,heads=0.5",
        "-o",
        str(tmp_path / "sub"),
        "--max-shard-size",
        "40KB",
        "--json",
    ]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)["models"][0]
    assert not (tmp_path / "sub").exists()  # nothing written
    real = runner.invoke(app, [*args, "--no-verify"])
    assert real.exit_code == 0, real.stderr
    files = plan["planned_files"]
    assert len(files) > 1 and (tmp_path / "sub" / "model.safetensors.index.json").exists()
    assert sum((tmp_path / "sub" / f).stat().st_size for f in files) == plan["planned_bytes"]
    assert json.loads(real.stdout)["models"][0]["params"] == plan["params"]


def test_uniform_head_count_llama_config_rejects_goes_flex(tmp_path, tokenizer_dir, calib_file):
    """transformers' LlamaConfig refuses hidden_size % heads != 0 even with an explicit head_dim (6 of 8 heads
    at hidden 64, like 24 of 32 on Llama-2-7B): auto writes the flex format, --format stock says why."""
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 8)
    args = ["extract", str(el), "--uniform", "mlp=0.5,heads=0.75", "-o", str(tmp_path / "sub"), *PLAIN]
    res = runner.invoke(app, [*args, "--format", "stock"])
    assert res.exit_code == 2 and "transformers rejects" in res.stderr and "--format" in res.stderr
    assert not (tmp_path / "sub").exists()
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)["models"][0]
    assert m["format"] == "flex" and {c["heads"] for c in m["config"]} == {6}
    info, logits = _fresh(tmp_path / "sub", True, tmp_path)
    assert info["class"] == "FlexLlamaForCausalLM" and info["params"] == m["params"]
    assert rel_err(logits, reference_logits(el, config_from_json(m["config"]))) <= 1e-5
    # the same architecture trained from scratch (`flex pretrain --like`) saves and reloads in the flex format
    res = runner.invoke(
        app,
        [
            "pretrain",
            "-o",
            str(tmp_path / "scratch"),
            "--like",
            str(tmp_path / "sub"),
            "--corpus",
            str(calib_file),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    info, _ = _fresh(tmp_path / "scratch", True, tmp_path)
    assert info["class"] == "FlexLlamaForCausalLM" and info["params"] == m["params"]
    assert (tmp_path / "scratch" / "modeling_flexcli.py").exists()
