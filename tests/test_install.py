"""A normal (non-editable) `pip install .` into a fresh venv: package data (descriptors, recipes, kernels,
the modeling file) is there, and the demo's commands run through the installed `flex` script.

The install is built from a copy of the tracked sources, so it leaves no build/ or *.egg-info in the
repository. The fresh venv sees this venv's site-packages (torch, transformers, ...) through a .pth
file, which does not process their .pth files: this checkout's editable install stays invisible.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from conftest import make_model

from flexcli.latency.table import load_table, save_table

ROOT = Path(__file__).resolve().parents[1]
LITTER = ("build", "src/flexcli.egg-info", "flexcli.egg-info")

CHECK = r"""
import flexcli, flexcli.kernels
from flexcli.arch import supported_names
from flexcli.io.submodel import modeling_source
from flexcli.recipe import builtin_recipes, load_recipe
assert "site-packages" in flexcli.__file__ and "src/flexcli" not in flexcli.__file__, flexcli.__file__
assert supported_names() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"], supported_names()
assert load_recipe(builtin_recipes()["llama-2-7b"]).source == "meta-llama/Llama-2-7b-hf"
assert 'BASE_MODEL_TYPE = "qwen2"' in modeling_source("qwen2")
print("ok")
"""


def _sources(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def test_non_editable_install_runs_the_demo_commands(tmp_path, tokenizer_dir):
    before = {p for p in LITTER if (ROOT / p).exists()}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    src = _sources(tmp_path / "src")
    # the wheel is built here (this venv has setuptools and wheel), installed there like any wheel
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("flexcli-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    assert {p for p in LITTER if (ROOT / p).exists()} == before  # nothing built in the repository
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([str(py), "-c", CHECK], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    flex = str(venv / "bin" / "flex")
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str) -> str:
        p = subprocess.run([flex, "-q", *args], env=env, cwd=work, capture_output=True, text=True)
        assert p.returncode == 0, (args, p.stderr)
        return p.stdout

    assert run("--version").strip() == "flex 0.1.0"
    make_model(work / "like", tokenizer_dir)  # architecture and tokenizer for a fast pretrain
    run("pretrain", "-o", "base", "--like", "like", "--steps", "3", "--batch-size", "2", "--seq-len", "32")
    run("convert", "base", "--calib-samples", "2", "--seq-len", "32")  # -> ./base-elastic, recorded here
    prof = json.loads(
        run("profile", "--seq-len", "8", "--repeats", "3", "--warmup-s", "0", "--accept-noisy", "--json")
    )
    # the routers train against the table; a tiny model's measured table may be flat or inverted on a busy
    # machine, so its entries are replaced by known ones (same regime and choices): every run is the same
    table = load_table(work / "base-elastic", prof["regime"])
    M, H = table.mlp[0][0], table.heads[0][0]
    table.ms = [
        [[0.1 + m / M + 0.5 * h / H for h in hs] for m in ms] for ms, hs in zip(table.mlp, table.heads)
    ]
    table.scale = 1.0
    save_table(work / "base-elastic", table)
    assert table.smallest_ms() < table.full_ms()
    budget = f"{(table.smallest_ms() + table.full_ms()) / 2:.4f}ms"
    routed = json.loads(run("train-router", "--budgets", budget, "--steps", "4", "--dynamic-steps", "2",
                            "--sm-warmup", "8", "--seq-len", "16", "--json"))  # fmt: skip
    assert routed
    run("extract", "--uniform", "mlp=0.5,heads=0.5", "-o", "sub")
    assert (work / "sub" / "model.safetensors").is_file() and (work / "sub" / "flex_extract.json").is_file()
