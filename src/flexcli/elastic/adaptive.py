"""The input-adaptive runtime: per-token MLP widths and per-sequence head counts, executed for real.

A pre-hook on every decoder layer asks the router for that layer's choices from the hidden state
entering it. The MLP then runs tokens sorted and grouped by width (``flexcli.kernels.grouped_linear``: one dense
prefix GEMM per width, or one grouped Triton launch); attention runs sequences grouped by head count through
transformers' own attention module with the matching head selection. In "soft" mode (training) the
Gumbel-softmax probabilities are recorded and multiplied into the outputs by straight-through gating.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from flexcli.kernels import grouped_linear, subset_linear

from .runtime import ElasticModel


def _index_batch(v: Any, idx: torch.Tensor, batch: int) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return v.index_select(0, idx)
    if isinstance(v, tuple):
        return tuple(_index_batch(x, idx, batch) for x in v)
    return v


def _put(m: nn.Module, **state: Any) -> None:
    """Per-step routing state into a wrapper module's own attributes, bypassing nn.Module.__setattr__
    (its parameter / buffer / module checks, four times per layer and decode step, were a visible share
    of a SmolLM2 decode step); the values are plain attributes, never parameters, buffers or modules."""
    m.__dict__.update(state)


class LayerRouter(Protocol):
    """What the runtime needs from an input-adaptive router (router.models.DynamicRouter): the router
    decides, the runtime executes."""

    def choose(self, layer: int, x: torch.Tensor, budget: torch.Tensor, tau: float | None = None,
               g: torch.Generator | None = None, heads: bool = True,
               scale: float = 1.0) -> tuple[torch.Tensor, Any, Any, Any]: ...  # fmt: skip


class GroupedMLP(nn.Module):
    """Runs the wrapped SwiGLU MLP with a width per token (tokens grouped by width)."""

    def __init__(self, mlp: nn.Module, choices: list[int], roles: dict[str, str]):
        super().__init__()
        self.inner, self.choices = mlp, choices
        # the gate / up / down projections inside the MLP module (from the family descriptor)
        self.proj = tuple(
            mlp.get_submodule(roles[r]) for r in ("gate", "up", "down")
        )  # a tuple: not re-registered
        self.token_choice: torch.Tensor | None = None  # (B, S) choice index, None = full width
        self.gate: torch.Tensor | None = None  # (B, S) straight-through factor (1 in value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, D)
        if self.token_choice is None:
            return self.inner(x)
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        choice = self.token_choice.reshape(-1)
        gate, up, down = self.proj
        if choice.numel() == 1:  # decode, one token: its width's prefix GEMMs, nothing to sort or regroup
            w = self.choices[int(choice[0])]
            h = self.inner.act_fn(subset_linear(flat, gate.weight, gate.bias, w)) * subset_linear(
                flat, up.weight, up.bias, w
            )  # (1, w)
            out = subset_linear(h, down.weight, down.bias, None, w).view_as(x)
            return out if self.gate is None else out * self.gate[..., None]
        order = torch.argsort(choice, stable=True)  # rows grouped by width
        ks, counts = torch.unique_consecutive(choice[order], return_counts=True)
        starts = [0] + torch.cumsum(counts, 0)[:-1].tolist()
        widths = [self.choices[k] for k in ks.tolist()]
        xs = flat.index_select(0, order)  # (N, D), sorted
        h = self.inner.act_fn(
            grouped_linear(xs, gate.weight, gate.bias, starts, widths, "out")
        ) * grouped_linear(xs, up.weight, up.bias, starts, widths, "out")  # (N, max width)
        ys = grouped_linear(h, down.weight, down.bias, starts, widths, "in")  # (N, D)
        out = torch.empty_like(flat).index_copy(0, order, ys).view_as(x)
        return out if self.gate is None else out * self.gate[..., None]


class GroupedAttention(nn.Module):
    """Runs the wrapped attention with a head count per sequence (sequences grouped by head count)."""

    def __init__(self, attn: nn.Module, elastic: ElasticModel, layer: int, choices: list[int]):
        super().__init__()
        self.inner, self.elastic, self.layer, self.choices = attn, [elastic], layer, choices
        self.seq_choice: torch.Tensor | None = None  # (B,) choice index
        self.gate: torch.Tensor | None = None  # (B,)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.seq_choice is None:
            return self.inner(hidden_states, *args, **kwargs)
        el, b = self.elastic[0], hidden_states.shape[0]
        if b == 1:  # one sequence (decode): nothing to group, select or copy back
            el.set_layer(self.layer, heads=self.choices[int(self.seq_choice[0])])
            y = self.inner(hidden_states, *args, **kwargs)[0]
            el.set_layer(self.layer, heads=el.config[self.layer][1])
            return (y if self.gate is None else y * self.gate[:, None, None]), None
        out = torch.zeros_like(hidden_states)
        for j in torch.unique(self.seq_choice).tolist():
            idx = (self.seq_choice == j).nonzero().squeeze(1)
            el.set_layer(self.layer, heads=self.choices[j])
            sub_args = [_index_batch(a, idx, b) for a in args]
            sub_kw = {k: _index_batch(v, idx, b) for k, v in kwargs.items()}
            y = self.inner(hidden_states.index_select(0, idx), *sub_args, **sub_kw)[0]
            out = out.index_copy(0, idx, y)
        el.set_layer(self.layer, heads=el.config[self.layer][1])
        if self.gate is not None:
            out = out * self.gate[:, None, None]
        return out, None


class DynamicRuntime:
    """Attach an input-adaptive router to an elastic model (detach with `close`)."""

    def __init__(self, elastic: ElasticModel, router: LayerRouter):
        self.elastic, self.router = elastic, router
        spec = elastic.spec
        self.mlp_choices, self.head_choices = spec.layers[0].mlp, spec.layers[0].heads
        arch = elastic.arch
        mlp_name, attn_name = arch.mlp, arch.attention
        roles = {r: path.removeprefix(mlp_name + ".") for r, path in arch.mlp_roles.items()}
        self.budget: torch.Tensor | None = None  # (B, n_targets)
        self.soft = False
        self.tau = 1.0
        self.scale = 1.0  # soft mode: the router's logits x this before sampling (router.choose)
        self.generator: torch.Generator | None = None
        self.records: list[
            tuple[torch.Tensor, torch.Tensor]
        ] = []  # soft mode: (pi_mlp (B,S,K), pi_heads (B,J))
        self.choices: list[
            tuple[torch.Tensor, torch.Tensor]
        ] = []  # (token choice (B,S), sequence choice (B,))
        self._fixed: list[torch.Tensor] | None = None  # see fixed_heads
        self._heads_in_layers = False
        self._config = elastic.config  # restored by close once fixed heads were written into the layers
        self._restore, self._hooks, self._wrappers = [], [], []
        for i, layer in enumerate(elastic.layers):
            mlp, attn = getattr(layer, mlp_name), getattr(layer, attn_name)
            self._restore.append((layer, mlp_name, mlp, attn_name, attn))
            self._wrappers.append(
                (
                    GroupedMLP(mlp, self.mlp_choices, roles),
                    GroupedAttention(attn, elastic, i, self.head_choices),
                )
            )
        self._wrap()
        # lookahead decode (see fixed_heads): one hook at the router's source layer sets every layer's
        # width in the elastic projections, the layers run unwrapped, as the static path's do
        self._source: int | None = getattr(router, "source", None)
        self._direct: list[torch.Tensor] | None = None  # layers before the source: their budget's choice

    def _wrap(self) -> None:
        """Wrappers in the layers and a routing pre-hook on each (the general path: any batch, any router)."""
        for i, ((layer, mn, _, an, _), (gm, ga)) in enumerate(zip(self._restore, self._wrappers)):
            setattr(layer, mn, gm)
            setattr(layer, an, ga)
            self._hooks.append(layer.register_forward_pre_hook(self._hook(i, gm, ga), with_kwargs=True))

    def _unwrap(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer, mn, mlp, an, attn in self._restore:
            setattr(layer, mn, mlp)
            setattr(layer, an, attn)

    @property
    def fixed_heads(self) -> list[torch.Tensor] | None:
        """Decode with a KV cache: the head counts chosen at prefill, (B,) per layer, kept for every later
        step (a layer's cached keys and values have the heads they were computed with). For one
        sequence they are written into the elastic layers once, so a decode step's attention runs as
        the static path's does, without switching heads in and out per layer and step."""
        return self._fixed

    @fixed_heads.setter
    def fixed_heads(self, heads: list[torch.Tensor] | None) -> None:
        self._fixed = heads
        self._heads_out_of_layers()
        if heads is not None and not self.soft and all(kh.numel() == 1 for kh in heads):
            for i, kh in enumerate(heads):
                self.elastic.set_layer(i, heads=self.head_choices[int(kh[0])])
            self._heads_in_layers = True

    def lookahead_decode(self) -> bool:
        """After `fixed_heads` for one sequence, with a lookahead router: decode one token per forward
        from here on (until fixed_heads is set again), the way the static path runs. The 30 per-layer
        hooks and wrappers, which cost a SmolLM2 decode step 4-5% more than the same widths run
        statically (measured in alternation), give way to one hook at the source layer that asks the
        router for every layer's width and writes it into the layers' elastic projections; the layers
        before the source get their budget's choice (input-independent) once, here. False (nothing
        changed) where it does not apply: a per-layer router, or heads not fixed for one sequence."""
        if (
            self._source is None
            or not self._heads_in_layers
            or self.budget is None
            or self._direct is not None
        ):
            return self._direct is not None
        self._unwrap()
        dev = next(self.elastic.model.parameters()).device
        src, budget = self._source, self.budget.to(dev)
        x0 = torch.zeros(1, 1, self.elastic.spec.dims.hidden_size, device=dev)  # not read before the source
        self._direct = [self.router.choose(i, x0, budget, heads=False)[0] for i in range(src)]
        for i, km in enumerate(self._direct):
            self.elastic.set_mlp(i, self.mlp_choices[int(km[0, 0])])

        def pre(_layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # (1, 1, D)
            if x.shape[1] != 1:
                raise RuntimeError("lookahead decode runs one token per forward; set fixed_heads again first")
            for i in range(len(self.elastic.layers)):
                if i < src:
                    km = self._direct[i]
                else:
                    km = self.router.choose(i, x.detach(), self.budget.to(dev), heads=False)[0]
                    self.elastic.set_mlp(i, self.mlp_choices[int(km[0, 0])])
                self.choices.append((km, self._fixed[i]))

        self._hooks.append(self.elastic.layers[src].register_forward_pre_hook(pre, with_kwargs=True))
        return True

    def _hook(self, i: int, gm: GroupedMLP, ga: GroupedAttention):
        def pre(_layer, args, kwargs):
            if self.budget is None:
                _put(gm, token_choice=None, gate=None)
                _put(ga, seq_choice=None, gate=None)
                return
            x = args[0] if args else kwargs["hidden_states"]  # (B, S, D)
            budget = self.budget.to(x.device)
            # decode: the head counts chosen at prefill, the head half of the router not asked
            fixed = self.fixed_heads is not None and not self.soft
            km, kh, pm, ph = self.router.choose(
                i,
                x.detach(),
                budget,
                self.tau if self.soft else None,
                self.generator,
                heads=not fixed,
                scale=self.scale,
            )
            if pm is not None:  # soft: straight-through gates carry the chosen probabilities' gradient
                self.records.append((pm, ph))
                sel_m = pm.gather(-1, km[..., None]).squeeze(-1)
                sel_h = ph.gather(-1, kh[..., None]).squeeze(-1)
                _put(gm, gate=(sel_m / sel_m.detach()).to(x.dtype))
                _put(ga, gate=(sel_h / sel_h.detach()).to(x.dtype))
            else:
                _put(gm, gate=None)
                _put(ga, gate=None)
            if self._fixed is not None:
                kh = self._fixed[i]
            _put(gm, token_choice=km)
            _put(ga, seq_choice=None if self._heads_in_layers else kh)  # in the layer already: pass through
            self.choices.append((km, kh))

        return pre

    def _heads_out_of_layers(self, rewrap: bool = True) -> None:
        """The elastic model's configuration as it was before fixed heads (and lookahead decode's widths)
        were written into its layers; the general path's wrappers and hooks back in place (`rewrap`)."""
        if self._direct is not None:
            self._unwrap()
            if rewrap:
                self._wrap()
            self._direct = None
        if self._heads_in_layers:
            self.elastic.set_config(self._config)
            self._heads_in_layers = False

    def close(self) -> None:
        self._heads_out_of_layers(rewrap=False)  # fixed_heads stays readable
        self._unwrap()


class SoftRuntime:
    """Input-adaptive routing for training, as expected outputs: the full-width model in which, per token,
    MLP neuron n is scaled by P(the token's width keeps n) before down_proj and, per sequence, query head
    h's attention output by P(the head count keeps h) before o_proj.

    Nested widths make this the exact mixture over the choice distribution of what each width feeds its
    output projection, in one full-width forward, differentiable in every probability (straight-through
    gates on the sampled choice see one width only, and nothing says a wider one would be better)."""

    def __init__(self, elastic: ElasticModel, router: LayerRouter):
        self.elastic, self.router = elastic, router
        spec, arch, d = elastic.spec, elastic.arch, elastic.spec.dims
        self.budget: torch.Tensor | None = None  # (B, n_targets)
        self.tau = 1.0
        self.scale = 1.0  # the router's logits x this before sampling (router.choose)
        self.generator: torch.Generator | None = None
        self.hard = False  # straight-through one-hot forward (see _route)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pi_mlp (B,S,K), pi_heads (B,J))
        self._old = elastic.config
        elastic.set_config(None)
        dev = next(elastic.model.parameters()).device  # the masks live there, not moved per call
        self._hooks = []
        for i, layer in enumerate(elastic.layers):
            ls = spec.layers[i]
            m_mask = (
                (torch.arange(d.intermediate_size)[None] < torch.tensor(ls.mlp)[:, None]).float().to(dev)
            )  # (K, I)
            h_mask = torch.zeros(len(ls.heads), d.num_heads)
            for j, h in enumerate(ls.heads):
                h_mask[j, spec.head_index(h)[0]] = 1.0
            h_mask = h_mask.repeat_interleave(d.head_dim, dim=1).to(dev)  # (J, H * head_dim)
            slot: dict[str, torch.Tensor] = {}
            self._hooks += [
                layer.register_forward_pre_hook(self._route(i, slot), with_kwargs=True),
                layer.get_submodule(arch.tap("neuron")).register_forward_pre_hook(
                    self._scale(slot, "m", m_mask)
                ),
                layer.get_submodule(arch.tap("qhead")).register_forward_pre_hook(
                    self._scale(slot, "h", h_mask)
                ),
            ]

    def _route(self, i: int, slot: dict):
        def pre(_layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # (B, S, D)
            km, kh, pm, ph = self.router.choose(
                i, x.detach(), self.budget.to(x.device), self.tau, self.generator, scale=self.scale
            )
            if self.hard:  # straight-through: the forward runs the sampled widths, the gradient the mixture's
                pm = pm + (nn.functional.one_hot(km, pm.shape[-1]).to(pm.dtype) - pm).detach()
                ph = ph + (nn.functional.one_hot(kh, ph.shape[-1]).to(ph.dtype) - ph).detach()
            slot["m"], slot["h"] = pm, ph[:, None, :]  # (B, S, K), (B, 1, J)
            self.records.append((pm, ph))

        return pre

    @staticmethod
    def _scale(slot: dict, key: str, mask: torch.Tensor):
        def pre(_mod, args):
            p = slot[key]
            return (args[0] * (p @ mask).to(args[0].dtype),)  # (B, S, I) or (B, S, H*hd)

        return pre

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.elastic.set_config(self._old)
