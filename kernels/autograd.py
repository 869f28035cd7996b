"""Differentiable Triton prefix kernels: the forward runs the Triton kernel, the backward computes
dX, dW and db for the active prefix only, so weights outside it get exactly zero gradient.

For y[:, :n] = x[:, :k] @ W[:n, :k].T + b[:n] (x: (M, k), W: (N, K), gy: (M, n)):

    dX = gy @ W[:n, :k]          (M, k)
    dW[:n, :k] = gy.T @ x        (n, k), zero elsewhere
    db[:n] = gy.sum(0)           (n,),   zero elsewhere

The backward GEMMs run on the prefix slices through one of two backends (`FLEX_KERNELS_BWD`):

* `torch` (default): cuBLAS on the slice views (no copy). Training GEMMs are compute-bound (M = tokens
  per micro-batch, thousands), where our plain tiled Triton dot reaches 0.71-0.81 of cuBLAS
  (docs/performance.md §1.2); bench/bench_kernels.py times both backwards side by side on a GPU.
* `triton`: the same prefix kernel on transposed views (dW written straight into the prefix block of a
  zero gradient), used by the tests to check the Triton path end to end.
"""

from __future__ import annotations

import os

import torch

from . import triton_kernels as tk

BWD_BACKENDS = ("torch", "triton")


def bwd_backend() -> str:
    """The backward GEMM backend named by FLEX_KERNELS_BWD (default torch, i.e. cuBLAS on the slice)."""
    b = os.environ.get("FLEX_KERNELS_BWD", "torch")
    if b not in BWD_BACKENDS:
        raise ValueError(f"FLEX_KERNELS_BWD must be torch or triton, got {b!r}")
    return b


def _mm_dx(gy: torch.Tensor, w: torch.Tensor, n: int, k: int, backend: str) -> torch.Tensor:
    """gy (M, n) @ W[:n, :k] -> (M, k)."""
    if backend == "triton":  # y = gy @ (W.T)[:k, :n].T: the prefix kernel over the transposed view
        return tk.prefix_linear(gy, w.t(), None, k, n)
    return gy @ w[:n, :k]


def _mm_dw(gy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """out (n, k) = gy.T (n, M) @ x (M, k), written in place (out is the prefix block of a gradient)."""
    if backend == "triton":
        tk.prefix_linear(gy.t(), x.t(), None, out.shape[1], x.shape[0], out=out)
    else:
        out.copy_(gy.t() @ x)


def linear_grads(
    gy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    has_bias: bool,
    n: int,
    k: int,
    needs: tuple[bool, bool, bool],
    backend: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX (M, k), dW (N, K) zero outside [:n, :k], db (N,) zero outside [:n]) for 2-D gy (M, n), x (M, k)."""
    gx = _mm_dx(gy, w, n, k, backend) if needs[0] else None
    gw = gb = None
    if needs[1]:
        gw = torch.zeros_like(w)
        _mm_dw(gy, x, gw[:n, :k], backend)
    if has_bias and needs[2]:
        gb = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        gb[:n] = gy.sum(0, dtype=torch.float32)
    return gx, gw, gb


class PrefixLinear(torch.autograd.Function):
    """y = x[..., :k] @ W[:n, :k].T + b[:n] through the Triton kernel, differentiable in x, W and b."""

    @staticmethod
    def forward(ctx, x, weight, bias, n: int, k: int):  # x: (..., k) -> (..., n)
        ctx.save_for_backward(x, weight)
        ctx.n, ctx.k, ctx.has_bias = n, k, bias is not None
        return tk.prefix_linear(x, weight, bias, n, k)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy2 = gy.reshape(-1, ctx.n)  # (M, n)
        gx, gw, gb = linear_grads(
            gy2, x.reshape(-1, ctx.k), w, ctx.has_bias, ctx.n, ctx.k, ctx.needs_input_grad[:3], bwd_backend()
        )
        return (None if gx is None else gx.view(x.shape)), gw, gb, None, None


class SwiGLUPrefix(torch.autograd.Function):
    """h = silu(x @ Wg[:m].T + bg[:m]) * (x @ Wu[:m].T + bu[:m]), fused forward; the backward recomputes
    the two pre-activations (nothing but the inputs is kept between passes)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, b_gate, b_up, m: int):  # x: (..., K) -> (..., m)
        ctx.save_for_backward(x, w_gate, w_up, b_gate, b_up)
        ctx.m = m
        return tk.swiglu_prefix(x, w_gate, w_up, b_gate, b_up, m)

    @staticmethod
    def backward(ctx, gh):
        x, wg, wu, bg, bu = ctx.saved_tensors
        m, K, backend = ctx.m, x.shape[-1], bwd_backend()
        x2, gh2 = x.reshape(-1, K), gh.reshape(-1, m).float()  # (M, K), (M, m)
        g = tk.prefix_linear(x2, wg, bg, m, K).float()  # (M, m) pre-activations, recomputed
        u = tk.prefix_linear(x2, wu, bu, m, K).float()
        s = torch.sigmoid(g)
        dg = (gh2 * u * s * (1 + g * (1 - s))).to(x.dtype)  # d silu(g) = s * (1 + g * (1 - s))
        du = (gh2 * g * s).to(x.dtype)
        need_x, need_wg, need_wu, need_bg, need_bu = ctx.needs_input_grad[:5]
        gx1, gwg, gbg = linear_grads(dg, x2, wg, bg is not None, m, K, (need_x, need_wg, need_bg), backend)
        gx2, gwu, gbu = linear_grads(du, x2, wu, bu is not None, m, K, (need_x, need_wu, need_bu), backend)
        gx = None if gx1 is None else (gx1 + gx2).view(x.shape)
        return gx, gwg, gwu, gbg, gbu, None


class GroupedLinear(torch.autograd.Function):
    """Ragged widths over row groups (rows sorted by group) in one Triton launch; the backward is one
    prefix backward per group (mode "out": group g's rows use W[:w_g]; mode "in": W[:, :w_g])."""

    @staticmethod
    def forward(ctx, x, weight, bias, starts: list[int], widths: list[int], mode: str):
        ctx.save_for_backward(x, weight)
        ctx.starts, ctx.widths, ctx.mode, ctx.has_bias = list(starts), list(widths), mode, bias is not None
        return tk.grouped_linear(x, weight, bias, starts, widths, mode)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        needs, backend = ctx.needs_input_grad[:3], bwd_backend()
        N, K = w.shape
        gx = torch.zeros_like(x) if needs[0] else None
        gw = torch.zeros_like(w) if needs[1] else None
        gb = torch.zeros(N, dtype=w.dtype, device=w.device) if ctx.has_bias and needs[2] else None
        bounds = ctx.starts + [x.shape[0]]
        for g, wd in enumerate(ctx.widths):
            rows = slice(bounds[g], bounds[g + 1])
            if bounds[g] == bounds[g + 1]:
                continue
            n, k = (N, wd) if ctx.mode == "in" else (wd, K)
            dx, dw, db = linear_grads(gy[rows, :n], x[rows, :k], w, ctx.has_bias, n, k, needs, backend)
            if gx is not None:
                gx[rows, :k] = dx
            if gw is not None:
                gw += dw
            if gb is not None:
                gb += db
        return gx, gw, gb, None, None, None
