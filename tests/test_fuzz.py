"""Fuzzed inputs (hypothesis): budget strings, recipe files, damaged safetensors. Always a clean
UsageError (exit 2 at the CLI) or a valid result; never another exception, a hang or partial output."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import flex_cmd, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexcli.commands.validate import validate
from flexcli.errors import UsageError
from flexcli.io.safetensors import read_safetensors_header
from flexcli.io.source import SourceModel
from flexcli.plan.budget import parse_budgets
from flexcli.recipe import load_recipe

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.text(max_size=30))
def test_budget_strings(text):
    try:
        for b in parse_budgets(text):
            assert b.value > 0 and b.kind in ("latency", "fraction", "params")
    except UsageError as e:
        assert "\n" not in str(e)


@FAST
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "elastic",
                        "train",
                        "calibration",
                        "mlp_ratios",
                        "steps",
                        "gqa",
                        "p_full",
                        "stages",
                        "seed",
                        "data",
                        "bogus",
                        "samples",
                        "distill",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_recipe_documents(tmp_path_factory, doc):
    import yaml

    p = tmp_path_factory.mktemp("r") / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(p)
    except UsageError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model(
        tmp_path_factory.mktemp("fz") / "m", tokenizer_dir, "llama", 4, 2, hidden=32, layers=1, inter=64
    )


@FAST
@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_damaged_safetensors(tiny, tmp_path_factory, flips, cut):
    d = tmp_path_factory.mktemp("dmg")
    for f in tiny.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    data = bytearray((d / "model.safetensors").read_bytes())
    header_len = int.from_bytes(data[:8], "little") + 8
    for pos, val in flips:  # mostly inside the header, where damage changes meaning
        data[pos % min(len(data), header_len + 64)] = val
    if cut is not None:
        data = data[: cut % len(data)]
    (d / "model.safetensors").write_bytes(bytes(data))
    refused = None
    try:
        src = SourceModel.open(d)
        read_safetensors_header(src.weight_files[0])
    except UsageError as e:
        assert "\n" not in str(e)
        refused = str(e)
    r = validate(d, check_data=False)  # never raises for damaged weights; one inspector behind both
    if refused is not None:  # what convert refuses, validate reports: the same problem, among all it found
        assert not r.valid, refused
        assert any(p.message in refused for p in r.problems), (refused, [p.message for p in r.problems])


def test_fuzzed_checkpoint_through_the_cli(tiny, tmp_path, calib_file):
    rng = random.Random(0)
    for i in range(6):
        d = tmp_path / f"m{i}"
        d.mkdir()
        for f in tiny.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        data = bytearray((d / "model.safetensors").read_bytes())
        for _ in range(3):
            data[rng.randrange(8, 200)] = rng.randrange(256)
        (d / "model.safetensors").write_bytes(bytes(data))
        p = subprocess.run(
            [
                *flex_cmd(),
                "convert",
                str(d),
                "-o",
                str(tmp_path / f"o{i}"),
                "--calib",
                str(calib_file),
                "--calib-samples",
                "2",
                "--seq-len",
                "16",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode in (0, 2), p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()[-1:]) <= 1
        if p.returncode == 2:
            assert not (tmp_path / f"o{i}").exists()
        assert not list(tmp_path.glob(f".o{i}.flex-tmp-*"))


def test_disk_full_leaves_nothing(tiny, tmp_path, calib_file):
    """A write that fails for lack of space (RLIMIT_FSIZE below the output's size): clean error, no output."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out"
    p = subprocess.run(
        [
            *flex_cmd(),
            "convert",
            str(tiny),
            "-o",
            str(out),
            "--calib",
            str(calib_file),
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=120,
    )
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write") and "nothing was written" in lines[-1]
    assert "Traceback" not in p.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.flex-tmp-*"))
    assert json.loads((tiny / "config.json").read_text())  # the source is untouched
