"""Block-wise reconstruction warm start: every decoder block, at its narrow widths, is trained to reproduce
the frozen full block's output on the full model's own activations, before end-to-end distillation.

Why: end-to-end distillation pays for a teacher forward, the whole student and the 49k-entry logits to
get one scalar per token; a block's output is a 576-wide target per token per layer, and its inputs can
be cached once and reused for several epochs. The blocks are independent here (each sees the full
model's input to it, as the compensation's refit does), so one step trains all layers, each at its own
randomly drawn width, with the full width drawn as often as `p_full` so it stays what it was.

Memory: the full model's hidden states at every layer boundary, (layers + 1) x tokens x hidden in bf16
(SmolLM2-135M, 20k tokens: 31 x 20,480 x 576 x 2 bytes = 0.7 GB).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..device import autocast_dtype
from ..elastic.runtime import ElasticModel, block_output
from ..progress import Reporter
from ..recipe import TrainSection
from .loop import TrainConfig, lr_at, make_optimizer, sample_batch

CACHE_DTYPE = torch.bfloat16


@dataclass
class BlockwiseReport:
    tokens: int  # cached tokens (the epochs reuse them)
    epochs: int
    steps: int
    seconds: float
    tokens_per_s: float  # cached tokens x epochs per second (every layer trained on each)
    # relative reconstruction error ||block(x) - y||^2 / ||y - x||^2 per layer at the smallest widths, on
    # the first cached batch, before and after
    smallest_before: list[float] = field(default_factory=list)
    smallest_after: list[float] = field(default_factory=list)
    full_after: list[float] = field(default_factory=list)  # the same at full width (0 before training)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def cache_activations(
    teacher: nn.Module, layers_path: str, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The full model's hidden state entering each block and leaving the last one, per batch.

    Returns (acts, kwargs): acts[b] is (layers + 1, batch, seq, hidden) in bf16; kwargs is what the model
    passes its blocks besides the hidden state (rotary cos/sin, mask, positions), captured on the first
    batch and valid for every batch of the same shape.
    """
    layers = list(teacher.get_submodule(layers_path))
    seen: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def pre(_mod, args, kw):
        h = args[0] if args else kw["hidden_states"]
        seen.append(h.to(CACHE_DTYPE))
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def post(_mod, _args, out):
        seen.append(block_output(out).to(CACHE_DTYPE))

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(post))
    acts = []
    try:
        for x in batches:
            seen.clear()
            teacher(input_ids=x, use_cache=False)
            acts.append(torch.stack(seen))
    finally:
        for h in handles:
            h.remove()
    return acts, kwargs


def _errors(
    elastic: ElasticModel, acts: torch.Tensor, kwargs: dict, cfg, amp: torch.dtype | None
) -> list[float]:
    """Per-layer relative error of each block at `cfg` on one cached batch."""
    out = []
    with torch.no_grad(), elastic.configured(cfg):
        for i, layer in enumerate(elastic.layers):
            x, y = acts[i].float(), acts[i + 1].float()
            with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                z = block_output(layer(x, **kwargs)).float()
            out.append(round(((z - y).pow(2).sum() / (y - x).pow(2).sum().clamp_min(1e-12)).item(), 5))
    return out


def reconstruct(
    elastic: ElasticModel,
    teacher: nn.Module,
    tokens: torch.Tensor,
    tc: TrainSection,
    seed: int,
    reporter: Reporter | None = None,
) -> BlockwiseReport:
    """Train every block of `elastic` (in place) to match `teacher`'s block outputs at random widths.

    tc.blockwise_tokens windows of tc.seq_len from the training stream are cached once and visited
    tc.blockwise_epochs times in batches of tc.batch_size; AdamW at tc.blockwise_lr with the end-to-end
    run's warm-up and cosine schedule. Embeddings, final norm and head are not touched.
    """
    rep = reporter or Reporter()
    spec, device = elastic.spec, next(elastic.model.parameters()).device
    g = torch.Generator().manual_seed(seed + 1)
    n_batches = max(1, tc.blockwise_tokens // (tc.batch_size * tc.seq_len))
    batches = [sample_batch(tokens, tc.batch_size, tc.seq_len, g).to(device) for _ in range(n_batches)]
    with rep.task("block-wise warm start: caching the full model's activations"):
        acts, kwargs = cache_activations(teacher, elastic.arch.layers, batches)
    del batches
    steps = n_batches * tc.blockwise_epochs
    # the end-to-end run's schedule and optimizer settings, over the warm start's own steps
    cfg = dataclasses.replace(
        TrainConfig.from_section(dataclasses.replace(tc, steps=steps), seed),
        lr=tc.blockwise_lr, grad_clip=0.0, grad_accum=1,
    )  # fmt: skip
    blocks = nn.ModuleList(elastic.layers)
    opt = make_optimizer(blocks, cfg)
    amp = autocast_dtype(device, cfg.precision)
    smallest = spec.smallest()
    before = _errors(elastic, acts[0], kwargs, smallest, amp)
    elastic.model.train()
    t0 = time.time()
    with rep.task("block-wise warm start", total=steps) as task:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            a = acts[int(torch.randint(0, n_batches, (1,), generator=g).item())]  # (L+1, batch, seq, hidden)
            total = 0.0
            for i, layer in enumerate(elastic.layers):
                if torch.rand((), generator=g).item() < tc.p_full:
                    m, h = spec.dims.intermediate_size, spec.dims.num_heads
                else:
                    lc = spec.layers[i]
                    m = lc.mlp[int(torch.randint(0, len(lc.mlp), (1,), generator=g).item())]
                    h = lc.heads[int(torch.randint(0, len(lc.heads), (1,), generator=g).item())]
                elastic.set_layer(i, m, h)
                x, y = a[i].float(), a[i + 1].float()
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    z = block_output(layer(x, **kwargs))
                # normalised by the block's own update so every layer's loss is on the same scale
                loss = (z.float() - y).pow(2).mean() / (y - x).pow(2).mean().clamp_min(1e-12)
                loss.backward()
                total += loss.item()
            elastic.set_config(None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            task.advance(1, loss=f"{total / len(elastic.layers):.4f}")
    secs = time.time() - t0
    elastic.model.eval()
    after = _errors(elastic, acts[0], kwargs, smallest, amp)
    full_after = _errors(elastic, acts[0], kwargs, None, amp)
    n = n_batches * tc.batch_size * tc.seq_len
    return BlockwiseReport(
        n, tc.blockwise_epochs, steps, round(secs, 2), round(n * tc.blockwise_epochs / max(secs, 1e-9), 1),
        before, after, full_after,
    )  # fmt: skip
