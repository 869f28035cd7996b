"""Benchmark: Triton subset GEMMs vs cuBLAS, side by side in one run (issues 7 and 16; performance.md K1-K4).

GPU only: on a machine without CUDA it says so and exits 0, unless `--dry-run`, which runs every step at
toy sizes on the CPU (kernels under TRITON_INTERPRET=1, wall-clock medians, no CUDA graphs) so that the
one GPU run cannot fail on a typo. Times on the GPU are medians of triton.testing.do_bench (CUDA events,
L2 flushed between runs); decode is timed under CUDA graphs. bf16. Writes OUT/kernels_<device>.{json,md}
(default OUT: docs/results).
  K1 prefix-width GEMM at M = 2048 <= 1.10 x f x dense for f >= 0.25, and >= 0.80x cuBLAS on the same
     slice (copied contiguous); M in {1, 16, 2048}, f in {0.25, 0.5, 0.75, 1}, output (N) and inner (K)
  K1' prefill (M = 2048) sliced SwiGLU MLP (Triton, one compile for all widths) <= 1.10 f of cuBLAS dense
  K2 own GEMM >= 0.80x cuBLAS throughput on dense Llama shapes at M >= 2048
  K3 decode (M = 1) under CUDA graphs ratio(f) <= f + 0.10
  K4 ragged per-token widths (grouped launch and bucketed) <= 1.15x of ideal = sum rows * width / dense
  backward: training step (forward + backward) of the differentiable prefix GEMM at M = 2048, the
     backward GEMMs on cuBLAS slices (FLEX_KERNELS_BWD=torch, the default) vs the Triton kernel; the
     default stays where this table says it is faster
"""

# ruff: noqa: B023  (every lambda below is timed immediately, inside its own loop iteration)
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRACS = (1.0, 0.75, 0.5, 0.25)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--dry-run", action="store_true", help="every step at toy sizes on the CPU (interpreter)")
    return ap.parse_args()


