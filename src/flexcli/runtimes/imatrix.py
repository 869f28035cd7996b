"""llama.cpp's importance matrix, computed in PyTorch on the sub-model itself from flexcli's calibration text.

For every matrix llama.cpp multiplies activations by, the importance of input channel j is the mean over
calibration tokens of x_j^2 (x: that matrix's input), which is what llama.cpp's `llama-imatrix` collects
and what its quantizer weighs each column's rounding error by. The sub-model runs as the elastic model
configured to its widths (the same activations the extracted file computes), and each value is named
by the GGUF tensor it weighs (blk.N.attn_q.weight, ...; a tied LM head is token_embd.weight), so the
dictionary goes to runtimes.quant.quantize as it is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arch.spec import Config
from ..elastic.evaluate import run_batches
from ..train.data import calibration_sequences

IMATRIX_TOKENS = 8192  # calibration tokens per sub-model (llama-imatrix's default is ~50k; CPU cost)


def collect(
    model: nn.Module, seqs: torch.Tensor, names: dict[str, str], batch_size: int = 4
) -> dict[str, np.ndarray]:
    """GGUF name -> (in_features,) mean squared input of each nn.Linear whose weight `names` maps
    (HF parameter name -> GGUF name), over the (n, seq_len) token sequences `seqs`."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        g = names.get(f"{mod_name}.weight")
        if g is None or not isinstance(mod, nn.Linear):
            continue

        def hook(_mod, args, g=g):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in_features)
            s = x.square().sum(0, dtype=torch.float64)
            sums[g] = s if g not in sums else sums[g] + s

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        n = run_batches(model, seqs, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return {g: (s / n).float().numpy() for g, s in sums.items()}


def gguf_names(plan_tensors, tied: bool) -> dict[str, str]:
    """HF weight name -> GGUF name of every matrix in an export plan; a tied LM head reads token_embd."""
    names = {hf: g for hf, g, shape, _ in plan_tensors if len(shape) == 2 and hf.endswith(".weight")}
    if tied:
        names["lm_head.weight"] = "token_embd.weight"
    names.pop("model.embed_tokens.weight", None)  # a row lookup, not a product: llama.cpp keeps no entry
    return names


_CACHE: dict[tuple, dict[str, np.ndarray]] = {}  # one process extracting a configuration at several types


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sub_model_imatrix(
    elastic: Path,
    cfg: Config,
    plan_tensors,
    tied: bool,
    tokens: int = IMATRIX_TOKENS,
    overrides: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """The importance matrix of ELASTIC at `cfg` (with the compensated weights `overrides` written in,
    elastic.compensate), named for the GGUF file `plan_tensors` describes (computed once per process for
    the same weights, configuration, compensation and tokens)."""
    from ..elastic import compensate
    from ..elastic.runtime import load_elastic
    from ..io.source import SourceModel

    key = (
        SourceModel.open(elastic).weights_identity(),
        tuple(map(tuple, cfg)),
        tokens,
        tied,
        _digest(overrides or {}),
    )
    if key not in _CACHE:
        seqs = calibration_sequences(elastic, tokens)
        el = load_elastic(elastic)
        if overrides:
            compensate.apply(el.model, el.arch, el.spec, cfg, overrides)
        with el.configured(cfg):
            _CACHE[key] = collect(el.model, seqs, gguf_names(plan_tensors, tied))
        while len(_CACHE) > 32:
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]
