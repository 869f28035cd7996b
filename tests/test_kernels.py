"""Triton kernels against the PyTorch reference: random shapes with ragged edges (sizes that are not
multiples of the block), fp32 and bf16, outputs poisoned with NaN.

The same tests (marked `gpu`) run in two ways. On CPU, under TRITON_INTERPRET=1: the interpreter must be
on before triton is first imported (its standard library is jit-decorated at import), so they run in a
child pytest started with TRITON_INTERPRET=1 (`test_kernels_under_the_interpreter`); no other test runs
under the interpreter. On a GPU, compiled: `pytest -m gpu tests/test_kernels.py` (bench/gpu_check.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from flexcli.kernels import reference, subset_linear, use_triton  # noqa: E402

MODULE = "flexcli.kernels.triton_kernels"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
COMPILED = not INTERPRETING and torch.cuda.is_available()
DEV = "cuda" if COMPILED else "cpu"  # the interpreter runs kernels on CPU tensors


def kernel_check(f):
    """A kernel-vs-reference test: in the interpreter child on CPU, or compiled on a GPU (marker gpu)."""
    skip = pytest.mark.skipif(
        not (INTERPRETING or COMPILED), reason="runs in the interpreter child process or on a GPU"
    )
    return pytest.mark.gpu(skip(f))


def test_kernels_under_the_interpreter():
    if INTERPRETING:
        pytest.skip("this is the child process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", __file__],
                       env=env, capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:]
    assert " passed" in p.stdout and "failed" not in p.stdout, p.stdout[-2000:]


@pytest.fixture(scope="module")
def tk():
    from flexcli.kernels import triton_kernels

    return triton_kernels


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [
    (1, 40, 48, 40, 24),
    (37, 70, 50, 45, 61),
    (19, 33, 96, 17, 33),
    (64, 48, 64, 64, 48),
]  # M, K, N, n, k


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_prefix_linear(tk, dtype, M, K, N, n, k, bias):
    g = torch.Generator().manual_seed(M * 7 + n)
    x = torch.randn(M, k, generator=g).to(DEV, dtype)
    w = torch.randn(N, K, generator=g).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    out = torch.full((M, n), float("nan"), dtype=dtype, device=DEV)
    got = tk.prefix_linear(x, w, b, n, k, out=out)
    want = reference.subset_linear(x.float(), w.float(), None if b is None else b.float(), n, k)
    assert not torch.isnan(got).any()
    assert _rel(got, want) <= TOL[dtype]


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_linear_batched_all_widths(tk, dtype):
    x = torch.randn(2, 5, 48).to(DEV, dtype)
    w = torch.randn(80, 48).to(DEV, dtype)
    for n in (80, 61, 17, 1):
        got = tk.prefix_linear(x, w, None, n, 48)
        assert got.shape == (2, 5, n)
        assert _rel(got, reference.subset_linear(x.float(), w.float(), None, n, None)) <= TOL[dtype]


def test_widths_are_never_specialised():
    """One compilation serves every width: the compiled kernels' cache key leaves out the row count and the
    active widths. Checked on the real (non-interpreted) JIT functions, in a fresh interpreter."""
    code = f"from {MODULE} import _prefix_kernel as k\nprint(type(k).__name__, *(p.name for p in k.params if p.do_not_specialize))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    kind, *unspecialised = out.stdout.split()
    assert kind == "JITFunction" and {"M", "n_active", "k_active"} <= set(unspecialised), out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED, reason="needs a GPU (compiled kernels)")
def test_one_compile_for_all_widths_on_gpu():
    from flexcli.kernels import triton_kernels as real

    x = torch.randn(5, 48, device="cuda")
    w = torch.randn(80, 48, device="cuda")
    for n in (80, 61, 17, 1):
        real.prefix_linear(x, w, None, n, 48)
    caches = real._prefix_kernel.device_caches
    assert sum(len(c[0]) for c in caches.values()) == 1  # one compiled variant for four widths


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,m", [(13, 40, 27), (32, 64, 64), (7, 24, 5)])
def test_fused_swiglu(tk, dtype, M, K, m):
    g = torch.Generator().manual_seed(M + m)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    wg, wu = torch.randn(70, K, generator=g).to(DEV, dtype), torch.randn(70, K, generator=g).to(DEV, dtype)
    out = torch.full((M, m), float("nan"), dtype=dtype, device=DEV)
    got = tk.swiglu_prefix(x, wg, wu, None, None, m, out=out)
    want = reference.swiglu_prefix(x.float(), wg.float(), wu.float(), None, None, m)
    assert not torch.isnan(got).any() and _rel(got, want) <= TOL[dtype] * 2


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["out", "in"])
def test_grouped_ragged_widths(tk, dtype, mode):
    g = torch.Generator().manual_seed(1)
    starts, widths = [0, 5, 5, 30, 33], [64, 48, 40, 17, 8]  # one empty group, ragged sizes
    M = 41
    K = 64 if mode == "in" else 36
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    w = torch.randn(64 if mode == "out" else 29, 64 if mode == "in" else K, generator=g).to(DEV, dtype)
    b = torch.randn(w.shape[0], generator=g).to(DEV, dtype)
    out = torch.full((M, w.shape[0]), float("nan"), dtype=dtype, device=DEV) if mode == "in" else None
    got = tk.grouped_linear(x, w, b, starts, widths, mode, out=out)
    want = reference.grouped_linear(x.float(), w.float(), b.float(), starts, widths, mode)
    assert got.shape == want.shape and not torch.isnan(got).any()
    assert _rel(got, want) <= TOL[dtype]


def test_dispatch_uses_reference_on_cpu():
    x = torch.randn(3, 8)
    assert not use_triton(x)
    w = torch.randn(6, 8)
    assert torch.equal(subset_linear(x, w, None, 4), reference.subset_linear(x, w, None, 4))
