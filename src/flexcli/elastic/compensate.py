"""Calibration-based compensation at extraction: a damped least-squares refit of the kept columns of
every narrowed output projection (down_proj at a narrowed MLP width, o_proj at fewer heads).

A projection y = W x (W: (out, n)) narrowed to the input columns K drops W[:, ~K] x[~K]. The kept columns
can take over the part of it that correlates with x[K]; on calibration activations of the full model,

    W'_K = argmin_V  E||W x - V x_K||^2 + lam ||V - W_K||^2
         = (W G[:, K] + lam W_K) (G[K, K] + lam I)^-1        G = E[x x^T]   (n, n)
    lam  = damping x mean(diag G[K, K])

(the damping pulls toward the plain slice where the calibration text says little). The refit costs
nothing at inference: the sub-model keeps its shapes and its file format, only W'_K replaces W_K. G is
configuration-independent (the full model's activations), so one calibration pass serves every
budget of an extract run, and at full width (K = all columns) nothing changes.

Measured on SmolLM2-135M prune-only (docs/RESULTS-real.md): uniform 75% (MLP 1152, 6 of 9 heads)
41.8 -> 25.6 held-out code ppl; a constant bias (the removed units' mean contribution) made it worse.
`sequential_overrides` takes G per configuration on the sub-network's own stream instead; on SmolLM2
that was within noise of the parallel refit at about 150 s per sub-model
(docs/results/recovery_training.md), so extraction keeps the parallel one and only bench-recovery uses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..arch.family import Architecture
from ..arch.spec import Config, ElasticSpec
from .evaluate import run_batches
from .runtime import block_output
from .slicing import unit_index

DAMPING = 1e-2
UNITS = ("neuron", "qhead")  # the unit whose columns an output projection loses: down_proj, o_proj
Moments = dict[tuple[int, str], torch.Tensor]  # (layer, unit) -> G = E[x x^T] (n, n) float64


def moments(
    model: nn.Module,
    arch: Architecture,
    seqs: torch.Tensor,
    wanted: set[tuple[int, str]],
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> Moments:
    """E[x x^T] of the input x of each (layer, unit)'s output projection in `wanted`, over the (n, seq_len)
    token sequences `seqs` run through the full `model`."""
    sums: Moments = {}
    layers = model.get_submodule(arch.layers)
    hooks = []
    for i, unit in sorted(wanted):

        def hook(_mod, args, key=(i, unit)):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, n)
            g = (x.T @ x).double()  # fp32 products of one batch, summed in fp64 across batches
            sums[key] = g if key not in sums else sums[key] + g

        tap = layers[i].get_submodule(arch.tap(unit))
        hooks.append(tap.register_forward_pre_hook(hook))
    try:
        n = run_batches(model, seqs, batch_size, on_batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: g / n for k, g in sums.items()}


def moments_bytes(spec: ElasticSpec, wanted: set[tuple[int, str]]) -> int:
    """Memory of `moments` for `wanted`: one (n, n) fp64 matrix per projection (n: its input columns)."""
    d = spec.dims
    cols = {"neuron": d.intermediate_size, "qhead": d.num_heads * d.head_dim}
    return sum(cols[unit] ** 2 * 8 for _, unit in wanted)


def refit(w: torch.Tensor, g: torch.Tensor, keep: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """W'_K for the weight `w` (out, n) narrowed to the columns `keep`, from the input moments `g` (n, n);
    returned in `w`'s dtype."""
    wd = w.double()
    gk = g[keep][:, keep]  # (k, k)
    lam = damping * gk.diagonal().mean()
    rhs = wd @ g[:, keep] + lam * wd[:, keep]  # (out, k)
    a = gk + lam * torch.eye(len(keep), dtype=gk.dtype)
    return torch.linalg.solve(a, rhs.T).T.to(w.dtype)  # a is symmetric: (rhs a^-1)^T = a^-1 rhs^T


