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


def subset_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out_sel: Selection = None, in_sel: Selection = None) -> torch.Tensor:
    """y = x @ W[out_sel][:, in_sel].T + b[out_sel].

    x: (..., len(in_sel)); weight: (out_features, in_features); returns (..., len(out_sel)).
    """
    w = _select(_select(weight, out_sel, 0), in_sel, 1)
    b = None if bias is None else _select(bias, out_sel, 0)
    return F.linear(x, w, b)
