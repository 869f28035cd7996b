"""Router training against the latency table through the surrogate model (method.md §2.4-2.7).

Static stage: the SM learns LM loss from per-layer choice probabilities (warm-up on sampled
configurations, then on the router's own choices); the router is updated through the SM only while
the SM's relative error on the current choice is under `eps`: L_R = SM(pi) + lam * latency_loss.
Input-adaptive stage: started at the static router's choices (per-target priors), then trained on the
frozen LM's own loss plus the latency loss at every step ("direct", the default: elastic.adaptive.
SoftRuntime runs the sampled per-token widths, its gradient that of the mixture over each token's width
distribution), or, as the paper, through the SM and its gate ("surrogate"). Through the SM it barely
moved: on SmolLM2 the SM, warmed up on near one-hot static configurations, was within eps on 22 of 60
steps (mean error 9%), and the router ran at the same latency for every budget.
Joint stage (optional): LLM and static router fine-tuned together with straight-through gating.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch.spec import ElasticSpec
from ..elastic.adaptive import DynamicRuntime, LayerRouter, SoftRuntime
from ..elastic.runtime import ElasticModel
from ..latency.table import LatencyTable
from ..latency.timing import TimingPolicy, time_fn
from ..progress import Reporter
from ..recipe import P_FULL
from ..train.loop import lm_loss, sample_batch
from .models import DynamicRouter, StaticRouter, encode_budget, gumbel_probs, latency_loss
from .surrogate import SMState


@dataclass(kw_only=True)
class RouterHyper:
    """Router training settings; the defaults are flexcli's (method.md §2.4-2.6)."""

    steps: int = 600  # static router steps
    dynamic_steps: int = 200
    joint_steps: int = 0
    sm_warmup: int = 256  # (configuration, loss) pairs before the first router step
    sm_heldout: int = 48  # configurations kept aside for the SM's Spearman
    lr: float = 1e-2  # router
    sm_lr: float = 1e-3
    joint_lr: float = 1e-4  # LLM weights in the joint stage
    lam: float = 5.0  # latency-loss weight (method: 1.0 [S1]; 5 makes budgets binding at our loss scale)
    eps: float = 0.05  # SM relative-error threshold
    dead_zone: float = 0.015  # the zero-loss band is [-2 * dead_zone, 0] relative to the budget
    tau_start: float = 1.0
    tau_end: float = 0.1
    hidden: int = 128
    batch_size: int = 4
    seq_len: int = 128
    loss_batches: int = 2  # fixed batches that define a configuration's "true" loss
    p_full: float = P_FULL  # joint stage
    surrogate: bool = True  # False: the static router learns from the LM loss itself (ablation, no SM)
    dynamic_train: str = "direct"  # direct (LM loss, straight-through the mixture) | surrogate (SM gate)
    # direct: the priors' Adam rate (at 1e-2 for the whole router, raw hidden states in and priors
    # saturated, SmolLM2's ppl rose 10-25% over the static start in 60 steps)
    dynamic_lr: float = 1e-3
    # direct: the token-dependent blocks learn at this rate (None: dynamic_lr), the priors at dynamic_lr, and
    # both fall linearly to dynamic_lr_end of it; on SmolLM2 (60 steps) this took held-out ppl 10-24% under
    # static's at every budget where the blocks at 1e-3 stayed at static's choices
    dynamic_token_lr: float | None = 1e-2
    dynamic_lr_end: float = 0.1
    dynamic_hard: bool = True  # direct: the forward at the sampled widths (straight-through), not the mixture
    dynamic_init: bool = True  # start the adaptive router at the static router's choices (when trained)
    # their logits x this as the priors: x10 (_route's final scale) saturates the softmax (SmolLM2: top-1
    # probability 0.99999, margins of 6-20), so neither Gumbel samples nor gradients leave the static choice
    dynamic_prior_scale: float = 1.0
    # lookahead: the layer whose input decides every later layer's width (one router call per step; the
    # layers before it run the budget's own choice); None: every layer routes from its own input, which on
    # SmolLM2 (results/adaptive_perlayer.md) decoded 2-15% slower than static and lost in ppl at 70/80%
    dynamic_source: int | None = 1
    # standardize the router's input channels on the training text before training (DynamicRouter.standardize)
    dynamic_standardize: bool = True
    seed: int = 0


def tau_at(step: int, total: int, h: RouterHyper) -> float:
    return h.tau_start * (h.tau_end / h.tau_start) ** (step / max(1, total - 1))


