"""`make bench` on a tiny run (BENCH_SCALE 0.02): every stage runs for real on a tiny model, and the report
generator writes RESULTS.md, bench.json and plots whose verdicts follow from the numbers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "BENCH_SCALE": "0.02"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run_bench.py"),
            "--work",
            str(d / "work"),
            "--out",
            str(d / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# flexcli benchmark results" in proc.stdout  # the report is printed on stdout
    return d


def test_report_files_and_header(tiny_run: Path):
    out = tiny_run / "out"
    md = (out / "RESULTS.md").read_text()
    doc = json.loads((out / "results" / "bench.json").read_text())
    h = doc["header"]
    assert h["seed"] == 0 and h["scale"] == 0.02 and h["versions"]["torch"] and h["machine"]["cores"]
    assert "seed 0" in md and "BENCH_SCALE 0.02" in md and h["versions"]["transformers"] in md
    for section in (
        "## Summary",
        "## 1. Quality",
        "## 2. Latency",
        "## 3. Routers",
        "## 4. Systems",
        "## 5. Claims",
    ):
        assert section in md
    assert len(doc["claims"]) == 9
    assert [c["n"] for c in doc["claims"]] == [str(i) for i in range(1, 10)]
    verdicts = {"holds", "does not hold at this scale", "not measurable here"}
    assert all(c["verdict"] in verdicts for c in doc["claims"])
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "**" in ln]
    assert len(rows) == 9  # one claims-table row each
    for png in doc["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {Path(p).name for p in doc["plots"]} == {
        "quality.png",
        "pareto.png",
        "lut_validation.png",
        "extract_budgets.png",
    }


def test_every_baseline_and_stage_is_real(tiny_run: Path):
    doc = json.loads((tiny_run / "out" / "results" / "bench.json").read_text())
    methods = {(q["method"], q["width"]) for q in doc["quality"]["rows"]}
    for m in ("flextron", "prune-importance", "random-trained", "prune-random"):
        assert {(m, w) for w in (1.0, 0.75, 0.5, 0.25)} <= methods
    assert {("scratch", w) for w in (0.75, 0.5, 0.25)} <= methods
    assert all(q["stdlib"] > 1 and q["pydoc"] > 1 for q in doc["quality"]["rows"])
    work = tiny_run / "work"
    for w in (75, 50, 25):  # from scratch = the sub-model's own architecture, freshly trained
        a = json.loads((work / f"sub-{w}" / "config.json").read_text())
        b = json.loads((work / f"scratch-{w}" / "config.json").read_text())
        assert (a["intermediate_size"], a["num_attention_heads"]) == (
            b["intermediate_size"],
            b["num_attention_heads"],
        )
    assert doc["routers"]["no_surrogate"]["static"]["surrogate"] is False
    assert doc["routers"]["joint"]["joint"]["steps"] > 0
    kinds = {p["kind"] for p in doc["pareto"]["points"]}
    assert kinds == {"full", "static router", "uniform", "input-adaptive"}
    assert all(p["measured_ms"] > 0 for p in doc["pareto"]["points"])
    assert doc["profile"]["validation"]["n"] == len(doc["profile"]["validation_configs"]) == 4
    assert all(m["measured_latency_ms"] and m["identity"]["params_match"] for m in doc["extract"]["models"])
    assert doc["systems"]["extraction"]["checkpoint"]["bit_exact"] is True
    assert set(doc["systems"]["training_throughput"]["ratios"]) == {
        "elastic runtime at full width / stock",
        "elastic CE / plain CE",
        "elastic KD / plain KD",
    }


def test_verdicts_follow_the_numbers(tiny_run: Path):
    import report

    doc = json.loads((tiny_run / "out" / "results" / "bench.json").read_text())
    raw = {k: v for k, v in doc.items() if k not in ("derived", "claims", "plots")}

    def verdict(r: dict, n: str) -> str:
        return next(c["verdict"] for c in report.claims(r, report.derived(r)) if c["n"] == n)

    r = copy.deepcopy(raw)
    r["identity"]["permutation"]["prune-importance"]["max_abs_logit_diff"] = 1e-3
    assert verdict(r, "1") == report.FAILS
    r["identity"]["permutation"]["prune-importance"]["max_abs_logit_diff"] = 1e-7
    r["identity"]["permutation"]["prune-random"]["max_abs_logit_diff"] = 1e-7
    assert verdict(r, "1") == report.HOLDS
    r = copy.deepcopy(raw)  # importance beats random at every width <=> claim 3 holds
    for q in r["quality"]["rows"]:
        if q["method"] == "prune-random":
            q["stdlib"] = 1e6
    assert verdict(r, "3") == report.HOLDS
    for q in r["quality"]["rows"]:
        if q["method"] == "prune-random" and q["width"] == 0.5:
            q["stdlib"] = 1.0
    assert verdict(r, "3") == report.FAILS
    r = copy.deepcopy(raw)  # one static configuration 10% over its budget breaks claim 5
    b = report.static_budgets(r)[0]
    b["lut_latency_ms"] = b["budget_ms"] * 1.10
    assert verdict(r, "5") == report.FAILS


def test_report_only_rerenders_the_same(tiny_run: Path, tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run_bench.py"),
            "--work",
            str(tiny_run / "work"),
            "--out",
            str(tmp_path),
            "--report-only",
            "--scale",
            "0.02",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = (tiny_run / "out" / "RESULTS.md").read_text().split("\n", 3)[3]  # after the dated header line
    b = (tmp_path / "RESULTS.md").read_text().split("\n", 3)[3]
    assert a == b
