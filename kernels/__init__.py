"""Width-subset GEMMs for elastic layers (installed as ``flexcli.kernels``).

``reference`` holds the plain-PyTorch implementations: the test oracle and the CPU fallback.
``triton_kernels`` holds the Triton kernels and ``autograd`` makes them differentiable (the backward
computes gradients for the active prefix only). The functions below dispatch: Triton for CUDA tensors
(when Triton is installed and the selection is a prefix), the reference otherwise. ``FLEX_KERNELS``
= ``reference`` forces the reference everywhere; ``FLEX_KERNELS=triton`` forces the Triton path, also
on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests run it). Under autocast the operands are
cast to the autocast dtype first (only the active prefix of the weight), as ``F.linear`` would. Ragged
(per-token) widths default to the bucketed reference, one dense prefix GEMM per width;
``FLEX_RAGGED=grouped`` selects the single-launch Triton kernel, which becomes the default only where a
benchmark shows it beating the bucketed path.
"""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import Selection

__all__ = ["Selection", "subset_linear", "swiglu_prefix", "grouped_linear", "use_triton"]


KERNEL_MODES = ("auto", "reference", "triton")


def use_triton(x: torch.Tensor) -> bool:
    """Whether `x` should go through the Triton kernels (FLEX_KERNELS: auto, reference or triton)."""
    mode = os.environ.get("FLEX_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"FLEX_KERNELS must be auto, reference or triton, got {mode!r}")
    if mode == "reference" or (mode == "auto" and not x.is_cuda):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if mode == "triton":
            raise RuntimeError("FLEX_KERNELS=triton needs Triton installed (pip install triton)") from None
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "FLEX_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    return True


def _autocast(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The operands in the autocast dtype when autocast is on for their device (else unchanged)."""
    dev = next(t for t in ts if t is not None).device.type
    if not torch.is_autocast_enabled(dev):
        return list(ts)
    dt = torch.get_autocast_dtype(dev)
    return [None if t is None else t.to(dt) for t in ts]


def _is_prefix(sel: Selection) -> bool:
    return sel is None or isinstance(sel, int)


def _head(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[:n]


def subset_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_sel: Selection = None,
    in_sel: Selection = None,
) -> torch.Tensor:
    """y = x @ W[out_sel][:, in_sel].T + b[out_sel]; x: (..., len(in_sel)) -> (..., len(out_sel))."""
    if use_triton(x) and _is_prefix(out_sel) and _is_prefix(in_sel):
        from .autograd import PrefixLinear

        n = weight.shape[0] if out_sel is None else out_sel
        k = weight.shape[1] if in_sel is None else in_sel
        return PrefixLinear.apply(*_autocast(x, weight[:n, :k], _head(bias, n)), n, k)
    return reference.subset_linear(x, weight, bias, out_sel, in_sel)


def swiglu_prefix(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    m: int,
) -> torch.Tensor:
    """silu(x @ w_gate[:m].T) * (x @ w_up[:m].T): (..., m); fused in one kernel on CUDA."""
    if use_triton(x):
        from .autograd import SwiGLUPrefix

        return SwiGLUPrefix.apply(*_autocast(x, w_gate[:m], w_up[:m], _head(b_gate, m), _head(b_up, m)), m)
    return reference.swiglu_prefix(x, w_gate, w_up, b_gate, b_up, m)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    starts: list[int],
    widths: list[int],
    mode: str,
) -> torch.Tensor:
    """Ragged widths over row groups (rows sorted by group); see reference.grouped_linear."""
    if use_triton(x) and os.environ.get("FLEX_RAGGED") == "grouped":
        from .autograd import GroupedLinear

        return GroupedLinear.apply(*_autocast(x, weight, bias), starts, widths, mode)
    return reference.grouped_linear(x, weight, bias, starts, widths, mode)
