"""`flex profile`: table schema, additivity of the latency model, validation arithmetic, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model
from typer.testing import CliRunner

from flexcli.cli import app
from flexcli.commands.convert import ConvertOptions, convert
from flexcli.commands.profile import ProfileOptions, profile
from flexcli.errors import InfeasibleError, UsageError
from flexcli.io import layout
from flexcli.io.layout import LATENCY_FORMAT
from flexcli.latency.profile import at_table_speed, validation_stats
from flexcli.latency.table import LatencyTable, Regime, load_table

runner = CliRunner()
# schema tests: no re-measurement, and a tiny model's noisy table is written anyway (refusal: test_noise.py)
FAST = dict(repeats=3, rounds=2, warmup_s=0.0, max_spread=100.0, accept_noisy=True)


@pytest.fixture(scope="module")
def elastic(tmp_path_factory, tokenizer_dir, calib_file) -> Path:
    d = tmp_path_factory.mktemp("prof")
    src = make_model(d / "src", tokenizer_dir, "llama", 4, 2, hidden=64, layers=2, inter=128)
    opts = ConvertOptions(calib=str(calib_file), calib_samples=2, seq_len=32, device="cpu", output=d / "el")
    return Path(convert(str(src), opts).output)


def test_profile_writes_versioned_table_and_validation(elastic):
    o = ProfileOptions(seq_len=16, validate=4, correct=2, min_warmup_calls=2, **FAST)
    res = profile(elastic, o)
    data = json.loads((elastic / "flex_latency.json").read_text())
    assert data["format"] == LATENCY_FORMAT
    entry = data["regimes"][res.regime]
    assert entry["regime"]["phase"] == "prefill" and entry["regime"]["seq_len"] == 16
    for k in ("torch", "repeats", "warmup_s", "max_spread", "threads", "created"):
        assert k in entry["header"]
    t = load_table(elastic, res.regime)
    assert len(t.ms) == 2 and len(t.ms[0]) == len(t.mlp[0]) and len(t.ms[0][0]) == len(t.heads[0])
    v = t.validation
    assert v["n"] == 4 and v["regime"] == res.regime
    pred = [c["predicted_ms"] for c in v["configs"]]
    meas = [c["measured_ms"] for c in v["configs"]]
    refs = [c["full_model_ms_before"] for c in v["configs"]]
    assert {k: v[k] for k in validation_stats(pred, meas)} == validation_stats(pred, meas)
    assert v["reference_drift"] == pytest.approx(max(refs) / min(refs) - 1)
    assert v["drift_normalized"]["n"] == 4
    t_full = [(m[0], h[0]) for m, h in zip(t.mlp, t.heads)]
    assert t_full == [(128, 4)] * 2
    # the correction is the least-squares scale of the predictions onto the timings at table speed:
    # any other scale fits them worse
    corr = t.header["correction"]["configs"]
    assert len(corr) == 2
    cfgs = [[(x["mlp"], x["heads"]) for x in c["config"]] for c in corr]
    cp = [t.predict(c, corrected=False) for c in cfgs]
    cm = at_table_speed(
        t,
        layout.read_spec(elastic),
        [c["measured_ms"] for c in corr],
        [c["full_model_ms_before"] for c in corr],
    )
    sse = lambda s: sum((s * p - m) ** 2 for p, m in zip(cp, cm))  # noqa: E731
    assert sse(t.scale) < min(sse(t.scale * 1.01), sse(t.scale * 0.99))
    for c in v["configs"]:  # every stored prediction is the table's additive model
        cfg = [(x["mlp"], x["heads"]) for x in c["config"]]
        assert c["predicted_ms"] == pytest.approx(t.predict(cfg))
    # a second regime coexists with the first
    res2 = profile(elastic, ProfileOptions(phase="decode", seq_len=8, kv_len=12, min_warmup_calls=2, **FAST))
    assert res2.regime != res.regime and "decode|kv12" in res2.regime
    assert set(json.loads((elastic / "flex_latency.json").read_text())["regimes"]) == {
        res.regime,
        res2.regime,
    }


def _table() -> LatencyTable:
    rng = random.Random(0)
    mlp, heads = [96, 64, 32], [4, 2]
    ms = [[[rng.uniform(0.1, 1.0) for _ in heads] for _ in mlp] for _ in range(3)]
    return LatencyTable(
        Regime("cpu", "x", "float32", 1, 16, "prefill", 0), {}, 0.5, [mlp] * 3, [heads] * 3, ms, scale=1.1
    )


def test_latency_model_is_additive_and_expectation_matches():
    t = _table()
    cfg = [(96, 4), (32, 2), (64, 4)]
    want = (0.5 + t.ms[0][0][0] + t.ms[1][2][1] + t.ms[2][1][0]) * 1.1
    assert t.predict(cfg) == pytest.approx(want)
    one_hot = lambda n, i: torch.nn.functional.one_hot(torch.tensor(i), n).double()  # noqa: E731
    e = t.expected(
        [one_hot(3, 0), one_hot(3, 2), one_hot(3, 1)], [one_hot(2, 0), one_hot(2, 1), one_hot(2, 0)]
    )
    assert e.item() == pytest.approx(want)
    logits = torch.zeros(3, 3, requires_grad=True)
    hp = [torch.full((2,), 0.5, dtype=torch.float32) for _ in range(3)]
    t.expected([torch.softmax(logits[i], -1) for i in range(3)], hp).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert t.smallest_ms() < t.full_ms()
    with pytest.raises(InfeasibleError, match="smallest"):
        t.check_budget(t.smallest_ms() * 0.9)


def test_timings_rescaled_to_table_speed():
    """A timing taken while the full model ran at twice the table's full-model time was taken on a machine
    twice as slow: at table speed it is half; at the table's own speed it is unchanged."""
    t = _table()
    full = t.predict([(96, 4)] * 3, corrected=False)  # 0.5 + three layers' (96, 4) entries
    assert full == pytest.approx(0.5 + sum(t.ms[i][0][0] for i in range(3)))
    spec = SimpleNamespace(full=lambda: [(96, 4)] * 3)  # the table's full model
    got = at_table_speed(t, spec, [3.0, 1.5, 0.6], [2 * full, full, 0.5 * full])
    assert got == pytest.approx([1.5, 1.5, 1.2])


