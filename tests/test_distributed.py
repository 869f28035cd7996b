"""torchrun + FSDP2 on 2 CPU processes (gloo): same loss trajectory and weights as one process with the
same global batch, and a DCP resume after a hard crash reaches the uninterrupted result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

pytestmark = pytest.mark.dist

RECIPE = """stages: [permute, train]
train: {steps: 8, batch_size: 4, seq_len: 32, precision: fp32, lr: 3.0e-3, warmup: 2, checkpoint_every: 4,
        val_samples: 4, val_random_configs: 1, p_full: 0.33, distill: 0.3}
"""


def _convert(src, out, recipe, calib, nproc=1, extra=(), env=None):
    args = [
        "convert",
        str(src),
        "-o",
        str(out),
        "--recipe",
        str(recipe),
        "--calib",
        str(calib),
        "--calib-samples",
        "4",
        "--seq-len",
        "32",
        "--json",
        *extra,
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "flexcli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "flexcli",
            *args,
        ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture
def setup(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2, tied=True, hidden=64, layers=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return src, recipe, calib_file


def test_two_processes_match_one_process(tmp_path, setup):
    src, recipe, calib = setup
    one = _convert(src, tmp_path / "one", recipe, calib)
    two = _convert(src, tmp_path / "two", recipe, calib, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (
        json.loads(one.stdout)["training"],
        json.loads(two.stdout)["training"],
    )  # rank 0 prints one document
    assert b["world_size"] == 2 and a["world_size"] == 1
    # tolerance: per-step loss within 1e-4 relative (reduction order differs between 1 and 2 processes)
    for la, lb in zip(a["loss_curve"], b["loss_curve"], strict=True):
        assert abs(la - lb) <= 1e-4 * abs(la)
    # Weights: AdamW's update g / sqrt(v) amplifies reduction-order noise in the few elements whose gradient
    # is near zero (measured on an Intel Xeon: 1 of 6144 elements off by 1.4e-5, all others within 3e-6).
    # So: every element within 1e-4 (lr is 3e-3 per step), and at most 0.1% of any tensor beyond 1e-5.
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        d = (wa[k] - wb[k]).abs()
        assert d.max() <= 1e-4 and (d > 1e-5).float().mean() <= 1e-3, (k, d.max().item())


def test_dcp_resume_after_crash(tmp_path, setup):
    src, recipe, calib = setup
    straight = _convert(src, tmp_path / "a", recipe, calib, nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = _convert(src, tmp_path / "b", recipe, calib, nproc=2, env={"FLEX_FAULT_AFTER_CHECKPOINT": "4"})
    assert crashed.returncode != 0
    assert not (tmp_path / "b").exists()
    assert (tmp_path / ".b.flex-train" / "step-0000004" / "dcp").is_dir()
    resumed = _convert(src, tmp_path / "b", recipe, calib, nproc=2, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["training"]["resumed_from"] == 4
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
