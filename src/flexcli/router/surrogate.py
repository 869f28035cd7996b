"""The surrogate model's side of router training (method.md §2.6): configurations as one-hot features,
their true LM loss (cached), the surrogate's warm-up on sampled configurations, and its rank correlation
with the true loss on held-out configurations.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.spec import Config, ElasticSpec
from ..elastic.compensate import Bank
from ..elastic.evaluate import mean_loss
from ..elastic.runtime import ElasticModel
from ..progress import Reporter
from .models import Surrogate


def one_hot_config(cfg: Config, mlp: list[int], heads: list[int]) -> torch.Tensor:
    """(L * (K + J),) concatenated per-layer one-hots: the SM's input for a hard configuration."""
    v = torch.zeros(len(cfg), len(mlp) + len(heads))
    for i, (m, h) in enumerate(cfg):
        v[i, mlp.index(m)] = 1
        v[i, len(mlp) + heads.index(h)] = 1
    return v.flatten()


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0


class LossOracle:
    """A configuration's LM loss on fixed batches, cached (the LLM is frozen during SM/router stages);
    with `bank` (elastic.compensate.Bank), of the configuration as `flex extract` writes it, refit
    output projections included."""

    def __init__(self, elastic: ElasticModel, batches: torch.Tensor, bank: Bank | None = None):
        self.elastic, self.batches, self.bank, self.cache = elastic, batches, bank, {}

    def __call__(self, cfg: Config) -> float:
        key = tuple(cfg)
        if key not in self.cache:
            with self.bank.applied(cfg) if self.bank else nullcontext(), self.elastic.configured(cfg):
                self.cache[key] = mean_loss(self.elastic.model, self.batches)
        return self.cache[key]


def sample_config(spec: ElasticSpec, rng: random.Random) -> Config:
    """Half uniform, half per-layer random (so the SM sees the whole latency range)."""
    return spec.sample(rng.randrange, "uniform" if rng.random() < 0.5 else "layerwise")


@dataclass
class SMState:
    sm: Surrogate
    opt: torch.optim.Optimizer
    xs: list[torch.Tensor] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def fit(self, steps: int, g: torch.Generator, batch: int = 64) -> float:
        x, y = torch.stack(self.xs), torch.tensor(self.ys)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            idx = torch.randint(0, len(self.ys), (min(batch, len(self.ys)),), generator=g)
            loss = nn.functional.mse_loss(self.sm(x[idx]), y[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return loss.item()


def warm_up_surrogate(
    spec: ElasticSpec,
    oracle: LossOracle,
    n: int,
    lr: float,
    rng: random.Random,
    g: torch.Generator,
    rep: Reporter,
) -> SMState:
    """A surrogate fitted on `n` sampled (configuration, true loss) pairs, before any router step."""
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    sm_model = Surrogate(spec.dims.num_layers * (len(mlp) + len(heads)))
    sm = SMState(sm_model, torch.optim.Adam(sm_model.parameters(), lr=lr))
    with rep.task(f"surrogate warm-up ({n} configurations)", total=n) as task:
        for _ in range(n):
            cfg = sample_config(spec, rng)
            sm.xs.append(one_hot_config(cfg, mlp, heads))
            sm.ys.append(oracle(cfg))
            task.advance(1)
        sm.fit(600, g)
    return sm


def sm_spearman(sm: SMState, spec: ElasticSpec, held: list[Config], held_true: list[float]) -> float:
    """Spearman correlation of the surrogate's predictions with the true losses of held-out configurations."""
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    with torch.no_grad():
        pred = sm.sm(torch.stack([one_hot_config(c, mlp, heads) for c in held])).tolist()
    return spearman(pred, held_true)
