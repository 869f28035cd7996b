"""The profiler's defences against a noisy machine, on a synthetic runtime whose true costs are known:
interleaved rounds cancel drift, a monotone table, the mixed-width correction on by default, and a table
that fails its checks is refused (exit 1, nothing written) unless --accept-noisy."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager, nullcontext

import pytest
from conftest import small_elastic
from typer.testing import CliRunner

from flexcli.cli import app
from flexcli.commands.profile import NoisyTable, ProfileOptions, profile
from flexcli.io import layout
from flexcli.latency.profile import Session, monotone, monotone_violations, random_configs
from flexcli.latency.table import Regime, load_table
from flexcli.latency.timing import Paired, Timing
from flexcli.runtimes.pytorch import TorchRuntime

FIXED = 1.0


class Synthetic:
    """A runtime whose call costs FIXED + sum over layers of (0.2 + mlp/M + 0.5*heads/H) ms, times the
    machine's speed at that moment, times (1 + mixed) for per-layer-mixed configurations, with noise.
    A paired timing's spread (its pairs' disagreement) is `pair_spread`, default twice the noise."""

    name = "torch"

    def __init__(self, spec, speed=lambda t: 1.0, noise=0.0, mixed=0.0, flat=False, pair_spread=None):
        self.spec, self.speed, self.noise, self.mixed, self.flat = spec, speed, noise, mixed, flat
        self.pair_spread = 2 * noise if pair_spread is None else pair_spread
        self.regime = Regime("cpu", "synthetic", "float32", 1, 16, "prefill", 0)
        self.header = {"threads": 1}
        self.sync = lambda: None
        self.t = 0
        self.rng = random.Random(0)
        self.M, self.H = spec.layers[0].mlp[0], spec.layers[0].heads[0]

    def cost(self, cfg) -> float:
        if self.flat:
            return FIXED + len(cfg)
        layers = sum(0.2 + m / self.M + 0.5 * h / self.H for m, h in cfg)
        return (FIXED + layers) * (1 + self.mixed * (len(set(cfg)) > 1))

    @contextmanager
    def open(self, cfg):
        yield tuple(cfg)

    def fixed_items(self):
        return {"fixed": lambda: nullcontext("fixed")}

    def fixed_ms(self, med):
        return med["fixed"]

    def close(self):
        pass

    def forget(self, cfg):
        pass

    def timing(self, fn) -> Timing:
        self.t += 1
        base = FIXED if fn == "fixed" else self.cost(fn)
        return Timing(base * self.speed(self.t) * (1 + self.noise * self.rng.uniform(-1, 1)), 0.0, 1)

    def paired(self, fn) -> Paired:
        """fn and the full model at the same moment (each with its own noise)."""
        x = self.timing(fn).ms
        self.t -= 1
        return Paired(x, self.timing(tuple(self.spec.full())).ms, self.pair_spread)


@pytest.fixture(scope="module")
def elastic(tmp_path_factory, tokenizer_dir, calib_file):
    return small_elastic(tmp_path_factory.mktemp("noise"), tokenizer_dir, calib_file, "llama", 8, 8)[0]


@pytest.fixture
def runtime(monkeypatch, elastic):
    """Install a Synthetic runtime (returned by the fixture as a factory) behind open_session."""
    holder = {}

    def install(**kw):
        holder["rt"] = Synthetic(layout.read_spec(elastic), **kw)
        return holder["rt"]

    monkeypatch.setattr(TorchRuntime, "backend", lambda self, path, o: holder["rt"])
    monkeypatch.setattr(Session, "timing", lambda self, fn: self.backend.timing(fn))
    monkeypatch.setattr(Session, "paired", lambda self, fn: self.backend.paired(fn))
    (elastic / layout.LATENCY).unlink(missing_ok=True)
    return install


def _ratio_spread(table, rt, cfgs) -> float:
    r = [table.predict(c) / rt.cost(c) for c in cfgs]
    return max(r) / min(r) - 1


def test_interleaved_rounds_cancel_a_drifting_machine(runtime, elastic):
    rt = runtime(speed=lambda t: 1 + t / 50)  # the machine slows down by its initial speed every 50 timings
    res = profile(elastic, ProfileOptions(validate=20))
    assert res.problems == [] and res.reference_drift > 0.5  # it drifted a lot and the table still passed
    table = load_table(elastic)
    cfgs = random_configs(rt.spec, 30, 7) + [
        rt.spec.full(),
        [(m[-1], h[-1]) for m, h in zip(table.mlp, table.heads)],
    ]
    assert _ratio_spread(table, rt, cfgs) < 0.02  # the shape of the cost model, whatever the drift
    assert res.validation.drift_normalized.within_10pct == 1.0


def test_mixed_widths_are_corrected_by_default(runtime, elastic):
    """Per-layer entries come from uniform models; mixed models cost 15% more here (real CPUs: about 10%).
    The default correction absorbs it; without it the table fails its validation and is refused."""
    runtime(mixed=0.15)
    res = profile(elastic, ProfileOptions(validate=20))
    assert res.problems == [] and res.scale == pytest.approx(1.15, rel=0.03)
    assert res.validation.drift_normalized.within_10pct >= 0.9
    runtime(mixed=0.15)
    with pytest.raises(NoisyTable, match=r"validation: \d+% of 20 configurations within ±10%"):
        profile(elastic, ProfileOptions(validate=20, correct=0))


def test_a_noisy_machine_is_refused_and_nothing_is_written(runtime, elastic):
    """Rounds that disagree (each timing's pairs agreeing well enough) are refused after all rounds."""
    rt = runtime(noise=0.6, pair_spread=0.1)
    with pytest.raises(NoisyTable) as e:
        profile(elastic, ProfileOptions())
    msg = str(e.value)
    assert "between rounds" in msg and "--repeats" in msg and "--accept-noisy" in msg and "\n" not in msg
    assert rt.t > 3 * 29  # every round ran (28 entries and the fixed part, 3 rounds), then correction
    assert not (elastic / layout.LATENCY).exists()
    runtime(noise=0.6)
    res = profile(elastic, ProfileOptions(accept_noisy=True))
    assert res.problems and load_table(elastic).header["problems"] == res.problems


def test_a_hopeless_machine_is_refused_after_the_first_round(runtime, elastic):
    """Paired timings already far noisier than the limit in round 1: refused there, with the same kind of
    one-line message, before the remaining rounds, the correction and the validation."""
    rt = runtime(noise=0.6)  # pairs disagree by 120%: 12x the 10% limit
    with pytest.raises(NoisyTable) as e:
        profile(elastic, ProfileOptions(validate=20))
    msg = str(e.value)
    assert msg.startswith("latency table not written: entries varied by a median 120% within the first")
    assert "stopped after round 1 of 3" in msg and "--accept-noisy" in msg and "\n" not in msg
    assert rt.t == 29  # one timing per item of round 1, nothing after
    assert not (elastic / layout.LATENCY).exists()
    runtime(noise=0.0, pair_spread=0.99)  # just inside 10x the limit: all rounds run and the table passes
    assert profile(elastic, ProfileOptions()).problems == []
    assert load_table(elastic).header["checks"]["first_round_spread"] == pytest.approx(0.99)


def test_width_that_buys_nothing_is_refused(runtime, elastic):
    runtime(flat=True)  # every configuration costs the same: no budget can be met by shrinking
    with pytest.raises(NoisyTable, match="no faster than the full model"):
        profile(elastic, ProfileOptions())


def test_cli_exit_1_with_one_line(runtime, elastic):
    runtime(noise=0.6)
    r = CliRunner().invoke(app, ["profile", str(elastic), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["exit_code"] == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: latency table not written") and len(lines[-1]) < 600


def test_monotone_projection_and_violations():
    raw = [[10.0, 8.0, 5.0], [9.0, 8.5, 4.0], [6.0, 3.0, 3.5]]  # rows: mlp wide -> narrow; cols: heads
    m = monotone(raw)
    for i in range(3):
        for j in range(3):
            assert m[i][j] >= raw[i][j]
            assert i == 2 or m[i][j] >= m[i + 1][j]
            assert j == 2 or m[i][j] >= m[i][j + 1]
    assert m[0] == [10.0, 8.5, 5.0] and m[2] == [6.0, 3.5, 3.5]
    quiet = [[0.0] * 3 for _ in range(3)]
    assert monotone_violations(raw, quiet) == 2  # 8.5 > 8.0 and 3.5 > 3.0 (beyond 2%)
    assert monotone_violations(raw, [[0.2] * 3 for _ in range(3)]) == 0  # within a 20% noise
