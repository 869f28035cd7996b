"""Elastic continued training (method.md §2.3): train the permuted model so every nested width works.

Per micro-batch: the full model with probability p_full, otherwise a sub-network drawn from the
elastic spec (per-layer random choices, one uniform width, or either), or with `sandwich` the full,
the smallest and one random sub-network together. Loss (distill.py): KL(frozen original ||
sub-network) at a temperature, optionally mixed with LM cross-entropy.
"""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch.spec import Config, ElasticSpec, config_from_json
from ..elastic.evaluate import WidthRow, width_report
from ..elastic.runtime import ElasticModel
from ..errors import UsageError
from ..recipe import Recipe, TrainSection
from . import distributed as D
from .blockwise import reconstruct
from .checkpoints import Checkpoints
from .data import train_and_heldout
from .distill import distill_loss, logits, teacher_logits
from .loop import LoopState, TrainConfig, train_lm


def random_config(spec: ElasticSpec, sampling: str, g: torch.Generator) -> Config:
    """A sub-network drawn with the torch generator `g`; "mixed" picks uniform or layerwise by a coin."""

    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=g).item())

    if sampling == "mixed":
        sampling = "uniform" if draw(2) else "layerwise"
    return spec.sample(draw, sampling)


def sample_configs(
    spec: ElasticSpec, tc: TrainSection, g: torch.Generator, fixed: list[Config] | None = None
) -> list[Config | None]:
    """The sub-networks one micro-batch trains (None = the full model); `fixed`: draw among these."""
    if tc.sandwich:
        return [None, spec.smallest(), random_config(spec, tc.sampling, g)]
    if torch.rand((), generator=g).item() < tc.p_full:
        return [None]
    if fixed:
        return [fixed[int(torch.randint(0, len(fixed), (1,), generator=g).item())]]
    return [random_config(spec, tc.sampling, g)]


def load_configs(path: str, spec: ElasticSpec) -> list[Config]:
    """train.configs: a JSON list of configurations, each checked against the spec."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"train.configs: cannot read {p} as JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"train.configs: {p} must hold a non-empty list of configurations")
    out = []
    for cfg in raw:
        try:
            c = config_from_json(cfg)
            spec.check(c)
        except UsageError as e:
            raise UsageError(f"train.configs: {p}: {e}") from None
        out.append(c)
    return out


def make_step_loss(
    elastic: ElasticModel,
    forward: nn.Module,
    teacher: nn.Module | None,
    tc: TrainSection,
    fixed: list[Config] | None = None,
):
    """step_loss(x, g) for train_lm: sample sub-networks, average their (CE + KD) losses; one teacher
    forward serves every sub-network of the micro-batch.

    `forward` is the module to call (the FSDP-wrapped model under torchrun, else elastic.model).
    """

    def step_loss(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # x: (batch, seq)
        cfgs = sample_configs(elastic.spec, tc, g, fixed)
        t_logits = teacher_logits(teacher, x) if teacher is not None and tc.distill > 0 else None
        total = torch.zeros((), device=x.device)
        for cfg in cfgs:
            elastic.set_config(cfg)
            total = total + distill_loss(logits(forward, x), x, t_logits, tc)
        elastic.set_config(None)
        return total / len(cfgs)

    return step_loss


def report_configs(
    spec: ElasticSpec, mlp_ratios: list[float], n_random: int, seed: int
) -> list[tuple[str, Config]]:
    """Full model, every uniform width of the recipe, and a few seeded random per-layer configurations."""
    rows: list[tuple[str, Config]] = [("full", spec.full())]
    seen = {tuple(spec.full())}
    for r in sorted(mlp_ratios, reverse=True):
        cfg = spec.uniform(r, r)
        if tuple(cfg) not in seen:
            seen.add(tuple(cfg))
            rows.append((f"uniform {r:.0%}", cfg))
    rng = random.Random(seed)
    for k in range(n_random):
        rows.append((f"random #{k + 1}", spec.sample(rng.randrange)))
    return rows


@dataclass
class TrainReport:
    steps: int
    tokens: int
    tokens_per_s: float
    seconds: float
    final_train_loss: float
    resumed_from: int | None
    world_size: int = 1
    blockwise: dict[str, Any] | None = None  # the block-wise warm start's report (blockwise.py)
    loss_curve: list[float] = field(default_factory=list)  # training loss per optimizer step
    before: list[WidthRow] = field(default_factory=list)  # prune-only (permuted, untrained)
    after: list[WidthRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_data(recipe: Recipe, tok, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(training token stream, held-out sequences); a one-line error if not even one batch fits. The
    stream is tokenized once into a memory-mapped file in `cache` (the run's work directory), so the
    corpus is bounded by disk, not memory."""
    tc = recipe.train
    cfg = TrainConfig.from_section(tc, recipe.seed)
    cache.mkdir(parents=True, exist_ok=True)
    need = max(cfg.tokens, tc.blockwise_tokens)  # the warm start caches its windows from the same text
    tokens, heldout = train_and_heldout(
        tok, tc.data or recipe.calibration.data, need, tc.val_samples, tc.seq_len, cache
    )
    if tokens.numel() < cfg.batch_size * cfg.seq_len + 1:
        raise UsageError(
            f"training text has {tokens.numel()} tokens, fewer than one batch of "
            f"{cfg.batch_size} x {cfg.seq_len}; give more training text or a smaller batch size or sequence length"
        )
    return tokens, heldout


