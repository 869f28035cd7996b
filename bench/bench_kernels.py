"""Benchmark: Triton subset GEMMs vs cuBLAS, side by side in one run (issue 7; performance.md K1-K4).

GPU only: on a machine without CUDA it says so and exits 0. Times are medians of triton.testing.do_bench
(L2 flushed between runs, >= 5 repetitions); decode is timed under CUDA graphs. Writes
docs/results/kernels_<device>.{json,md}.
  K1 prefill (M >= 2048) sliced MLP (Triton, one compile for all widths) <= 1.10 f of cuBLAS dense, f >= 0.25
  K2 own GEMM >= 0.80x cuBLAS throughput on dense Llama shapes at M >= 2048
  K3 decode (M = 1) under CUDA graphs ratio(f) <= f + 0.10 on 70B-shaped layers
  K4 ragged per-token widths (grouped launch and bucketed) <= 1.15x of ideal = sum rows * width / dense
"""

# ruff: noqa: B023  (every lambda below is timed immediately, inside its own loop iteration)
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if not torch.cuda.is_available():
        print(
            "bench-kernels: no CUDA device here; the kernels are tested on CPU by `make test` "
            "(TRITON_INTERPRET=1); run this on a GPU for speed numbers."
        )
        return
    import triton
    from flexcli.kernels import reference
    from flexcli.kernels import triton_kernels as tk
    from triton.testing import do_bench

    dev = torch.device("cuda")
    dt = torch.bfloat16
    name = torch.cuda.get_device_name(dev)
    bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    res = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "prefill": [],
        "gemm": [],
        "decode": [],
        "ragged": [],
    }

    def mlp_cublas(x, wg, wu, wd, m):
        return torch.nn.functional.linear(torch.nn.functional.silu(x @ wg[:m].T) * (x @ wu[:m].T), wd[:, :m])

    def mlp_triton(x, wg, wu, wd, m):
        return tk.prefix_linear(tk.swiglu_prefix(x, wg, wu, None, None, m), wd, None, wd.shape[0], m)

    for shape, (h, f) in {"7b": (4096, 11008), "70b": (8192, 28672)}.items():
        wg, wu = (
            torch.randn(f, h, device=dev, dtype=dt) * 0.02,
            torch.randn(f, h, device=dev, dtype=dt) * 0.02,
        )
        wd = torch.randn(h, f, device=dev, dtype=dt) * 0.02
        x = torch.randn(2048, h, device=dev, dtype=dt)
        dense = bench(lambda: mlp_cublas(x, wg, wu, wd, f))
        for frac in (1.0, 0.75, 0.5, 0.25, 0.125):
            m = int(f * frac) // 64 * 64
            t_tr = bench(lambda: mlp_triton(x, wg, wu, wd, m))
            t_cu = bench(lambda: mlp_cublas(x, wg, wu, wd, m))
            res["prefill"].append(
                {
                    "shape": shape,
                    "M": 2048,
                    "f": frac,
                    "triton_ratio": t_tr / dense,
                    "cublas_view_ratio": t_cu / dense,
                    "target": 1.10 * frac if frac >= 0.25 else 1.25 * frac,
                }
            )
        # decode under CUDA graphs (M = 1)
        x1 = torch.randn(1, h, device=dev, dtype=dt)
        times = {}
        for frac in (1.0, 0.75, 0.5, 0.25, 0.125):
            m = int(f * frac) // 64 * 64
            for impl, fn in (("triton", mlp_triton), ("cublas", mlp_cublas)):
                fn(x1, wg, wu, wd, m)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(x1, wg, wu, wd, m)
                times[(impl, frac)] = bench(g.replay)
        for frac in (1.0, 0.75, 0.5, 0.25, 0.125):
            res["decode"].append(
                {
                    "shape": shape,
                    "f": frac,
                    "triton_ratio": times[("triton", frac)] / times[("cublas", 1.0)],
                    "cublas_ratio": times[("cublas", frac)] / times[("cublas", 1.0)],
                    "target": frac + 0.10,
                }
            )
    for M, N, K in ((8192, 8192, 8192), (4096, 11008, 4096), (4096, 4096, 11008), (2048, 5504, 4096)):
        a, w = torch.randn(M, K, device=dev, dtype=dt), torch.randn(N, K, device=dev, dtype=dt)
        t_cu = bench(lambda: a @ w.T)
        t_tr = bench(lambda: tk.prefix_linear(a, w, None, N, K))
        res["gemm"].append({"MNK": [M, N, K], "triton_over_cublas_throughput": t_cu / t_tr, "target": 0.80})
    # ragged: 4096 tokens in 4 equal buckets at f in {.25, .5, .75, 1}
    h, f = 4096, 11008
    w_up, w_down = torch.randn(f, h, device=dev, dtype=dt), torch.randn(h, f, device=dev, dtype=dt)
    widths = [f, f * 3 // 4 // 64 * 64, f // 2 // 64 * 64, f // 4 // 64 * 64]
    starts = [0, 1024, 2048, 3072]
    x_up, x_down = torch.randn(4096, h, device=dev, dtype=dt), torch.randn(4096, f, device=dev, dtype=dt)
    dense_up, dense_down = bench(lambda: x_up @ w_up.T), bench(lambda: x_down @ w_down.T)
    ideal = sum(widths) / (4 * f)
    for mode, x, w, dense in (("out", x_up, w_up, dense_up), ("in", x_down, w_down, dense_down)):
        t_g = bench(lambda: tk.grouped_linear(x, w, None, starts, widths, mode))
        t_b = bench(lambda: reference.grouped_linear(x, w, None, starts, widths, mode))
        res["ragged"].append(
            {
                "mode": mode,
                "grouped_over_ideal": t_g / dense / ideal,
                "bucketed_over_ideal": t_b / dense / ideal,
                "target": 1.15,
            }
        )
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{slug}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [
        f"# Kernels on {name} (bench/bench_kernels.py)",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, bf16.",
        "",
        "| prefill M=2048 | f | Triton / dense | cuBLAS view / dense | target |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['shape']} | {r['f']} | {r['triton_ratio']:.3f} | {r['cublas_view_ratio']:.3f} | <= {r['target']:.3f} |"
        for r in res["prefill"]
    ]
    md += [
        "",
        "| decode M=1, CUDA graphs | f | Triton / dense | cuBLAS / dense | target |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['shape']} | {r['f']} | {r['triton_ratio']:.3f} | {r['cublas_ratio']:.3f} | <= {r['target']:.3f} |"
        for r in res["decode"]
    ]
    md += ["", "| GEMM M x N x K | Triton throughput / cuBLAS | target |", "|---|---|---|"]
    md += [
        f"| {'x'.join(map(str, r['MNK']))} | {r['triton_over_cublas_throughput']:.3f} | >= 0.80 |"
        for r in res["gemm"]
    ]
    md += [
        "",
        "| ragged, 4 buckets | grouped launch / ideal | bucketed / ideal | target |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['mode']} | {r['grouped_over_ideal']:.3f} | {r['bucketed_over_ideal']:.3f} | <= 1.15 |"
        for r in res["ragged"]
    ]
    (out / f"kernels_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
