"""bench/bench_scale.py (`make bench-scale`) end to end at its smoke-test size: every command runs in its
own process, stages and memory peaks are reported, extracted tensors are bit-exact prefix slices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_scale_tiny(tmp_path):
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--shapes", "tiny", "--profile-shape", "tiny",
         "--baseline", "none", "--work", str(tmp_path / "work"), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    res = json.loads((out / "scale.json").read_text())
    cmds = [r["command"] for r in res["runs"]]
    assert cmds == [
        "generate (random bf16 checkpoint)",
        "flex convert (prune-only, 4 x 128 tokens)",
        "flex extract --uniform mlp=0.5,heads=0.5",
        "flex profile, after (this commit)",
    ]
    for r in res["runs"]:
        assert r["seconds"] > 0 and 0 < r["peak_anon"] <= r["peak_rss"] <= r["ru_maxrss"] * 1.05
        assert r["stages"] and all(s["seconds"] >= 0 for s in r["stages"])
        assert Path(r["flexcli"]).parent.parent == ROOT or "site-packages" in r["flexcli"]
    convert = res["runs"][1]
    assert "calibration (importance, layer by layer)" in [s["stage"] for s in convert["stages"]]
    assert res["runs"][2]["tensors_bit_exact_vs_get_slice"] == 2 * 9  # layers 0 and 3, nine tensors each
    assert (out / "scale.md").read_text().startswith("# flexcli at the sizes users bring")
    assert not any((tmp_path / "work").glob("llama-*"))  # generated checkpoints are removed
