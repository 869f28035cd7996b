"""Routers (method.md §2.4): budget -> per-layer width choices, static or input-adaptive.

Budgets are encoded as a one-hot over the trained latency targets; an unseen budget between two
targets is their linear mix (router interpolation). Choice index 0 is the full width.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch import nn

from ..arch.spec import Config, ElasticSpec


def encode_budget(budget_ms: float, targets: list[float]) -> torch.Tensor:
    """(n_targets,) one-hot, or the linear mix of the two trained targets around `budget_ms` (clamped)."""
    ts = sorted(targets)
    v = torch.zeros(len(targets))
    if budget_ms <= ts[0]:
        v[targets.index(ts[0])] = 1.0
    elif budget_ms >= ts[-1]:
        v[targets.index(ts[-1])] = 1.0
    else:
        i = bisect.bisect_left(ts, budget_ms)
        lo, hi = ts[i - 1], ts[i]
        w = (budget_ms - lo) / (hi - lo)
        v[targets.index(lo)] += 1 - w
        v[targets.index(hi)] += w
    return v


def _init(m: nn.Module, std: float) -> None:
    for p in m.parameters():
        nn.init.normal_(p, std=std)


def _two_layer(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """Bias-free Linear -> LeakyReLU(0.1) -> Linear, the router block of [S2]."""
    return nn.Sequential(
        nn.Linear(n_in, hidden, bias=False), nn.LeakyReLU(0.1), nn.Linear(hidden, n_out, bias=False)
    )


class StaticRouter(nn.Module):
    """z = W2 LeakyReLU(W1 onehot(T)) -> per-layer MLP-width and head-count logits (bias-free, [S2])."""

    def __init__(self, n_targets: int, n_layers: int, n_mlp: int, n_heads: int, hidden: int = 128,
                 init_std: float = 0.1):  # fmt: skip
        super().__init__()
        self.n_layers, self.n_mlp, self.n_heads = n_layers, n_mlp, n_heads
        self.net = _two_layer(n_targets, hidden, n_layers * (n_mlp + n_heads))
        _init(self, init_std)

    def forward(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """budget: (B, n_targets) -> (mlp logits (B, L, K), head logits (B, L, J))."""
        z = self.net(budget).view(-1, self.n_layers, self.n_mlp + self.n_heads)
        return z[..., : self.n_mlp], z[..., self.n_mlp :]


def static_config(router: StaticRouter, spec: ElasticSpec, targets: list[float], budget_ms: float) -> Config:
    """argmax per layer of the static router at `budget_ms` (interpolated between trained targets)."""
    with torch.no_grad():
        lm, lh = router(encode_budget(budget_ms, targets)[None])
    return [
        (spec.layers[i].mlp[k], spec.layers[i].heads[j])
        for i, (k, j) in enumerate(zip(lm[0].argmax(-1).tolist(), lh[0].argmax(-1).tolist()))
    ]


class DynamicRouter(nn.Module):
    """Input-adaptive router: per layer, a per-token MLP width from [x_t ; emb(T)] and a per-sequence
    head count from [mean over the sequence of x_t ; emb(T)] (so the KV cache stays consistent).

    With `source` (lookahead), one router call at layer `source` decides every later layer from the
    hidden state entering it, and the layers before it run the budget's own choice (its prior): one call
    per decode step instead of one per layer: on SmolLM2 (49 ms full decode step) 0.15 ms per step
    instead of 1.55 ms for 30 calls, which a budget pays for in width (docs/results/adaptive_lookahead.md).
    """

    def __init__(self, n_targets: int, n_layers: int, hidden_size: int, n_mlp: int, n_heads: int,
                 emb: int = 16, hidden: int = 64, init_std: float = 0.1, source: int | None = None):  # fmt: skip
        super().__init__()
        if source is not None and not 0 <= source < n_layers:
            raise ValueError(f"router source layer {source} is not one of the {n_layers} layers")
        self.n_layers, self.n_mlp, self.n_heads, self.source = n_layers, n_mlp, n_heads, source
        self.emb = nn.Linear(n_targets, emb, bias=False)
        # per layer a block; with a source one block for the layers from it on, (L - source) x K outputs
        nets = n_layers if source is None else 1
        ahead = 1 if source is None else n_layers - source
        self.mlp = nn.ModuleList(_two_layer(hidden_size + emb, hidden, ahead * n_mlp) for _ in range(nets))
        self.att = nn.ModuleList(_two_layer(hidden_size + emb, hidden, ahead * n_heads) for _ in range(nets))
        _init(self, init_std)
        # per block, the hidden state it reads standardized channel by channel: (x - shift) * scale, set
        # from calibration text by `standardize` (identity until then, and in routers saved before it).
        # Raw, a residual stream's few large channels (SmolLM2 at layer 1: mean |x| 13-15 in three, 0.9
        # in the median one; 70-80 by layer 10) set every token's logits alike
        self.register_buffer("in_shift", torch.zeros(nets, hidden_size))
        self.register_buffer("in_scale", torch.ones(nets, hidden_size))
        # per-target logits added to every token's: the budget's own say, which hidden states of norm ~10
        # beside a 16-wide budget embedding drowned (trained on the LM loss, the router forgot its budget
        # and ran every one at the same latency); set from the static router's choices to start there
        self.prior_mlp = nn.Parameter(torch.zeros(n_targets, n_layers, n_mlp))
        self.prior_att = nn.Parameter(torch.zeros(n_targets, n_layers, n_heads))
        # lookahead: the source call's logits in this forward, and at decode their argmax (B, S, L - source)
        self._ahead: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._ahead_choice = torch.empty(0, 0, 0, dtype=torch.long)

    @torch.no_grad()
    def standardize(self, net: int, xs: torch.Tensor) -> None:
        """Set block `net`'s input standardization from xs (N, D), hidden states it will read."""
        xs = xs.float()
        self.in_shift[net] = xs.mean(0)
        self.in_scale[net] = 1.0 / xs.std(0).clamp_min(1e-3)

    def input_layers(self) -> list[int]:
        """The layer whose input each block reads, by block."""
        return list(range(self.n_layers)) if self.source is None else [self.source]

    def _block(self, net: int, x: torch.Tensor, e: torch.Tensor, heads: bool):
        """(per-token MLP logits (B, S, n), per-sequence head logits (B, n') or None) of router block `net`."""
        x = (x - self.in_shift[net]) * self.in_scale[net]  # (B, S, D), channels standardized
        tok = torch.cat([x, e[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        lm = self.mlp[net](tok)
        return lm, self.att[net](torch.cat([x.mean(dim=1), e], dim=-1)) if heads else None

    def layer_logits(
        self, layer: int, x: torch.Tensor, budget: torch.Tensor, heads: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, S, D) hidden state entering `layer`; budget: (B, n_targets).

        Returns (per-token MLP logits (B, S, K), per-sequence head logits (B, J); None without `heads`:
        decode steps keep the head counts chosen at prefill and skip that half of the router). With a
        source, `layer`'s own input is not read: layers before the source get their prior, the source's
        call decides it and every later layer, and later layers read what that call decided.
        """
        b = budget.float()
        pm, ph = b @ self.prior_mlp[:, layer], b @ self.prior_att[:, layer]  # (B, K), (B, J)
        x = x.float()
        if self.source is None:
            lm, lh = self._block(layer, x, self.emb(budget), heads)
            return lm + pm[:, None, :], None if lh is None else lh + ph
        if layer < self.source:
            return pm[:, None, :].expand(-1, x.shape[1], -1), ph if heads else None
        if layer == self.source:
            B, S, n = x.shape[0], x.shape[1], self.n_layers - self.source
            lm, lh = self._block(0, x, self.emb(budget), heads)
            self._ahead = (lm.view(B, S, n, self.n_mlp), None if lh is None else lh.view(B, n, self.n_heads))
        if self._ahead is None or self._ahead[0].shape[:2] != x.shape[:2]:
            raise RuntimeError(f"lookahead router: layer {layer} asked before its source layer {self.source}")
        am, ah = self._ahead
        k = layer - self.source
        if heads and ah is None:
            raise RuntimeError(f"lookahead router: layer {layer} asked for heads its source call skipped")
        return am[:, :, k] + pm[:, None, :], ah[:, k] + ph if heads else None

    def choose(self, layer: int, x: torch.Tensor, budget: torch.Tensor, tau: float | None = None,
               g: torch.Generator | None = None, heads: bool = True,
               scale: float = 1.0) -> tuple[torch.Tensor, Any, Any, Any]:  # fmt: skip
        """(per-token MLP choice (B, S), per-sequence head choice (B,), and with `tau` their Gumbel-softmax
        probabilities (B, S, K) / (B, J), else None) at `layer`: the argmax of the logits, or of the
        Gumbel-perturbed probabilities of the logits x `scale` when training (soft routing; a sample from
        softmax(scale x logits), which the argmax becomes as the scale grows). Without `heads` (inference
        only) the head choice is None."""
        if tau is None and not heads and self.source is not None and layer > self.source:
            if self._ahead_choice.shape[:2] != x.shape[:2]:
                raise RuntimeError(
                    f"lookahead router: layer {layer} asked before its source layer {self.source}"
                )
            return self._ahead_choice[:, :, layer - self.source], None, None, None  # decided at the source
        lm, lh = self.layer_logits(layer, x, budget, heads)
        if tau is None and not heads and layer == self.source:  # decode: every later layer's argmax now
            am = self._ahead[0] + (budget.float() @ self.prior_mlp[:, layer:].flatten(1)).view(
                budget.shape[0], 1, -1, self.n_mlp
            )  # (B, S, L - source, K)
            self._ahead_choice = am.argmax(-1)  # (B, S, L - source)
            return self._ahead_choice[:, :, 0], None, None, None
        if tau is None:
            return lm.argmax(-1), None if lh is None else lh.argmax(-1), None, None
        pm, ph = gumbel_probs(lm * scale, tau, g), gumbel_probs(lh * scale, tau, g)
        return pm.argmax(-1), ph.argmax(-1), pm, ph


class Surrogate(nn.Module):
    """SM: predicts the LM loss from the concatenated per-layer choice probabilities (2 x 256, ReLU)."""

    def __init__(self, n_in: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs).squeeze(-1)


def gumbel_probs(logits: torch.Tensor, tau: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-softmax probabilities over the last dim."""
    u = torch.rand(logits.shape, generator=g).clamp_(1e-9, 1 - 1e-9).to(logits.device)
    return torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)


def latency_loss(
    expected_ms: torch.Tensor, budget_ms: torch.Tensor, dead_zone: float, over_weight: float = 4.0
) -> torch.Tensor:
    """|E[lat]/T - 1| outside a dead zone (method.md §2.6), placed just under the budget and weighted
    `over_weight` times when over it.

    The symmetric form settles wherever the surrogate's pull toward larger widths balances the penalty,
    which on the demo model was 6% over budget; weighting the over-budget side keeps routers under it.
    """
    r = expected_ms / budget_ms - 1  # the dead zone lies just under the budget: [-2 * dead_zone, 0]
    return torch.where(
        r > 0, over_weight * r, torch.where(r < -2 * dead_zone, -r - 2 * dead_zone, torch.zeros_like(r))
    )
