"""The elastic training loss: logits-only distillation from the frozen full model, fused and chunked.

On a small model with a large vocabulary the loss over the logits is a large share of a training step
(SmolLM2-135M: 8 x 256 tokens x 49,152 entries = 100M logits, 400 MB in fp32, more than every decoder
activation together). The autograd graph of log_softmax + kl_div walks that tensor about ten times
(the fp32 copy, both log-softmaxes, the KL, and each one's backward) and keeps three fp32 copies alive.
`kd_loss` walks it once, in chunks of rows that stay in cache: it computes the loss and, in the same
pass, its gradient softmax(s/T) - softmax(t/T), stored in the logits' own dtype for the backward.
It takes the logits at every position and ignores the last (which has no next token), so no slice
of the logits is copied forward or scattered back.
"""

from __future__ import annotations

import torch
from torch import nn

from ..recipe import TrainSection

CHUNK = 16  # rows per pass: 16 x 49,152 x 4 bytes = 3 MB of fp32 per temporary (8-64 time alike)


class _KD(torch.autograd.Function):
    """mean over (batch, seq-1) rows of T^2 KL(softmax(t/T) || softmax(s/T)); s, t: (batch, seq, vocab)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
        b, seq, _ = s.shape
        n = b * (seq - 1)
        grad = torch.zeros_like(s)  # the last position's row stays 0
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        with torch.autocast(s.device.type, enabled=False):
            for i in range(b):
                for j in range(0, seq - 1, CHUNK):
                    k = min(seq - 1, j + CHUNK)
                    ls = torch.log_softmax(s[i, j:k].float() / temp, -1)  # (rows, vocab)
                    lt = torch.log_softmax(t[i, j:k].float() / temp, -1)
                    pt = lt.exp()
                    total += (pt * (lt - ls)).sum(dtype=torch.float64)
                    # d/ds of T^2 KL / n = T (softmax(s/T) - softmax(t/T)) / n
                    grad[i, j:k] = ls.exp_().sub_(pt).mul_(temp / n)
        ctx.save_for_backward(grad)
        return (total * (temp**2 / n)).float()

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * go.to(grad.dtype), None, None


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """T^2 KL(teacher || student) of next-token distributions, averaged over (batch, seq-1) positions.

    logits (with grad), teacher_logits: (batch, seq, vocab), every position (the last is ignored)."""
    return _KD.apply(logits, teacher_logits.detach(), float(temp))


def logits(forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits at every position of x: (batch, seq) -> (batch, seq, vocab), in the model's (autocast) dtype."""
    return forward(input_ids=x, use_cache=False).logits


def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's logits: (batch, seq, vocab), no graph."""
    with torch.no_grad():
        return logits(teacher, x)


def distill_loss(
    student: torch.Tensor, x: torch.Tensor, teacher: torch.Tensor | None, tc: TrainSection
) -> torch.Tensor:
    """(1 - distill) * CE + distill * T^2 KL(teacher || student) of the logits (batch, seq, vocab) for
    x: (batch, seq); plain CE without a teacher. The CE term is skipped when its weight is 0 (the
    default, logits-only distillation)."""
    w_kd = tc.distill if teacher is not None else 0.0
    loss = torch.zeros((), device=student.device)
    if w_kd < 1.0:
        s = student[:, :-1].float()
        ce = nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), x[:, 1:].reshape(-1))
        loss = loss + (1 - w_kd) * ce
    if w_kd > 0.0:
        loss = loss + w_kd * kd_loss(student, teacher, tc.temperature)
    return loss
