"""The drift-cancelling core of the profiler (latency.timing) on a fake clock whose speed changes
mid-run: time_fn re-measures a timing the change made noisy; time_paired's ratio is the true cost ratio
although the machine became three times slower between its pairs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flexcli.latency import timing
from flexcli.latency.timing import TimingPolicy, time_fn, time_paired


class Clock:
    """perf_counter() of a machine on which a call of cost c ms takes c x slowdown(call number) ms."""

    def __init__(self, slowdown):
        self.t, self.calls, self.slowdown = 0.0, 0, slowdown

    def perf_counter(self) -> float:
        return self.t

    def op(self, cost_ms: float):
        def call():
            self.calls += 1
            self.t += cost_ms / 1e3 * self.slowdown(self.calls)

        return call


@pytest.fixture
def clock(monkeypatch):
    def install(slowdown):
        c = Clock(slowdown)
        monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=c.perf_counter))
        return c

    return install


POLICY = TimingPolicy(repeats=5, warmup_s=0.0, min_warmup_calls=3, max_spread=0.15, min_sample_s=0.005)


def test_time_fn_measures_again_when_the_machine_changes_speed(clock):
    c = clock(lambda n: 1.0 if n < 10 else 3.0)  # 3 warm-up calls, then samples of 3 calls each
    t = time_fn(c.op(2.0), lambda: None, POLICY)
    assert t.attempts == 2  # the first attempt straddled the change: spread (6 - 2) / median > 15%
    assert t.ms == pytest.approx(6.0) and t.spread == pytest.approx(0.0)
    steady = time_fn(clock(lambda n: 1.0).op(2.0), lambda: None, POLICY)
    assert (steady.ms, steady.attempts) == (pytest.approx(2.0), 1)


@pytest.mark.parametrize("step", [9, 20, 33])
def test_time_paired_cancels_a_speed_change(clock, step):
    """fn costs 2 ms and the reference 5 ms; from call `step` on the machine is 3x slower. Unpaired
    timings would mix 2 and 6 ms; each pair sees one speed, so the ratio stays 0.4."""
    c = clock(lambda n: 1.0 if n < step else 3.0)
    p = time_paired(c.op(2.0), c.op(5.0), lambda: None, TimingPolicy(**{**POLICY.__dict__, "repeats": 7}))
    assert p.ms / p.ref_ms == pytest.approx(0.4)
    assert p.ref_ms in (pytest.approx(5.0), pytest.approx(15.0))
    c2 = clock(lambda n: 2.0)
    steady = time_paired(c2.op(2.0), c2.op(5.0), lambda: None, POLICY)
    assert steady.ms / steady.ref_ms == pytest.approx(0.4) and steady.spread == pytest.approx(0.0)


def test_time_paired_alternates_which_side_goes_first(clock):
    """A machine that slows down steadily favours whoever is timed first; alternating the order makes
    that bias cancel in the median of the ratios."""
    c = clock(lambda n: 1.0 + n / 100)  # 1% slower per call
    p = time_paired(c.op(2.0), c.op(2.0), lambda: None, TimingPolicy(**{**POLICY.__dict__, "repeats": 8}))
    assert p.ms / p.ref_ms == pytest.approx(1.0, abs=0.01)