def test_validation_arithmetic():
    v = validation_stats([1.0, 1.08, 0.8, 1.2], [1.0, 1.0, 1.0, 1.0])
    assert v["n"] == 4 and v["within_10pct"] == 0.5
    assert v["mean_signed_err"] == pytest.approx((0 + 0.08 - 0.2 + 0.2) / 4)
    assert v["p90_abs_err"] == pytest.approx(0.2) and v["max_abs_err"] == pytest.approx(0.2)


def test_profile_cli_json(elastic, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "profile",
            str(elastic),
            "--seq-len",
            "4",
            "--repeats",
            "3",
            "--warmup-s",
            "0",
            "--validate",
            "2",
            "--accept-noisy",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc["validation"]) >= {"n", "within_10pct", "p90_abs_err", "mean_signed_err", "regime"}
    assert doc["validation"]["regime"] == doc["regime"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--phase", "sideways"], "--phase"),
        (["--repeats", "1"], "--repeats"),
        (["--batch", "0"], "positive"),
        (["--cuda-graphs"], "--cuda-graphs"),
    ],
)
def test_bad_profile_input(elastic, monkeypatch, tmp_path, args, needle):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["profile", str(elastic), *args])
    assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_profile_needs_an_elastic_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    src = make_model(tmp_path / "plain", tokenizer_dir)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["profile", str(src)])
    assert res.exit_code == 2 and "flex convert" in res.stderr
    none = runner.invoke(app, ["profile"])  # nothing recorded in ./flex-project.json
    assert none.exit_code == 2 and "flex-project.json" in none.stderr


def test_unknown_regime(elastic):
    with pytest.raises(UsageError, match="no latency table for regime"):
        load_table(elastic, "cuda:H200|bfloat16|b1|s1|decode|kv4096|graph")
