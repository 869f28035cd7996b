"""Routers: shapes, budget interpolation, SM training and static-router budget adherence on a synthetic
latency table, the full budget, and the input-adaptive runtime against a per-token reference."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_model, rel_err
from transformers import AutoModelForCausalLM

from flexcli.arch import Dims, detect
from flexcli.arch.spec import ElasticSpec
from flexcli.elastic.adaptive import DynamicRuntime
from flexcli.elastic.runtime import ElasticModel
from flexcli.errors import UsageError
from flexcli.latency.table import LatencyTable, Regime
from flexcli.plan.budget import parse_budget, parse_budgets
from flexcli.progress import Reporter
from flexcli.router.models import DynamicRouter, StaticRouter, Surrogate, encode_budget, static_config
from flexcli.router.store import load_router
from flexcli.router.surrogate import sample_config, sm_spearman, spearman, warm_up_surrogate
from flexcli.router.training import RouterHyper, train_static


def test_budget_parsing():
    assert parse_budget("40ms").value == 40 and parse_budget("0.04s").value == pytest.approx(40)
    assert parse_budget("60%").kind == "fraction" and parse_budget("60%").value == 0.6
    assert parse_budget("3.5B").value == 3.5e9 and parse_budget("3500M").value == 3.5e9
    assert [b.value for b in parse_budgets("30ms, 40ms,60%")] == [30, 40, 0.6]
    for bad in ("40", "ms", "-3ms", "40 parsecs", "150%", ""):
        with pytest.raises(UsageError):
            parse_budgets(bad)


def test_budget_encoding_interpolates():
    targets = [10.0, 20.0, 40.0]
    assert encode_budget(20.0, targets).tolist() == [0, 1, 0]
    assert encode_budget(30.0, targets).tolist() == pytest.approx([0, 0.5, 0.5])
    assert encode_budget(5.0, targets).tolist() == [1, 0, 0]
    assert encode_budget(99.0, targets).tolist() == [0, 0, 1]


def test_router_shapes():
    r = StaticRouter(3, 4, 7, 4)
    lm, lh = r(torch.eye(3))
    assert lm.shape == (3, 4, 7) and lh.shape == (3, 4, 4)
    d = DynamicRouter(3, 4, 64, 7, 4)
    tm, sh = d.layer_logits(1, torch.randn(2, 5, 64), torch.eye(3)[:2])
    assert tm.shape == (2, 5, 7) and sh.shape == (2, 4)
    assert Surrogate(4 * 11)(torch.rand(5, 44)).shape == (5,)


def _synthetic():
    """4 layers; latency linear in width; 'loss' falls with width, more in early layers."""
    dims = Dims(4, 64, 256, 8, 8, 8, 100, False)
    spec = ElasticSpec.build(
        "llama", dims, [1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25], [1, 0.75, 0.5, 0.25], 32, "group"
    )
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    ms = [[[0.02 * m / 32 + 0.1 * h for h in heads] for m in mlp] for _ in range(4)]
    table = LatencyTable(
        Regime("cpu", "synthetic", "float32", 1, 16, "prefill", 0), {}, 0.5, [mlp] * 4, [heads] * 4, ms
    )
    weight = [1.0, 0.7, 0.5, 0.3]

    def oracle(cfg):
        return 3.0 + sum(w * (1 - m / 256) + 0.5 * w * (1 - h / 8) for w, (m, h) in zip(weight, cfg))

    return spec, table, oracle


def test_sm_learns_and_static_router_meets_budgets():
    torch.manual_seed(0)  # the surrogate's initialisation; router training itself is seeded by RouterHyper
    spec, table, oracle = _synthetic()
    rng = random.Random(0)
    # the production warm-up (train-router's): 256 sampled configurations, then 600 fitting steps
    h = RouterHyper()
    sm = warm_up_surrogate(
        spec, oracle, h.sm_warmup, h.sm_lr, rng, torch.Generator().manual_seed(0), Reporter()
    )
    assert len(sm.ys) == 256
    held = [sample_config(spec, rng) for _ in range(48)]
    assert sm_spearman(sm, spec, held, [oracle(c) for c in held]) >= 0.8

    full = table.full_ms()
    targets = [0.45 * full, 0.6 * full, 0.8 * full]
    router, stats = train_static(spec, table, targets, oracle, sm, RouterHyper(steps=400), Reporter())
    assert stats["router_updates"] > 0
    for t in targets:
        lat = table.predict(static_config(router, spec, targets, t))
        assert lat <= 1.05 * t, (t, lat)
        assert lat >= 0.95 * t, (t, lat)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.fixture
def tiny_elastic(tmp_path, tokenizer_dir):
    path = make_model(tmp_path / "m", tokenizer_dir, "llama", 8, 4, hidden=64, layers=3, inter=128)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config.to_dict()
    spec = ElasticSpec.build(
        "llama", Dims.from_config(cfg), [1, 0.75, 0.5, 0.25], [1, 0.5, 0.25], 32, "group"
    )
    return ElasticModel(model, detect(cfg), spec)


def _masked_reference(el: ElasticModel, x, choices):
    """Per-token MLP width / per-sequence heads by masking intermediate activations and head outputs."""
    spec, d = el.spec, el.spec.dims
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    hooks = []
    for i, layer in enumerate(el.layers):
        km, kh = choices[i]
        widths = torch.tensor(mlp)[km]  # (B, S)
        nmask = (torch.arange(d.intermediate_size)[None, None, :] < widths[..., None]).float()
        hcount = torch.tensor(heads)[kh]  # (B,)
        hmask = (
            (torch.arange(d.num_heads)[None, :] < hcount[:, None]).float().repeat_interleave(d.head_dim, -1)
        )
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, nm=nmask: (a[0] * nm,)))
        hooks.append(
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, hm=hmask: (a[0] * hm[:, None, :],))
        )
    try:
        with torch.no_grad():
            return el.model(input_ids=x).logits
    finally:
        for h in hooks:
            h.remove()


def test_input_adaptive_runtime_equals_per_token_reference(tiny_elastic):
    el = tiny_elastic
    spec = el.spec
    torch.manual_seed(0)
    router = DynamicRouter(
        2,
        spec.dims.num_layers,
        spec.dims.hidden_size,
        len(spec.layers[0].mlp),
        len(spec.layers[0].heads),
        init_std=1.0,
    )
    x = torch.randint(0, spec.dims.vocab_size, (3, 11))
    rt = DynamicRuntime(el, router)
    rt.budget = torch.tensor([[1.0, 0.0]]).expand(3, -1)
    with torch.no_grad():
        got = el.model(input_ids=x, use_cache=False).logits
    choices = list(rt.choices)
    rt.close()
    assert len(choices) == spec.dims.num_layers
    assert any(len(torch.unique(km)) > 1 for km, _ in choices)  # really mixed widths within a batch
    want = _masked_reference(el, x, choices)
    assert rel_err(got, want) <= 1e-5
    with torch.no_grad():  # closed: back to the plain elastic model
        assert (
            rel_err(
                el.model(input_ids=x).logits,
                _masked_reference(
                    el, x, [(torch.zeros(3, 11, dtype=torch.long), torch.zeros(3, dtype=torch.long))] * 3
                ),
            )
            <= 1e-6
        )


def test_train_router_cli_end_to_end(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    from typer.testing import CliRunner

    from flexcli.cli import app
    from flexcli.commands.convert import ConvertOptions, convert
    from flexcli.latency.table import save_table

    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 4, hidden=64, layers=2, inter=128)
    el = convert(
        str(src),
        ConvertOptions(
            calib=str(calib_file), calib_samples=2, seq_len=32, device="cpu", output=tmp_path / "el"
        ),
    ).output
    spec = ElasticSpec.from_dict(json.loads((tmp_path / "el" / "flex_elastic.json").read_text())["spec"])
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    table = LatencyTable(
        Regime("cpu", "synthetic", "float32", 1, 16, "prefill", 0),
        {},
        0.2,
        [mlp] * 2,
        [heads] * 2,
        [[[0.01 * m / 16 + 0.1 * h for h in heads] for m in mlp]] * 2,
    )
    save_table(tmp_path / "el", table)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train-router",
            el,
            "--budgets",
            "50%,80%,100%",
            "--steps",
            "40",
            "--dynamic-steps",
            "8",
            "--sm-warmup",
            "16",
            "--seq-len",
            "32",
            "--data",
            str(calib_file),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {
        "budget_ms",
        "lut_latency_ms",
        "ppl",
        "uniform_ppl",
        "dynamic_ppl",
        "dynamic_mean_latency_ms",
    } <= set(doc["budgets"][0])
    assert "sm_spearman" in doc
    assert doc["compensated"] is False  # plain slices unless --compensate
    full = doc["budgets"][-1]
    assert [c["mlp"] for c in full["config"]] == [mlp[0]] * 2  # 100% is the full model exactly
    assert (tmp_path / "el" / "flex_routers.safetensors").exists()
    dyn, _ = load_router(tmp_path / "el", "dynamic", doc["regime"])
    assert dyn.source == 1  # the default: the lookahead router at layer 1 (results/adaptive_perlayer.md)
    comp = runner.invoke(
        app,
        ["train-router", el, "--budgets", "50%", "--no-dynamic", "--steps", "5", "--sm-warmup", "8",
         "--seq-len", "32", "--data", str(calib_file), "--compensate", "--json"],
    )  # fmt: skip
    assert comp.exit_code == 0, comp.stderr
    assert json.loads(comp.stdout)["compensated"] is True  # as extract writes them (test_compensate)
    low = runner.invoke(app, ["train-router", el, "--budgets", "0.001ms"])
    assert low.exit_code == 3 and "smallest" in low.stderr
    bad = runner.invoke(app, ["train-router", el, "--budgets", "40"])
    assert bad.exit_code == 2 and "unit" in bad.stderr
    missing = runner.invoke(app, ["train-router", el, "--regime", "cuda"])
    assert missing.exit_code == 2 and "flex profile" in missing.stderr
    far = runner.invoke(app, ["train-router", el, "--dynamic-source", "2"])  # 2 layers: 0-1
    assert far.exit_code == 2 and "0-1" in far.stderr and len(far.stderr.strip().splitlines()) == 1
    word = runner.invoke(app, ["train-router", el, "--dynamic-source", "first"])
    assert word.exit_code == 2 and "each" in word.stderr and len(word.stderr.strip().splitlines()) == 1


class _FixedRouter:
    """A LayerRouter with given per-layer choices, returned as one-hot probabilities."""

    def __init__(self, choices, K: int, J: int):
        self.choices, self.K, self.J = choices, K, J

    def choose(self, layer, x, budget, tau=None, g=None, heads=True, scale=1.0):
        km, kh = self.choices[layer]
        pm, ph = (
            torch.nn.functional.one_hot(km, self.K).float(),
            torch.nn.functional.one_hot(kh, self.J).float(),
        )
        return km, kh, (pm if tau is not None else None), (ph if tau is not None else None)


def test_soft_runtime_at_one_hot_choices_is_the_hard_per_token_model(tiny_elastic):
    """The training runtime (expected outputs over the width distribution) equals real per-token widths
    when the distribution is one choice, and its mixture is differentiable in every probability."""
    from flexcli.elastic.adaptive import SoftRuntime

    el, spec = tiny_elastic, tiny_elastic.spec
    K, J, L = len(spec.layers[0].mlp), len(spec.layers[0].heads), spec.dims.num_layers
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, spec.dims.vocab_size, (3, 11), generator=g)
    choices = [
        (torch.randint(0, K, (3, 11), generator=g), torch.randint(0, J, (3,), generator=g)) for _ in range(L)
    ]
    rt = SoftRuntime(el, _FixedRouter(choices, K, J))
    rt.budget = torch.zeros(3, 2)
    with torch.no_grad():
        got = el.model(input_ids=x, use_cache=False).logits
    rt.close()
    assert rel_err(got, _masked_reference(el, x, choices)) <= 1e-5

    torch.manual_seed(0)
    router = DynamicRouter(2, L, spec.dims.hidden_size, K, J)  # default init: probabilities not saturated
    rt = SoftRuntime(el, router)
    rt.budget, rt.tau = torch.tensor([[1.0, 0.0]]).expand(3, -1), 1.0
    el.model.requires_grad_(False)
    el.model(input_ids=x, use_cache=False).logits.square().mean().backward()
    rt.close()
    el.model.requires_grad_(True)
    for i in range(L):  # the LM's gradient reaches every layer's MLP and head router
        assert router.mlp[i][-1].weight.grad.abs().sum() > 0 and router.att[i][-1].weight.grad.abs().sum() > 0

    # straight-through (training's default): the forward is the sampled widths' hard model, exactly
    rt = SoftRuntime(el, router)
    rt.budget, rt.tau, rt.hard, rt.generator = torch.tensor([[0.0, 1.0]]).expand(3, -1), 1.0, True, g
    with torch.no_grad():
        got = el.model(input_ids=x, use_cache=False).logits
    sampled = [(pm.argmax(-1), ph.argmax(-1)) for pm, ph in rt.records]
    rt.close()
    assert any(len(torch.unique(km)) > 1 for km, _ in sampled)
    assert rel_err(got, _masked_reference(el, x, sampled)) <= 1e-5


def test_input_adaptive_router_follows_its_budgets(tiny_elastic):
    """train-router's input-adaptive path (started at the static router's choices, then trained on the LM
    loss, the defaults): its held-out mean latency lands near each target and grows with it."""
    from flexcli.router.surrogate import LossOracle
    from flexcli.router.training import eval_dynamic, train_dynamic

    el, spec = tiny_elastic, tiny_elastic.spec
    mlp, heads = spec.layers[0].mlp, spec.layers[0].heads
    L = spec.dims.num_layers
    table = LatencyTable(
        Regime("cpu", "synthetic", "float32", 1, 16, "prefill", 0), {}, 0.5, [mlp] * L, [heads] * L,
        [[[m / mlp[0] + 0.5 * h / heads[0] for h in heads] for m in mlp]] * L,
    )  # fmt: skip
    full = table.full_ms()
    targets = [0.55 * full, 0.8 * full]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.dims.vocab_size, (4000,), generator=g)
    h = RouterHyper(steps=150, sm_warmup=32, dynamic_steps=60, batch_size=4, seq_len=16)
    torch.manual_seed(0)
    oracle = LossOracle(el, tokens[:128].view(8, 16))
    sm = warm_up_surrogate(spec, oracle, h.sm_warmup, h.sm_lr, random.Random(0), g, Reporter())
    static, _ = train_static(spec, table, targets, oracle, sm, h, Reporter())
    router, stats = train_dynamic(el, table, targets, tokens, sm, h, Reporter(), static=static)
    assert stats["router_updates"] == 60 and stats["method"] == "direct" and stats["started_from_static"]
    seqs = tokens[:256].view(16, 16)
    lat = [eval_dynamic(el, router, table, targets, t, seqs)[1] for t in targets]
    assert lat[0] < lat[1]
    for got, want in zip(lat, targets):
        assert abs(got / want - 1) <= 0.1, (lat, targets)


@pytest.mark.parametrize("source", [None, 1], ids=["per-layer", "lookahead"])
def test_router_inputs_are_standardized_on_the_hidden_states_entering_their_layers(tiny_elastic, source):
    """standardize_inputs reads what enters each block's layer (transformers' hidden_states[i] is layer
    i's input), the block then sees those channels at mean 0 and unit spread, and one outlier channel
    in the residual stream no longer sets every token's logits."""
    from flexcli.router.training import standardize_inputs

    el, spec = tiny_elastic, tiny_elastic.spec
    L, D = spec.dims.num_layers, spec.dims.hidden_size
    torch.manual_seed(0)
    d = DynamicRouter(2, L, D, len(spec.layers[0].mlp), len(spec.layers[0].heads), source=source)
    x = torch.randint(0, spec.dims.vocab_size, (4, 24))
    standardize_inputs(el, d, x)
    with torch.no_grad():
        hs = el.model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    for net, i in enumerate(d.input_layers()):
        h = hs[i].reshape(-1, D)
        assert torch.allclose(d.in_shift[net], h.mean(0), atol=1e-5)
        z = (h - d.in_shift[net]) * d.in_scale[net]
        assert torch.allclose(z.std(0), torch.ones(D), atol=1e-3)
    # a channel 1000x the others, the same in every token: raw, it drowns what tells tokens apart
    d2 = DynamicRouter(1, 1, 8, 3, 2)
    xs = torch.randn(1, 64, 8)
    xs[..., 0] = 1000.0 + 0.01 * torch.randn(1, 64)
    b = torch.ones(1, 1)
    raw = d2.layer_logits(0, xs, b)[0].argmax(-1)
    d2.standardize(0, xs[0])
    assert len(torch.unique(raw)) == 1
    assert len(torch.unique(d2.layer_logits(0, xs, b)[0].argmax(-1))) > 1


def test_adaptive_router_starts_at_the_static_choices_without_saturating_them():
    """init_from_static: every layer's prior argmax is the static router's choice, at a softness the LM's
    gradient can move (a top-1 probability under 1), and training's logit scale ends where the static
    router's ramp did (x10 its logits)."""
    from flexcli.router.training import dynamic_scale, init_from_static

    torch.manual_seed(0)
    L, K, J, h = 4, 5, 3, RouterHyper(dynamic_steps=30)
    static = StaticRouter(2, L, K, J)
    for p in static.parameters():
        torch.nn.init.normal_(p, std=0.5)
    d = DynamicRouter(2, L, 16, K, J)
    init_from_static(d, static, 2, h.dynamic_prior_scale)
    lm, lh = static(torch.eye(2))
    assert torch.equal(d.prior_mlp.argmax(-1), lm.argmax(-1)) and torch.equal(
        d.prior_att.argmax(-1), lh.argmax(-1)
    )
    assert torch.softmax(d.prior_mlp, -1).max() < 0.999
    end = dynamic_scale(h.dynamic_steps - 1, h) * d.prior_mlp
    assert dynamic_scale(0, h) == 1.0 and torch.allclose(end, 10 * lm, atol=1e-5)
