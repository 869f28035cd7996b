"""Triton kernels for head/neuron-subset GEMMs (nn.Linear layout: y = x @ W.T).

* `prefix_linear`: y[:, :n] = x[:, :k] @ W[:n, :k].T (+ b[:n]). The active widths n (output: MLP
  gate/up, q/k/v) and k (inner: MLP down, o) are runtime arguments, never specialised, so one
  compilation serves every width.
* `swiglu_prefix`: h[:, :m] = act(x @ Wg[:m].T) * (x @ Wu[:m].T) in one pass (fused epilogue).
* `grouped_linear`: rows sorted by width, one launch over a table of (group, row tile, column tile);
  group g uses width w_g as its output width (mode "out") or inner width (mode "in").

Under TRITON_INTERPRET=1 (CPU tests) operands are upcast to fp32 before tl.dot, because the interpreter
mishandles bf16 dots; on GPUs the dot runs in the input dtype with fp32 accumulation. fp32 operands are
multiplied in full precision (`input_precision="ieee"`), as torch's own fp32 matmul is by default;
Triton's default would round them to TF32 on tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BM, BN, BK = (16, 16, 16) if INTERPRET else (64, 64, 32)


@triton.jit(do_not_specialize=["M", "n_active", "k_active"])
def _prefix_kernel(
    x_ptr,
    w_ptr,
    w2_ptr,
    b_ptr,
    b2_ptr,
    y_ptr,
    M,
    n_active,
    k_active,
    sxm,
    sxk,
    swn,
    swk,
    sym,
    syn,
    HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_active, BLOCK_K):
        kk = k0 + rk
        xm = (rm[:, None] < M) & (kk[None, :] < k_active)
        wm = (rn[:, None] < n_active) & (kk[None, :] < k_active)
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=xm, other=0.0)  # (BM, BK)
        w = tl.load(w_ptr + rn[:, None] * swn + kk[None, :] * swk, mask=wm, other=0.0)  # (BN, BK)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if SWIGLU:
            w2 = tl.load(w2_ptr + rn[:, None] * swn + kk[None, :] * swk, mask=wm, other=0.0)
            if UPCAST:
                w2 = w2.to(tl.float32)
            acc2 += tl.dot(x, tl.trans(w2), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < n_active, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc2 += tl.load(b2_ptr + rn, mask=rn < n_active, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2  # silu(gate) * up
    ym = (rm[:, None] < M) & (rn[None, :] < n_active)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=ym)


def _precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: full fp32 for fp32 operands (TF32 only applies to fp32 inputs)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def prefix_args(x2, w, w2, b, b2, y, n, k, swiglu) -> tuple[tuple, dict]:
    """The positional and constexpr arguments of one `_prefix_kernel` launch (also what the test of
    its compile cache key binds)."""
    args = (x2, w, w2 if w2 is not None else w, b if b is not None else w, b2 if b2 is not None else w, y,
            x2.shape[0], n, k, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1))  # fmt: skip
    meta = dict(HAS_BIAS=b is not None, SWIGLU=swiglu, UPCAST=INTERPRET, PRECISION=_precision(x2),
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)  # fmt: skip
    return args, meta


def _launch(x2, w, w2, b, b2, n, k, swiglu, out=None):
    M = x2.shape[0]
    y = torch.empty(M, n, dtype=x2.dtype, device=x2.device) if out is None else out.view(M, n)
    if M == 0 or n == 0:
        return y
    args, meta = prefix_args(x2, w, w2, b, b2, y, n, k, swiglu)
    _prefix_kernel[(triton.cdiv(M, BM), triton.cdiv(n, BN))](*args, **meta)
    return y


def prefix_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (..., k) -> (..., n) with the first n rows and k columns of weight (N, K); `out` is optional."""
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, weight, None, bias, None, n, k, False, out).view(*x.shape[:-1], n)


def swiglu_prefix(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    m: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (..., K) -> silu(x @ w_gate[:m].T) * (x @ w_up[:m].T): (..., m), fused."""
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, w_gate, w_up, b_gate, b_up, m, x.shape[-1], True, out).view(*x.shape[:-1], m)


@triton.jit
def _grouped_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    tiles_ptr,
    N_full,
    K_full,
    sxm,
    sxk,
    swn,
    swk,
    sym,
    syn,
    MODE_IN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    row0 = tl.load(tiles_ptr + t * 4 + 0)  # first row of this tile
    row_end = tl.load(tiles_ptr + t * 4 + 1)  # end of the tile's group
    col0 = tl.load(tiles_ptr + t * 4 + 2)
    width = tl.load(tiles_ptr + t * 4 + 3)
    n_active = N_full
    k_active = K_full
    if MODE_IN:
        k_active = width
    else:
        n_active = width
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_active, BLOCK_K):
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
            mask=(rm[:, None] < row_end) & (kk[None, :] < k_active),
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[:, None] * swn + kk[None, :] * swk,
            mask=(rn[:, None] < n_active) & (kk[None, :] < k_active),
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < n_active, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * sym + rn[None, :] * syn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < row_end) & (rn[None, :] < n_active),
    )


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    starts: list[int],
    widths: list[int],
    mode: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [starts[g], starts[g+1]) use width widths[g]; x: (M, K_in) sorted by group.

    mode "out": y (M, max width), group g fills y[rows, :w_g] (the rest stays zero);
    mode "in":  y (M, N), group g uses x[rows, :w_g] and weight[:, :w_g].
    """
    M = x.shape[0]
    N = weight.shape[0] if mode == "in" else max(widths)
    if out is not None and mode == "in":  # every entry is written: a poisoned buffer must come back clean
        y = out.view(M, N)
    else:
        y = torch.zeros(M, N, dtype=x.dtype, device=x.device)
    bounds = list(starts) + [M]
    tiles = []
    for g, w in enumerate(widths):
        n_cols = N if mode == "in" else w
        for r in range(bounds[g], bounds[g + 1], BM):
            for c in range(0, n_cols, BN):
                tiles.append((r, bounds[g + 1], c, w))
    if not tiles:
        return y
    table = torch.tensor(tiles, dtype=torch.int32, device=x.device)
    args, meta = grouped_args(x, weight, bias, y, table, N, mode)
    _grouped_kernel[(len(tiles),)](*args, **meta)
    return y


def grouped_args(x, weight, bias, y, table, N, mode) -> tuple[tuple, dict]:
    """The positional and constexpr arguments of one `_grouped_kernel` launch."""
    args = (x, weight, bias if bias is not None else weight, y, table, N, weight.shape[1], x.stride(0),
            x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1))  # fmt: skip
    meta = dict(MODE_IN=mode == "in", HAS_BIAS=bias is not None, UPCAST=INTERPRET, PRECISION=_precision(x),
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)  # fmt: skip
    return args, meta