def dynamic_scale(step: int, h: RouterHyper) -> float:
    """The adaptive router's logit scale while it trains: 1 -> 10 / dynamic_prior_scale, so priors of
    prior_scale x the static router's logits sharpen from there to x10, where the static router's own
    1 -> 10 ramp [S2] ended; the widths sampled in training become the argmax ones it runs (a Gumbel
    sample of softmax(logits) is not their argmax at any tau)."""
    end = max(1.0, 10.0 / h.dynamic_prior_scale)
    return 1.0 + (end - 1.0) * step / max(1, h.dynamic_steps - 1)


def sm_gated_step(
    sm: SMState,
    feat: torch.Tensor,
    l_true: float,
    pm: list[torch.Tensor],
    ph: list[torch.Tensor],
    table: LatencyTable,
    target_ms: float,
    opt: torch.optim.Optimizer,
    h: RouterHyper,
    g: torch.Generator,
) -> float:
    """One surrogate step on (feat, l_true); then, only if the SM's relative error on this choice is under
    eps, one router step on SM(feat) + lam * latency_loss(E[lat]). Returns the SM's relative error."""
    sm.xs.append(feat.detach())
    sm.ys.append(l_true)
    sm.fit(2, g)
    pred = sm.sm(feat[None])[0]
    err = abs(pred.item() - l_true) / l_true
    if err < h.eps:
        loss = pred + h.lam * latency_loss(table.expected(pm, ph), torch.tensor(target_ms), h.dead_zone)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return err


def _new_static_router(spec: ElasticSpec, targets: list[float], h: RouterHyper):
    """(seeded static router, its Adam optimizer, the Gumbel generator): the same start for every stage."""
    L, K, J = spec.dims.num_layers, len(spec.layers[0].mlp), len(spec.layers[0].heads)
    torch.manual_seed(h.seed)
    router = StaticRouter(len(targets), L, K, J, h.hidden)
    return router, torch.optim.Adam(router.parameters(), lr=h.lr), torch.Generator().manual_seed(h.seed + 7)