def narrowed(spec: ElasticSpec, cfg: Config) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, unit) -> the kept input columns of its output projection, for every projection `cfg`
    narrows (full-width layers refit nothing)."""
    d = spec.dims
    out = {}
    for i, (m, h) in enumerate(cfg):
        if m != d.intermediate_size:
            out[(i, "neuron")] = unit_index(spec, "neuron", m, h)
        if h != d.num_heads:
            out[(i, "qhead")] = unit_index(spec, "qhead", m, h)
    return out


def weight_name(arch: Architecture, layer: int, unit: str) -> str:
    return f"{arch.layers}.{layer}.{arch.tap(unit)}.weight"


class Bank:
    """The refits of one model from its moments `g`, each computed once per (layer, unit, width) and kept
    (rounded to the checkpoint's `stored` dtypes when given): a configuration's compensation is then a
    lookup, for the router's oracle, which asks for hundreds of configurations."""

    def __init__(
        self,
        model: nn.Module,
        arch: Architecture,
        spec: ElasticSpec,
        g: Moments,
        damping: float = DAMPING,
        stored: dict[str, torch.dtype] | None = None,
    ):
        self.model, self.arch, self.spec, self.g = model, arch, spec, g
        self.damping, self.stored = damping, stored
        self.params = dict(model.named_parameters())
        self._refits: dict[tuple[int, str, int], torch.Tensor] = {}
        self._orig: dict[str, torch.Tensor] = {}

    def overrides(self, cfg: Config) -> dict[str, torch.Tensor]:
        """HF weight name -> the refit sliced weight (out, k) of every output projection `cfg` narrows."""
        out = {}
        for (i, unit), keep in narrowed(self.spec, cfg).items():
            name = weight_name(self.arch, i, unit)
            key = (i, unit, cfg[i][0] if unit == "neuron" else cfg[i][1])
            if key not in self._refits:
                w = self._orig.get(name, self.params[name].detach())
                v = refit(w, self.g[(i, unit)], keep, self.damping)
                self._refits[key] = v.to(self.stored[name]) if self.stored else v
            out[name] = self._refits[key]
        return out

    @contextmanager
    def applied(self, cfg: Config) -> Iterator[None]:
        """The model with `cfg`'s refit columns written in, restored afterwards."""
        new = self.overrides(cfg)
        for name in new:
            self._orig.setdefault(name, self.params[name].detach().clone())
        apply(self.model, self.arch, self.spec, cfg, new)
        try:
            yield
        finally:
            with torch.no_grad():
                for name in new:
                    self.params[name].copy_(self._orig[name])


# The last checkpoint's moments, kept in the process: a library user or benchmark that extracts many files
# from one checkpoint (bench-pareto writes about 50) pays its calibration pass once, not per file. One entry
# (SmolLM2: 0.6 GiB of fp64 for all 60 projections); the key names the weights' files and the text exactly.
_kept: dict[tuple, Moments] = {}


def kept_moments(
    model: nn.Module,
    arch: Architecture,
    seqs: torch.Tensor,
    wanted: set[tuple[int, str]],
    weights: object,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Moments, int]:
    """(`moments` for `wanted`, how many of them had to be computed now): those of the model whose weight
    files `weights` identifies (any hashable, e.g. their inodes and mtimes) on the text `seqs` are kept
    from the previous call, and only the projections not kept yet cost a calibration pass."""
    key = (weights, tuple(seqs.shape), hashlib.sha256(seqs.numpy().tobytes()).hexdigest())
    have = _kept.get(key, {})
    missing = wanted - have.keys()
    if missing:
        have = {**have, **moments(model, arch, seqs, missing, on_batch=on_batch)}
        _kept.clear()
        _kept[key] = have
    return {k: have[k] for k in wanted}, len(missing)


def calibrated_bank(
    model: nn.Module,
    arch: Architecture,
    spec: ElasticSpec,
    seqs: torch.Tensor,
    wanted: set[tuple[int, str]],
    stored: dict[str, torch.dtype] | None = None,
    on_batch: Callable[[int], None] | None = None,
    weights: object = None,
) -> Bank:
    """A Bank for the (layer, unit) projections `wanted`, from one calibration pass over `seqs`; refits
    rounded to the checkpoint's `stored` dtypes (so a reference built with `apply` holds exactly what a
    file holds). With `weights` (what identifies the model's weight files), the moments are kept for the
    next call on the same weights and text (`kept_moments`)."""
    if not wanted:
        g = {}
    elif weights is None:
        g = moments(model, arch, seqs, wanted, on_batch=on_batch)
    else:
        g, _ = kept_moments(model, arch, seqs, wanted, weights, on_batch)
    return Bank(model, arch, spec, g, stored=stored)


@torch.no_grad()
def apply(
    model: nn.Module, arch: Architecture, spec: ElasticSpec, cfg: Config, new: dict[str, torch.Tensor]
) -> None:
    """Write refit columns into `model`'s full weights in place, so the elastic model at `cfg` computes
    the compensated sub-model (the reference an extracted file is verified against)."""
    params = dict(model.named_parameters())
    for (i, unit), keep in narrowed(spec, cfg).items():
        name = weight_name(arch, i, unit)
        if name in new:
            params[name][:, keep] = new[name].to(params[name].dtype)


class _Stop(Exception):
    pass


@torch.no_grad()
def _block_inputs(model: nn.Module, arch: Architecture, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(hidden state entering the first decoder block, the other arguments every block gets) for input ids
    `x`, without running any block."""
    got: dict = {}

    def pre(_mod, args, kw):
        got["h"] = args[0] if args else kw["hidden_states"]
        got["kw"] = {k: v for k, v in kw.items() if k != "hidden_states"}
        raise _Stop

    h = model.get_submodule(arch.layers)[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(input_ids=x, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return got["h"], got["kw"]


@contextmanager
def _capture(taps: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """unit -> the (tokens, n) input of its projection in the latest forward."""
    xs: dict[str, torch.Tensor] = {}
    hooks = [
        tap.register_forward_pre_hook(lambda _m, a, u=u: xs.__setitem__(u, a[0].reshape(-1, a[0].shape[-1])))
        for u, tap in taps.items()
    ]
    try:
        yield xs
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def sequential_overrides(elastic, cfg: Config, seqs: torch.Tensor, batch_size: int = 4,
                         damping: float = DAMPING) -> dict[str, torch.Tensor]:  # fmt: skip
    """Refits of `cfg`'s narrowed output projections from moments of the sub-network's own stream: block
    i's G = E[x x^T] is taken on the input the compensated sub-network gives it (blocks < i narrowed and
    refit; o_proj before down_proj, whose input depends on it), with every unit of the projection
    computed, then `refit` as the parallel bank does. `calibrated_bank` takes every G on the full
    model's stream, once for all configurations. About three forwards of `seqs` per configuration; the
    model is left as it was. Returns HF weight name -> (out, k), as Bank.overrides.
    """
    model, arch, spec = elastic.model, elastic.arch, elastic.spec
    full = (spec.dims.intermediate_size, spec.dims.num_heads)
    cut = narrowed(spec, cfg)
    params = dict(model.named_parameters())
    batches = [_block_inputs(model, arch, seqs[b : b + batch_size]) for b in range(0, len(seqs), batch_size)]
    kws = [kw for _, kw in batches]
    h_sub = [h for h, _ in batches]  # the compensated sub-network's stream, block by block
    orig: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    old = elastic.config
    try:
        for i, layer in enumerate(model.get_submodule(arch.layers)):
            units = [u for u in ("qhead", "neuron") if (i, u) in cut]
            taps = {u: layer.get_submodule(arch.tap(u)) for u in units}
            for u in units:
                keep, name = cut[(i, u)], weight_name(arch, i, u)
                # the block at cfg but with u at full width: every unit's activation on the sub-network's
                # own stream (the kept ones are what the sub-network computes)
                elastic.set_layer(i, *[full[j] if (u == "neuron") == (j == 0) else cfg[i][j] for j in (0, 1)])
                g = None
                with _capture({u: taps[u]}) as xs:
                    for b, h in enumerate(h_sub):
                        layer(h, **kws[b])
                        x = xs[u].double()  # (tokens, n)
                        g = x.T @ x if g is None else g + x.T @ x  # (n, n)
                w = params[name]
                orig[name] = w.detach().clone()
                v = refit(orig[name], g, keep, damping)
                w[:, keep] = v
                out[name] = v
            elastic.set_layer(i, *cfg[i])
            h_sub = [block_output(layer(h, **kws[b])) for b, h in enumerate(h_sub)]
    finally:
        elastic.set_config(old)
        for n, w in orig.items():
            params[n].copy_(w)
    return out
