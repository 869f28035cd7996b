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

from .progress import Reporter


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global batch (sequences per micro-step, summed over ranks)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast where the device has fast bf16) | fp32 | bf16


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


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (elsewhere CPU bf16 matmuls fall back to slow paths)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """(batch, seq_len) random windows of a 1-D token stream."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=g)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (batch, seq-1, vocab)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train_lm(model: nn.Module, tokens: torch.Tensor, cfg: TrainConfig, reporter: Reporter | None = None,
             step_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
             state: LoopState | None = None,
             on_step: Callable[[int, torch.optim.Optimizer, torch.Generator, list[float]], None] | None = None,
             ) -> TrainResult:
    """Train on random windows of `tokens` from step `state.step` (0) to `cfg.steps`.

    `step_loss(x, g)` computes the loss of one micro-batch (default: LM cross-entropy at full width);
    `on_step(step, opt, g, losses)` runs after every optimizer step (checkpointing).
    """
    rep = reporter or Reporter()
    from .distributed import rank_world

    rank, world = rank_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {world} processes")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    losses: list[float] = []
    start = 0
    if state is not None:
        if callable(state.optimizer):  # sharded (DCP) state loads itself into the optimizer
            state.optimizer(opt)
        else:
            opt.load_state_dict(state.optimizer)
        g.set_state(state.generator)
        losses, start = list(state.losses), state.step
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
                x = sample_batch(tokens, cfg.batch_size, cfg.seq_len, g)[rank * local:(rank + 1) * local].to(device)
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
    return TrainResult(cfg.steps, ntok, round(secs, 2), round(ntok / max(secs, 1e-9), 1),
                       float(sum(tail) / max(1, len(tail))), losses)
