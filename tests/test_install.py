"""A normal (non-editable) install carries the package data: descriptors, recipes and kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import flexcli, flexcli.kernels
from flexcli.arch import supported_names
from flexcli.recipe import builtin_recipes, load_recipe
assert "site-packages" not in flexcli.__file__ and "src/flexcli" not in flexcli.__file__, flexcli.__file__
assert supported_names() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"], supported_names()
assert load_recipe(builtin_recipes()["llama-2-7b"]).source == "meta-llama/Llama-2-7b-hf"
print("ok")
"""


def test_non_editable_install_has_package_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert (target / "bin" / "flex").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    ver = subprocess.run([sys.executable, "-m", "flexcli", "--version"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert ver.stdout.strip() == "flex 0.1.0"
