"""Held-out perplexity of a (possibly elastic) causal LM."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def mean_loss(model: nn.Module, seqs: torch.Tensor, batch_size: int = 8) -> float:
    """Token-mean next-token cross-entropy over (n, seq_len) sequences."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in range(0, seqs.shape[0], batch_size):
            x = seqs[b: b + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # (batch, seq-1, vocab)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                               reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was)
    return total / count
