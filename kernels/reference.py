"""Plain-PyTorch reference for head/neuron-subset linear layers.

A selection is ``None`` (all rows), an ``int`` n (the prefix ``[:n]``: a view, no copy) or a 1-D
LongTensor of ids (a gather, used only for per-group prefixes under GQA ``query`` mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Selection = None | int | torch.Tensor


def _select(t: torch.Tensor, sel: Selection, dim: int) -> torch.Tensor:
    if sel is None:
        return t
    if isinstance(sel, int):
        return t.narrow(dim, 0, sel)
    return t.index_select(dim, sel.to(t.device))


def subset_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_sel: Selection = None,
    in_sel: Selection = None,
) -> torch.Tensor:
    """y = x @ W[out_sel][:, in_sel].T + b[out_sel].

    x: (..., len(in_sel)); weight: (out_features, in_features); returns (..., len(out_sel)).
    """
    w = _select(_select(weight, out_sel, 0), in_sel, 1)
    b = None if bias is None else _select(bias, out_sel, 0)
    return F.linear(x, w, b)


def swiglu_prefix(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    m: int,
) -> torch.Tensor:
    """silu(x @ w_gate[:m].T + b_gate[:m]) * (x @ w_up[:m].T + b_up[:m]): (..., m)."""
    return F.silu(subset_linear(x, w_gate, b_gate, m)) * subset_linear(x, w_up, b_up, m)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    starts: list[int],
    widths: list[int],
    mode: str,
) -> torch.Tensor:
    """Bucketed execution: rows [starts[g], starts[g+1]) of x (sorted by group) at width widths[g],
    one dense prefix GEMM per group. mode "out": y (M, max width), zero beyond each group's width;
    mode "in": inner width w_g, y (M, N)."""
    M = x.shape[0]
    n = weight.shape[0] if mode == "in" else max(widths)
    y = x.new_zeros(M, n)
    bounds = list(starts) + [M]
    for g, w in enumerate(widths):
        rows = slice(bounds[g], bounds[g + 1])
        if bounds[g] == bounds[g + 1]:
            continue
        if mode == "in":
            y[rows] = subset_linear(x[rows, :w], weight, bias, None, w)
        else:
            y[rows, :w] = subset_linear(x[rows], weight, bias, w, None)
    return y
