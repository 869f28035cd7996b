"""The causal-LM training loop (AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast).

Written once for both jobs: pretraining the demo base model (plain LM loss) and elastic continued
training (`step_loss` picks a sub-network per micro-batch). Resumable: the loop state is the step,
the optimizer and the data/sampling generator, so a resumed run repeats an uninterrupted one exactly.
Under torchrun every rank draws the same global batch and trains on its own slice of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..device import autocast_dtype
from ..progress import Reporter
from ..recipe import TrainSection
from .distributed import rank_world


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop's settings, resolved: no defaults here (they live in recipe.TrainSection)."""

    steps: int
    batch_size: int  # global batch (sequences per micro-step, summed over ranks)
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup: int
    weight_decay: float
    grad_clip: float
    grad_accum: int
    seed: int
    precision: str  # auto (bf16 autocast where the device has fast bf16) | fp32 | bf16

    @classmethod
    def from_section(cls, tc: TrainSection, seed: int) -> TrainConfig:
        """Steps from `steps` or `tokens`; warm-up at most half the run."""
        steps = tc.steps or math.ceil(tc.tokens / (tc.batch_size * tc.seq_len * tc.grad_accum))
        return cls(
            steps=steps,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
            lr=tc.lr,
            min_lr_ratio=tc.min_lr_ratio,
            warmup=min(tc.warmup, max(1, steps // 2)),
            weight_decay=tc.weight_decay,
            grad_clip=tc.grad_clip,
            grad_accum=tc.grad_accum,
            seed=seed,
            precision=tc.precision,
        )

    @property
    def tokens(self) -> int:
        """Training tokens of the whole run."""
        return self.steps * self.batch_size * self.seq_len * self.grad_accum


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    losses: list[float] = field(default_factory=list)


@dataclass
class LoopState:
    """Everything besides the weights that a resumed run needs."""

    step: int
    optimizer: dict | Callable[[torch.optim.Optimizer], None]
    generator: torch.Tensor
    losses: list[float]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """(batch, seq_len) random windows of a 1-D token stream (in memory or a memory-mapped token file)."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seq) batch (computed in fp32)."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (batch, seq-1, vocab)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _restore(
    state: LoopState | None, opt: torch.optim.Optimizer, g: torch.Generator
) -> tuple[list[float], int]:
    """Optimizer and generator state of a resumed run; (losses so far, first step)."""
    if state is None:
        return [], 0
    if callable(state.optimizer):  # sharded (DCP) state loads itself into the optimizer
        state.optimizer(opt)
    else:
        opt.load_state_dict(state.optimizer)
    g.set_state(state.generator)
    return list(state.losses), state.step


def train_lm(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    step_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    state: LoopState | None = None,
    on_step: Callable[[int, torch.optim.Optimizer, torch.Generator, list[float]], None] | None = None,
) -> TrainResult:
    """Train on random windows of `tokens` from step `state.step` (0) to `cfg.steps`.

    `step_loss(x, g)` computes the loss of one micro-batch (default: LM cross-entropy at full width);
    `on_step(step, opt, g, losses)` runs after every optimizer step (checkpointing).
    """
    rep = reporter or Reporter()
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {world} processes")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    losses, start = _restore(state, opt, g)
    amp = autocast_dtype(device, cfg.precision)
    loss_fn = step_loss or (lambda x, _g: lm_loss(model, x))
    local = cfg.batch_size // world
    model.train()
    t0 = time.time()
    with rep.task("training", total=cfg.steps) as task:
        task.advance(start)
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            total = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                x = sample_batch(tokens, cfg.batch_size, cfg.seq_len, g)[
                    rank * local : (rank + 1) * local
                ].to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = loss_fn(x, g) / cfg.grad_accum
                loss.backward()
                total += loss.detach()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(total, op=dist.ReduceOp.AVG)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total.item())
            done = (step + 1 - start) * cfg.batch_size * cfg.seq_len * cfg.grad_accum
            task.advance(1, loss=f"{losses[-1]:.3f}", tok_s=f"{done / max(1e-9, time.time() - t0):.0f}")
            if on_step is not None:
                on_step(step + 1, opt, g, losses)
    secs = time.time() - t0
    ntok = (cfg.steps - start) * cfg.batch_size * cfg.seq_len * cfg.grad_accum
    model.eval()
    tail = losses[-10:]
    final = float(sum(tail) / max(1, len(tail)))
    return TrainResult(cfg.steps, ntok, round(secs, 2), round(ntok / max(secs, 1e-9), 1), final, losses)
