"""Width-subset GEMMs for elastic layers (installed as ``flexcli.kernels``).

``reference`` holds the plain-PyTorch implementations: the test oracle and the CPU fallback.
``triton_kernels`` holds the Triton kernels. The functions below dispatch: Triton for CUDA tensors
(when Triton is installed and the selection is a prefix), the reference otherwise. ``FLEX_KERNELS``
= ``reference`` forces the reference everywhere. Ragged (per-token) widths default to the bucketed
reference, one dense prefix GEMM per width; ``FLEX_RAGGED=grouped`` selects the single-launch Triton
kernel, which becomes the default only where a benchmark shows it beating the bucketed path.
"""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import Selection

__all__ = ["Selection", "subset_linear", "swiglu_prefix", "grouped_linear", "use_triton"]


def use_triton(x: torch.Tensor) -> bool:
    """Whether `x` should go through the Triton kernels."""
    if os.environ.get("FLEX_KERNELS") == "reference" or not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _is_prefix(sel: Selection) -> bool:
    return sel is None or isinstance(sel, int)


def subset_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_sel: Selection = None,
    in_sel: Selection = None,
) -> torch.Tensor:
    """y = x @ W[out_sel][:, in_sel].T + b[out_sel]; x: (..., len(in_sel)) -> (..., len(out_sel))."""
    if use_triton(x) and _is_prefix(out_sel) and _is_prefix(in_sel):
        from .triton_kernels import prefix_linear

        n = weight.shape[0] if out_sel is None else out_sel
        k = weight.shape[1] if in_sel is None else in_sel
        return prefix_linear(x, weight, bias, n, k)
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
        from .triton_kernels import swiglu_prefix as tk

        return tk(x, w_gate, w_up, b_gate, b_up, m)
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
        from .triton_kernels import grouped_linear as tk

        return tk(x, weight, bias, starts, widths, mode)
    return reference.grouped_linear(x, weight, bias, starts, widths, mode)
