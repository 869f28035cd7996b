"""kill -9 at random moments of convert (calibration and training), train-router and extract (20 kill
points): never an output that looks complete but is not, the previous output intact, temporary
siblings cleaned on the next run, and a rerun / --resume ends with the uninterrupted result."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import flex_cmd, make_model
from safetensors.torch import load_file

from flexcli.arch.spec import ElasticSpec
from flexcli.commands.validate import validate
from flexcli.latency.table import LatencyTable, Regime, save_table

pytestmark = pytest.mark.slow

RECIPE = (
    "stages: [permute, train]\ntrain: {steps: 40, batch_size: 4, seq_len: 32, precision: fp32, checkpoint_every: 5, "
    "warmup: 2, val_samples: 4, val_random_configs: 1}\n"
)


def _flex(*args, cwd):
    return subprocess.Popen(
        [*flex_cmd(), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FLEX_DEBUG": "0"},
    )


def _kill_at(args, delay, cwd) -> int:
    p = _flex(*args, cwd=cwd)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    return p.wait()


def _complete_or_absent(out: Path) -> None:
    if out.exists():
        assert validate(out).valid, f"{out} looks complete but is not"


def test_kill_convert_extract_router(tmp_path, tokenizer_dir, calib_file):
    rng = random.Random(0)
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2, hidden=64, layers=2, inter=128)
    (tmp_path / "r.yaml").write_text(RECIPE)
    conv = [
        "convert",
        str(src),
        "--recipe",
        "r.yaml",
        "--calib",
        str(calib_file),
        "--calib-samples",
        "4",
        "--seq-len",
        "32",
    ]
    ref = tmp_path / "ref"
    assert _flex(*conv, "-o", str(ref), cwd=tmp_path).wait() == 0
    t0 = time.time()
    assert _flex(*conv, "-o", str(tmp_path / "timing"), cwd=tmp_path).wait() == 0
    span = time.time() - t0
    # 8 kill points in convert (start-up, calibration, training, writing); each followed by --resume (when
    # a checkpoint exists) that is itself killed again, until the last run completes
    out, work = tmp_path / "el", tmp_path / ".el.flex-train"
    for _ in range(8):
        extra = ["--resume"] if any(work.glob("step-*")) else ["--force"]
        _kill_at([*conv, "-o", str(out), *extra], rng.uniform(0.3, span), tmp_path)
        _complete_or_absent(out)
        if out.exists():  # finished before the kill: start the next kill point from scratch
            shutil.rmtree(out)
    extra = ["--resume"] if any(work.glob("step-*")) else ["--force"]
    assert _flex(*conv, "-o", str(out), *extra, cwd=tmp_path).wait() == 0
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not list(tmp_path.glob(".el.flex-tmp-*")) and not work.exists()

    # a latency table for the extract / router steps
    spec = ElasticSpec.from_dict(json.loads((ref / "flex_elastic.json").read_text())["spec"])
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    save_table(
        ref,
        LatencyTable(
            Regime("cpu", "synthetic", "float32", 1, 16, "prefill", 0),
            {},
            0.2,
            [mlp] * 2,
            [heads] * 2,
            [[[0.01 * m / 16 + 0.1 * h for h in heads] for m in mlp]] * 2,
        ),
    )
    # 6 kill points in extract, with a previous output in place that must survive intact
    sub = tmp_path / "sub"
    ext = ["extract", str(ref), "--budget", "70%", "-o", str(sub), "--force"]
    assert _flex(*ext, cwd=tmp_path).wait() == 0
    before = (sub / "model.safetensors").read_bytes()
    t0 = time.time()
    assert _flex(*ext, cwd=tmp_path).wait() == 0
    span = time.time() - t0
    for _ in range(6):
        _kill_at(ext, rng.uniform(0.2, span), tmp_path)
        assert sub.exists() and validate(sub).valid
        assert (sub / "model.safetensors").read_bytes() == before
    assert _flex(*ext, cwd=tmp_path).wait() == 0
    assert not list(tmp_path.glob(".sub.flex-tmp-*"))
    assert (sub / "model.safetensors").read_bytes() == before

    # 6 kill points in train-router: the elastic checkpoint stays whole throughout
    tr = [
        "train-router",
        str(ref),
        "--budgets",
        "60%,80%",
        "--steps",
        "30",
        "--dynamic-steps",
        "6",
        "--sm-warmup",
        "16",
        "--seq-len",
        "32",
        "--data",
        str(calib_file),
    ]
    t0 = time.time()
    assert _flex(*tr, cwd=tmp_path).wait() == 0
    span = time.time() - t0
    routers = (ref / "flex_routers.safetensors").read_bytes()
    for _ in range(6):
        _kill_at(tr, rng.uniform(0.2, span), tmp_path)
        assert validate(ref).valid
        assert (ref / "flex_routers.safetensors").read_bytes() == routers  # the old routers, whole
    assert _flex(*tr, cwd=tmp_path).wait() == 0
    assert validate(ref).valid and not list(tmp_path.glob(".ref.flex-tmp-*"))
    assert (ref / "flex_routers.safetensors").read_bytes() == routers  # a rerun gives the same routers
