"""Held-out loss and perplexity of a (possibly elastic) causal LM, per named configuration."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.spec import Config
from ..device import autocast_dtype
from .runtime import ElasticModel


def run_batches(
    model: nn.Module, seqs: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int], None] | None = None
) -> int:
    """Forward (n, seq_len) token sequences through `model` in inference mode, for the hooks it carries
    (calibration statistics); returns the tokens run."""
    with torch.inference_mode():
        for b in range(0, seqs.shape[0], batch_size):
            x = seqs[b : b + batch_size]
            model(input_ids=x, use_cache=False)
            if on_batch:
                on_batch(x.shape[0])
    return seqs.numel()


def mean_loss(model: nn.Module, seqs: torch.Tensor, batch_size: int = 8, precision: str = "auto") -> float:
    """Token-mean next-token cross-entropy over (n, seq_len) sequences: inference mode, bf16 autocast
    where the device runs it fast (`precision` as in training: auto | fp32 | bf16), and one host sync
    at the end (the sum stays on the device)."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device, precision)
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, amp or torch.bfloat16, enabled=amp is not None),
        ):
            for b in range(0, seqs.shape[0], batch_size):
                x = seqs[b : b + batch_size].to(device)
                logits = model(input_ids=x, use_cache=False).logits  # (batch, seq, vocab)
                # next-token targets, the last position ignored: no copy of the sliced logits
                target = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
                total += nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), target.flatten(), reduction="sum", ignore_index=-100
                )
    finally:
        model.train(was)
    return total.item() / (seqs.shape[0] * (seqs.shape[1] - 1))


@dataclass
class WidthRow:
    """Held-out loss of one named configuration."""

    name: str
    mlp: list[int]
    heads: list[int]
    loss: float
    ppl: float


@dataclass
class UniformWidth:
    """Held-out perplexity at one uniform width (the same MLP and head fraction in every layer)."""

    ratio: float
    mlp: int
    heads: int
    ppl: float


def width_report(
    elastic: ElasticModel, seqs: torch.Tensor, configs: list[tuple[str, Config]]
) -> list[WidthRow]:
    """Held-out loss and perplexity of each named configuration."""
    out = []
    for name, cfg in configs:
        with elastic.configured(cfg):
            loss = mean_loss(elastic.model, seqs)
        out.append(
            WidthRow(name, [m for m, _ in cfg], [h for _, h in cfg], round(loss, 5), round(math.exp(loss), 4))
        )
    return out


def uniform_width_report(
    elastic: ElasticModel, seqs: torch.Tensor, ratios: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
) -> list[UniformWidth]:
    """Held-out perplexity at uniform MLP and head fractions."""
    cfgs = [(f"{r:.0%}", elastic.spec.uniform(r, r)) for r in ratios]
    return [
        UniformWidth(r, row.mlp[0], row.heads[0], row.ppl)
        for r, row in zip(ratios, width_report(elastic, seqs, cfgs))
    ]