def main() -> None:
    a = _args()
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not torch.cuda.is_available() and not a.dry_run:
        print(
            "bench-kernels: no CUDA device here; the kernels are tested on CPU by `make test` "
            "(TRITON_INTERPRET=1); run this on a GPU for speed numbers (or --dry-run to check the script)."
        )
        return
    import triton
    from flexcli.kernels import reference
    from flexcli.kernels import triton_kernels as tk

    gpu = not a.dry_run
    dev = torch.device("cuda" if gpu else "cpu")
    dt = torch.bfloat16
    name = torch.cuda.get_device_name(dev) if gpu else "dry run (CPU, interpreter)"
    # sizes: (hidden, MLP) of the Llama shapes, prefill M, GEMM shapes; toy ones for the dry run
    shapes = {"7b": (4096, 11008), "70b": (8192, 28672)} if gpu else {"toy": (64, 128)}
    big_m, ms = (2048, (1, 16, 2048)) if gpu else (32, (1, 4, 32))
    gemms = (
        ((8192, 8192, 8192), (4096, 11008, 4096), (4096, 4096, 11008), (2048, 5504, 4096))
        if gpu
        else ((32, 64, 48),)
    )
    quantum = 64 if gpu else 16

    if gpu:
        from triton.testing import do_bench

        def bench(fn) -> float:
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

        def graphed(fn):
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return g.replay
    else:

        def bench(fn) -> float:
            fn()
            samples = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e3)
            return statistics.median(samples)

        def graphed(fn):
            return fn

    res = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dry_run": not gpu,
        "prefix_gemm": [],
        "prefill": [],
        "gemm": [],
        "decode": [],
        "ragged": [],
        "backward": [],
    }

    def mlp_cublas(x, wg, wu, wd, m):
        return torch.nn.functional.linear(torch.nn.functional.silu(x @ wg[:m].T) * (x @ wu[:m].T), wd[:, :m])

    def mlp_triton(x, wg, wu, wd, m):
        return tk.prefix_linear(tk.swiglu_prefix(x, wg, wu, None, None, m), wd, None, wd.shape[0], m)

    # K1: one prefix-width GEMM, output width (up projection) and inner width (down projection)
    h, f = next(iter(shapes.values()))
    for which, (N, K) in (("out", (f, h)), ("in", (h, f))):
        w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=dt)
            fn_dense = graphed(lambda: x @ w.T) if M == 1 else (lambda: x @ w.T)
            dense = bench(fn_dense)
            for frac in FRACS:
                width = max(quantum, int((N if which == "out" else K) * frac) // quantum * quantum)
                n, k = (width, K) if which == "out" else (N, width)
                ws = w[:n, :k].contiguous()
                xs = x[:, :k].contiguous()

                def call_tr():
                    return tk.prefix_linear(x, w, None, n, k)

                def call_cu():
                    return xs @ ws.T

                t_tr = bench(graphed(call_tr) if M == 1 else call_tr)
                t_cu = bench(graphed(call_cu) if M == 1 else call_cu)
                res["prefix_gemm"].append(
                    {
                        "width": which,
                        "N": N,
                        "K": K,
                        "M": M,
                        "f": frac,
                        "triton_over_f_dense": t_tr / (frac * dense),
                        "triton_over_cublas_slice_time": t_tr / t_cu,
                        "targets": "<= 1.10 and cuBLAS/Triton >= 0.80 at M=2048, f >= 0.25"
                        if M == big_m
                        else "-",
                    }
                )
    for shape, (h, f) in shapes.items():
        wg, wu = (
            torch.randn(f, h, device=dev, dtype=dt) * 0.02,
            torch.randn(f, h, device=dev, dtype=dt) * 0.02,
        )
        wd = torch.randn(h, f, device=dev, dtype=dt) * 0.02
        x = torch.randn(big_m, h, device=dev, dtype=dt)
        dense = bench(lambda: mlp_cublas(x, wg, wu, wd, f))
        for frac in (*FRACS, 0.125):
            m = int(f * frac) // quantum * quantum
            t_tr = bench(lambda: mlp_triton(x, wg, wu, wd, m))
            t_cu = bench(lambda: mlp_cublas(x, wg, wu, wd, m))
            res["prefill"].append(
                {
                    "shape": shape,
                    "M": big_m,
                    "f": frac,
                    "triton_ratio": t_tr / dense,
                    "cublas_view_ratio": t_cu / dense,
                    "target": 1.10 * frac if frac >= 0.25 else 1.25 * frac,
                }
            )
        # decode under CUDA graphs (M = 1)
        x1 = torch.randn(1, h, device=dev, dtype=dt)
        times = {}
        for frac in (*FRACS, 0.125):
            m = int(f * frac) // quantum * quantum
            for impl, fn in (("triton", mlp_triton), ("cublas", mlp_cublas)):
                times[(impl, frac)] = bench(graphed(lambda: fn(x1, wg, wu, wd, m)))
        for frac in (*FRACS, 0.125):
            res["decode"].append(
                {
                    "shape": shape,
                    "f": frac,
                    "triton_ratio": times[("triton", frac)] / times[("cublas", 1.0)],
                    "cublas_ratio": times[("cublas", frac)] / times[("cublas", 1.0)],
                    "target": frac + 0.10,
                }
            )
    for M, N, K in gemms:
        a_, w = torch.randn(M, K, device=dev, dtype=dt), torch.randn(N, K, device=dev, dtype=dt)
        t_cu = bench(lambda: a_ @ w.T)
        t_tr = bench(lambda: tk.prefix_linear(a_, w, None, N, K))
        res["gemm"].append({"MNK": [M, N, K], "triton_over_cublas_throughput": t_cu / t_tr, "target": 0.80})
    # backward: forward + backward of the autograd Function, each backward backend, at M = big_m
    from flexcli.kernels.autograd import PrefixLinear

    h, f = next(iter(shapes.values()))
    for which, (N, K) in (("out", (f, h)), ("in", (h, f))):
        w = (torch.randn(N, K, device=dev, dtype=dt) * 0.02).requires_grad_()
        for frac in FRACS:
            width = max(quantum, int((N if which == "out" else K) * frac) // quantum * quantum)
            n, k = (width, K) if which == "out" else (N, width)
            x = torch.randn(big_m, k, device=dev, dtype=dt, requires_grad=True)
            gy = torch.randn(big_m, n, device=dev, dtype=dt)
            times = {}
            for backend in ("torch", "triton"):
                os.environ["FLEX_KERNELS_BWD"] = backend

                def step():
                    w.grad = x.grad = None
                    PrefixLinear.apply(x, w, None, n, k).backward(gy)

                times[backend] = bench(step)
            os.environ.pop("FLEX_KERNELS_BWD")
            res["backward"].append(
                {
                    "width": which,
                    "N": N,
                    "K": K,
                    "M": big_m,
                    "f": frac,
                    "triton_over_cublas": times["triton"] / times["torch"],
                }
            )
    # ragged: rows in 4 equal buckets at f in {1, .75, .5, .25}
    h, f = next(iter(shapes.values()))
    rows = 4096 if gpu else 32
    w_up, w_down = torch.randn(f, h, device=dev, dtype=dt), torch.randn(h, f, device=dev, dtype=dt)
    widths = [f, f * 3 // 4 // quantum * quantum, f // 2 // quantum * quantum, f // 4 // quantum * quantum]
    starts = [0, rows // 4, rows // 2, 3 * rows // 4]
    x_up, x_down = torch.randn(rows, h, device=dev, dtype=dt), torch.randn(rows, f, device=dev, dtype=dt)
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
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{slug}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [
        f"# Kernels on {name} (bench/bench_kernels.py)",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, bf16"
        + (
            ". DRY RUN: toy sizes on the CPU under the interpreter; the numbers mean nothing."
            if not gpu
            else "."
        ),
        "",
        "| prefix GEMM | N x K | M | f | Triton / (f x dense) | Triton / cuBLAS on the slice (time) | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['width']} | {r['N']}x{r['K']} | {r['M']} | {r['f']} | {r['triton_over_f_dense']:.3f} | "
        f"{r['triton_over_cublas_slice_time']:.3f} | {r['targets']} |"
        for r in res["prefix_gemm"]
    ]
    md += [
        "",
        "| prefill SwiGLU MLP | f | Triton / dense | cuBLAS view / dense | target |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['shape']} M={r['M']} | {r['f']} | {r['triton_ratio']:.3f} | {r['cublas_view_ratio']:.3f} | "
        f"<= {r['target']:.3f} |"
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
    md += [
        "",
        "| training step (fwd + bwd), M=2048 | N x K | f | Triton backward / cuBLAS-slice backward (time) |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['width']} | {r['N']}x{r['K']} | {r['f']} | {r['triton_over_cublas']:.3f} |"
        for r in res["backward"]
    ]
    (out / f"kernels_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