def _route(
    router: StaticRouter, t: int, n_targets: int, scale: float, tau: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-softmax choice probabilities ((L, K) MLP, (L, J) heads) of the static router at target t."""
    lm, lh = router(torch.eye(n_targets)[t][None])
    return gumbel_probs(lm[0] * scale, tau, g), gumbel_probs(lh[0] * scale, tau, g)


def _latency_term(
    table: LatencyTable, pm: torch.Tensor, ph: torch.Tensor, target_ms: float, h: RouterHyper
) -> torch.Tensor:
    return latency_loss(table.expected(list(pm), list(ph)), torch.tensor(target_ms), h.dead_zone)


def train_static(
    spec, table: LatencyTable, targets: list[float], oracle, sm: SMState, h: RouterHyper, rep: Reporter
) -> tuple[StaticRouter, dict[str, Any]]:
    """Train the static router through the SM (oracle(cfg) -> true loss); returns it and statistics."""
    router, opt, g = _new_static_router(spec, targets, h)
    updates, errs = 0, []
    with rep.task("static router (through the surrogate)", total=h.steps) as task:
        for step in range(h.steps):
            t = step % len(targets)
            scale = 1 + 9 * step / max(1, h.steps - 1)  # logits scale 1 -> 10 [S2]
            pm, ph = _route(router, t, len(targets), scale, tau_at(step, h.steps, h), g)
            cfg = [
                (spec.layers[i].mlp[k], spec.layers[i].heads[j])
                for i, (k, j) in enumerate(zip(pm.argmax(-1).tolist(), ph.argmax(-1).tolist()))
            ]
            feat = torch.cat([pm, ph], dim=-1).flatten()
            err = sm_gated_step(sm, feat, oracle(cfg), list(pm), list(ph), table, targets[t], opt, h, g)
            errs.append(err)
            updates += err < h.eps
            task.advance(1, updates=updates)
    return router, {
        "router_updates": int(updates),
        "steps": h.steps,
        "mean_sm_rel_err": sum(errs) / len(errs),
    }


@torch.no_grad()
def init_from_static(
    router: DynamicRouter, static: StaticRouter, n_targets: int, scale: float = 10.0
) -> None:
    """Start the adaptive router at the static router's choices: its per-target priors are the static
    router's logits x `scale`, so at step 0 every budget's argmax is the static configuration, at its
    latency and quality, and the token-dependent part (small at init) learns where to deviate. x10 is
    where the static router's logit ramp ended (_route), and there the softmax is saturated; training
    starts softer (RouterHyper.dynamic_prior_scale) and sharpens toward it (dynamic_scale)."""
    lm, lh = static(torch.eye(n_targets))  # (n, L, K), (n, L, J)
    router.prior_mlp.copy_(scale * lm)
    router.prior_att.copy_(scale * lh)


def train_dynamic(
    elastic: ElasticModel,
    table: LatencyTable,
    targets: list[float],
    tokens: torch.Tensor,
    sm: SMState,
    h: RouterHyper,
    rep: Reporter,
    static: StaticRouter | None = None,
) -> tuple[DynamicRouter, dict[str, Any]]:
    """Train the input-adaptive router: `h.dynamic_train` "direct" (the frozen LM's loss at the sampled
    widths, straight-through the width mixture, + lam * latency loss, every step) or "surrogate" (through the SM and its gate,
    probabilities averaged over tokens); started at `static`'s choices when given."""
    spec = elastic.spec
    L, K, J = spec.dims.num_layers, len(spec.layers[0].mlp), len(spec.layers[0].heads)
    torch.manual_seed(h.seed + 1)
    router = DynamicRouter(len(targets), L, spec.dims.hidden_size, K, J, source=h.dynamic_source)
    g = torch.Generator().manual_seed(h.seed + 11)
    if static is not None and h.dynamic_init:
        init_from_static(router, static, len(targets), h.dynamic_prior_scale)
    if h.dynamic_standardize:
        standardize_inputs(elastic, router, sample_batch(tokens, 2 * h.batch_size, h.seq_len, g))
    direct = h.dynamic_train == "direct"
    overhead = router_overhead_ms(elastic, router, table, len(targets))
    lr = h.dynamic_lr if direct else h.lr
    priors = [router.prior_mlp, router.prior_att]
    blocks = [p for n, p in router.named_parameters() if not n.startswith("prior_")]
    token_lr = h.dynamic_token_lr if direct and h.dynamic_token_lr is not None else lr
    opt = torch.optim.Adam([{"params": priors, "lr": lr}, {"params": blocks, "lr": token_lr}])
    end = h.dynamic_lr_end if direct else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - (1 - end) * s / max(1, h.dynamic_steps - 1))
    rt: SoftRuntime | DynamicRuntime
    if direct:
        rt = SoftRuntime(elastic, router)
        rt.hard = h.dynamic_hard
    else:
        rt = DynamicRuntime(elastic, router)
        rt.soft = True
    rt.generator = g
    model = elastic.model
    model.requires_grad_(False)
    updates, errs, lat_ratio = 0, [], []
    try:
        with rep.task(f"input-adaptive router ({'LM loss' if direct else 'through the surrogate'})",
                      total=h.dynamic_steps) as task:  # fmt: skip
            for step in range(h.dynamic_steps):
                t = step % len(targets)
                x = sample_batch(tokens, h.batch_size, h.seq_len, g)
                rt.budget = torch.eye(len(targets))[t][None].expand(x.shape[0], -1)
                rt.tau = tau_at(step, h.dynamic_steps, h)
                rt.scale = dynamic_scale(step, h)
                rt.records, rt.choices = [], []
                loss_lm = lm_loss(model, x)
                pm = [r[0].mean(dim=(0, 1)) for r in rt.records]  # (K,) per layer
                ph = [r[1].mean(dim=0) for r in rt.records]  # (J,) per layer
                feat = torch.cat([torch.stack(pm), torch.stack(ph)], dim=-1).flatten()
                expected = table.expected(pm, ph) + overhead  # a decode step: the router runs in it
                lat_ratio.append(expected.item() / targets[t])
                if direct:
                    with torch.no_grad():  # the SM's error on the adaptive router's features, reported
                        err = abs(sm.sm(feat[None])[0].item() - loss_lm.item()) / loss_lm.item()
                    loss = loss_lm + h.lam * latency_loss(expected, torch.tensor(targets[t]), h.dead_zone)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    updates += 1
                else:
                    err = sm_gated_step(sm, feat, loss_lm.item(), pm, ph, table, targets[t], opt, h, g)
                    updates += err < h.eps
                errs.append(err)
                task.advance(1, updates=updates)
    finally:
        rt.close()
        model.requires_grad_(True)
    tail = lat_ratio[-max(1, len(lat_ratio) // 5) :]  # the last fifth of training
    return router, {
        "router_updates": int(updates),
        "steps": h.dynamic_steps,
        "mean_sm_rel_err": sum(errs) / max(1, len(errs)),
        "method": h.dynamic_train,
        "started_from_static": static is not None and h.dynamic_init,
        # the table's latency of the sampled choices (direct) or expected one (surrogate) / the target
        "final_latency_ratio": sum(tail) / len(tail) if tail else None,
        "router_step_ms": overhead if overhead else None,
    }


@torch.no_grad()
def standardize_inputs(elastic: ElasticModel, router: DynamicRouter, x: torch.Tensor) -> None:
    """Standardize each router block's input channels on the hidden states that enter its layer when the
    elastic model, at its current configuration, reads x (B, S)."""
    seen: dict[int, torch.Tensor] = {}
    layers = router.input_layers()

    def grab(i: int):
        def pre(_layer, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]  # (B, S, D)
            seen[i] = h.reshape(-1, h.shape[-1])

        return pre

    hooks = [elastic.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        elastic.model(input_ids=x, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    for net, i in enumerate(layers):
        router.standardize(net, seen[i])


@torch.inference_mode()
def router_step_ms(router: LayerRouter, n_layers: int, hidden_size: int, n_targets: int,
                   device: torch.device | str = "cpu") -> float:  # fmt: skip
    """Milliseconds one decode step spends routing, as `flex generate` runs it: every layer's MLP-width
    choice for one token (head counts fixed at prefill, that half of the router skipped) read back to the
    host, where GroupedMLP picks the width's slices. The adaptive latency model's term beside the table's
    (the table times the network at fixed widths, without a router)."""
    x = torch.randn(1, 1, hidden_size, device=device)  # (B=1, S=1, D)
    budget = torch.zeros(1, n_targets, device=device)
    budget[0, 0] = 1.0

    def step() -> None:
        for i in range(n_layers):
            km = router.choose(i, x, budget, heads=False)[0]
            int(km[0, 0])

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    return time_fn(step, sync, TimingPolicy(repeats=9)).ms


def router_overhead_ms(
    elastic: ElasticModel, router: DynamicRouter, table: LatencyTable, n_targets: int
) -> float:
    """The router's own cost per step in `table`'s regime: measured on this device for a PyTorch decode
    table of it (one token per step, the step the table times without a router), else 0 (a prefill
    table's forward routes every token of it at once; another runtime or device runs no router here).
    The adaptive latency model is the table's latency of the choices plus this."""
    r, dev = table.regime, next(elastic.model.parameters()).device
    if (r.runtime, r.device, r.phase) != ("torch", dev.type, "decode"):
        return 0.0
    d = elastic.spec.dims
    return router_step_ms(router, d.num_layers, d.hidden_size, n_targets, dev)


@torch.no_grad()
def eval_dynamic(
    elastic: ElasticModel,
    router: DynamicRouter,
    table: LatencyTable,
    targets: list[float],
    budget_ms: float,
    seqs: torch.Tensor,
    batch: int = 8,
    overhead_ms: float = 0.0,
) -> tuple[float, float]:
    """(held-out mean loss, mean predicted latency) of input-adaptive routing at `budget_ms`.

    Latency per sequence = fixed + sum over layers of the mean over its tokens of entry[mlp_t][heads_seq]
    (+ `overhead_ms`, the router's cost per step of a decode table: router_overhead_ms).
    """
    rt = DynamicRuntime(elastic, router)
    total, count, lat = 0.0, 0, []
    try:
        for b in range(0, seqs.shape[0], batch):
            x = seqs[b : b + batch]
            rt.budget = encode_budget(budget_ms, targets)[None].expand(x.shape[0], -1)
            rt.choices = []
            logits = elastic.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            total += nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
            for s in range(x.shape[0]):
                ms = table.fixed_ms
                for i, (km, kh) in enumerate(rt.choices):
                    ms += sum(table.ms[i][k][int(kh[s])] for k in km[s].tolist()) / km.shape[1]
                lat.append(ms * table.scale + overhead_ms)
    finally:
        rt.close()
    return total / count, sum(lat) / len(lat)


@contextmanager
def gated_outputs(elastic: ElasticModel) -> Iterator[list[list[torch.Tensor | None]]]:
    """Forward hooks that multiply each layer's MLP and attention outputs by gates[i][0] / gates[i][1]
    (None = ungated) while the context is open."""
    mlp_name, attn_name = elastic.arch.mlp, elastic.arch.attention
    gates: list[list[torch.Tensor | None]] = [[None, None] for _ in elastic.layers]

    def gate_hook(i: int, which: int):
        def hook(_m, _inp, out):
            g = gates[i][which]
            if g is None:
                return out
            return (out[0] * g, *out[1:]) if isinstance(out, tuple) else out * g

        return hook

    hooks = [
        getattr(layer, name).register_forward_hook(gate_hook(i, w))
        for i, layer in enumerate(elastic.layers)
        for w, name in ((0, mlp_name), (1, attn_name))
    ]
    try:
        yield gates
    finally:
        for hk in hooks:
            hk.remove()
        elastic.set_config(None)


def route_straight_through(elastic: ElasticModel, gates: list, pm: torch.Tensor, ph: torch.Tensor) -> None:
    """Set the argmax configuration of (L, K) / (L, J) probabilities; gates are 1 in value and carry the
    gradient of the chosen probabilities (straight-through)."""
    spec = elastic.spec
    km, kh = pm.argmax(-1), ph.argmax(-1)
    elastic.set_config(
        [
            (spec.layers[i].mlp[k], spec.layers[i].heads[j])
            for i, (k, j) in enumerate(zip(km.tolist(), kh.tolist()))
        ]
    )
    for i in range(len(gates)):
        sm_, sh_ = pm[i, km[i]], ph[i, kh[i]]
        gates[i][0], gates[i][1] = sm_ / sm_.detach(), sh_ / sh_.detach()


def train_static_direct(
    elastic: ElasticModel,
    table: LatencyTable,
    targets: list[float],
    tokens: torch.Tensor,
    h: RouterHyper,
    rep: Reporter,
) -> tuple[StaticRouter, dict[str, Any]]:
    """The static router trained without the surrogate (ablation): the LM loss of the frozen LLM at the
    router's straight-through argmax configuration on a fresh batch, plus lam * latency_loss, backpropagated
    into the router every step. Same schedules, sizes and seed as `train_static`."""
    model = elastic.model
    router, opt, g = _new_static_router(elastic.spec, targets, h)
    model.requires_grad_(False)
    losses = []
    try:
        with (
            gated_outputs(elastic) as gates,
            rep.task("static router (direct LM loss)", total=h.steps) as task,
        ):
            for step in range(h.steps):
                t = step % len(targets)
                scale = 1 + 9 * step / max(1, h.steps - 1)
                pm, ph = _route(router, t, len(targets), scale, tau_at(step, h.steps, h), g)
                route_straight_through(elastic, gates, pm, ph)
                ce = lm_loss(model, sample_batch(tokens, h.batch_size, h.seq_len, g))
                loss = ce + h.lam * _latency_term(table, pm, ph, targets[t], h)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(ce.item())
                task.advance(1, loss=f"{ce.item():.3f}")
    finally:
        model.requires_grad_(True)
    return router, {
        "steps": h.steps,
        "surrogate": False,
        "final_ce": sum(losses[-20:]) / max(1, len(losses[-20:])),
    }


def train_joint(
    elastic: ElasticModel,
    router: StaticRouter,
    table: LatencyTable,
    targets: list[float],
    tokens: torch.Tensor,
    h: RouterHyper,
    rep: Reporter,
) -> dict[str, Any]:
    """Fine-tune LLM and static router together: CE at the router's argmax configuration, outputs gated
    by the chosen probabilities (straight-through), plus the latency loss; full model with p_full."""
    model = elastic.model
    opt = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": h.joint_lr, "weight_decay": 0.0},
            {"params": router.parameters(), "lr": h.lr},
        ]
    )
    g = torch.Generator().manual_seed(h.seed + 13)
    rng = random.Random(h.seed + 13)
    model.train()
    losses = []
    try:
        with gated_outputs(elastic) as gates, rep.task("joint fine-tuning", total=h.joint_steps) as task:
            for step in range(h.joint_steps):
                x = sample_batch(tokens, h.batch_size, h.seq_len, g)
                if rng.random() < h.p_full:
                    elastic.set_config(None)
                    for gg in gates:
                        gg[0] = gg[1] = None
                    lat_loss = torch.tensor(0.0)
                else:
                    t = step % len(targets)
                    pm, ph = _route(router, t, len(targets), 10.0, h.tau_end, g)
                    route_straight_through(elastic, gates, pm, ph)
                    lat_loss = _latency_term(table, pm, ph, targets[t], h)
                ce = lm_loss(model, x)
                loss = ce + h.lam * lat_loss
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(ce.item())
                task.advance(1, loss=f"{ce.item():.3f}")
    finally:
        model.eval()
    return {"steps": h.joint_steps, "final_ce": sum(losses[-10:]) / max(1, len(losses[-10:]))}