def run_train_stage(
    hf: nn.Module,
    elastic: ElasticModel,
    recipe: Recipe,
    data: tuple[torch.Tensor, torch.Tensor],
    ckpts: Checkpoints,
    resume_from,
    reporter,
) -> tuple[nn.Module | None, TrainReport | None]:
    """Elastic continued training of the permuted model `hf` in place (or under FSDP2 with torchrun).

    Returns the trained model (a plain, unsharded module on the rank that writes the output) and the
    report; (None, None) on the other ranks.
    """
    tc = recipe.train
    cfg = TrainConfig.from_section(tc, recipe.seed)
    tokens, heldout = data
    fixed = load_configs(tc.configs, elastic.spec) if tc.configs else None  # fail before any work
    rank, world = D.rank_world()
    warm_start = tc.blockwise_tokens > 0 and resume_from is None  # a resumed checkpoint already holds it
    if warm_start and world > 1:
        raise UsageError(
            "train.blockwise_tokens: the block-wise warm start runs in one process, not torchrun"
        )
    configs = report_configs(elastic.spec, recipe.elastic.mlp_ratios, tc.val_random_configs, recipe.seed)
    with reporter.task("held-out loss before training (prune-only)"):
        before = width_report(elastic, heldout, configs)
    need_teacher = tc.distill > 0 or warm_start
    teacher = copy.deepcopy(hf).eval().requires_grad_(False) if need_teacher else None
    blockwise = (
        reconstruct(elastic, teacher, tokens, tc, recipe.seed, reporter).to_dict() if warm_start else None
    )
    if tc.distill == 0:
        teacher = None
    if tc.freeze_embeddings:
        for emb in (hf.get_input_embeddings(), hf.get_output_embeddings()):
            if emb is not None:
                emb.weight.requires_grad_(False)

    state: LoopState | None = None
    if resume_from is not None:
        model_state, state = ckpts.load(resume_from)
        if model_state is not None:
            hf.load_state_dict(model_state, strict=False)
        reporter.info(f"resuming from {resume_from.name} (step {state.step} of {cfg.steps})")
    if world > 1:
        D.shard(hf, elastic.arch)

    def on_step(step: int, opt, g, losses) -> None:
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < cfg.steps:
            loop = LoopState(step, {} if world > 1 else opt.state_dict(), g.get_state(), list(losses))
            model_state = None if world > 1 else hf.state_dict()
            dcp_state = D.dcp_state(hf, opt) if world > 1 else None
            ckpts.save(step, model_state, loop, tc.keep_checkpoints, dcp_state=dcp_state, write=rank == 0)
            D.barrier()
            if os.environ.get("FLEX_FAULT_AFTER_CHECKPOINT") == str(step):  # crash tests: die like kill -9
                os._exit(137)

    step_loss = make_step_loss(elastic, hf, teacher, tc, fixed)
    if world > 1 and resume_from is not None:
        state = D.with_sharded_optimizer_state(hf, cfg, state, resume_from / "dcp")
    res = train_lm(hf, tokens, cfg, reporter, step_loss, state, on_step)
    if world > 1:
        hf = D.gather_full_model(hf)  # plain module on rank 0, None elsewhere
        if hf is None:
            return None, None
        elastic = ElasticModel(hf, elastic.arch, elastic.spec)
    with reporter.task("held-out loss after training"):
        after = width_report(elastic, heldout, configs)
    return hf, TrainReport(
        cfg.steps,
        cfg.tokens,
        res.tokens_per_s,
        res.seconds,
        round(res.final_loss, 5),
        state.step if state else None,
        world,
        blockwise,
        [round(x, 6) for x in res.losses],
        before,
        after,
    )
