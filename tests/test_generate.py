"""`flex generate`: text from an elastic checkpoint at a budget. Static routing generates what transformers'
own greedy `generate` gives at the router's configuration; adaptive routing with a KV cache (per-token
MLP widths at every decode step, heads fixed at prefill) reproduces a single uncached forward over the
whole text with the same heads; the CLI streams, defaults ELASTIC from the project file and fails in one
line on bad input."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import flex_cmd, small_elastic

from flexcli.commands.generate import GenerateOptions, generate
from flexcli.elastic.adaptive import DynamicRuntime
from flexcli.elastic.runtime import load_elastic
from flexcli.io.source import load_tokenizer
from flexcli.plan.budget import parse_budget
from flexcli.router.models import encode_budget
from flexcli.router.store import load_router

PROMPT = "def parse(text):\n    return"


@pytest.fixture
def routed(tmp_path, tokenizer_dir, calib_file, request):
    """A converted checkpoint with both routers; indirect param: the adaptive router's --dynamic-source
    (absent: train-router's default, the lookahead router at layer 1)."""
    el, spec, table = small_elastic(tmp_path, tokenizer_dir, calib_file)
    source = getattr(request, "param", None)
    r = subprocess.run(
        flex_cmd() + ["train-router", str(el), "--budgets", "60%,80%", "--steps", "20", "--dynamic-steps", "4",
                      "--sm-warmup", "8", "--seq-len", "32", "--data", str(calib_file), "--json"]
        + ([] if source is None else ["--dynamic-source", str(source)]),
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return el, table


def test_static_generation_is_transformers_generate_at_the_router_configuration(routed):
    el_dir, table = routed
    pieces: list[str] = []
    o = GenerateOptions(prompt=PROMPT, budget=parse_budget("60%"), max_new_tokens=12, on_text=pieces.append)
    res = generate(el_dir, o)
    assert res.method == "static router" and res.budget_ms == pytest.approx(0.6 * table.full_ms())
    assert "".join(pieces) == res.text and res.tokens >= 1 and res.ms_per_token > 0
    el, tok = load_elastic(el_dir), load_tokenizer(el_dir)
    cfg = [(c["mlp"], c["heads"]) for c in res.config]
    assert cfg != el.spec.full()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with el.configured(cfg), torch.inference_mode():
        want = el.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert res.text == tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("routed", ["each", 1], indirect=True, ids=["per-layer", "lookahead"])
def test_adaptive_decode_with_cache_matches_one_uncached_forward(routed):
    el_dir, table = routed
    res = generate(
        el_dir, GenerateOptions(prompt=PROMPT, budget=parse_budget("60%"), adaptive=True, max_new_tokens=10)
    )
    assert res.method == "input-adaptive router" and res.tokens == 10
    assert sum(res.mlp_width_share.values()) == pytest.approx(1.0, abs=1e-3)
    # the same router over prompt + continuation in one forward, heads fixed to the prefill's choice
    el, tok = load_elastic(el_dir), load_tokenizer(el_dir)
    router, doc = load_router(el_dir, "dynamic", table.regime.key)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    rt = DynamicRuntime(el, router)
    rt.budget = encode_budget(res.budget_ms, doc["targets_ms"])[None]
    with torch.inference_mode():
        el.model(input_ids=ids, use_cache=False)
        rt.fixed_heads = [kh for _, kh in rt.choices]
        new = torch.cat([ids, torch.tensor([res.token_ids])], dim=1)
        logits = el.model(input_ids=new[:, :-1], use_cache=False).logits
    rt.close()
    assert [h["heads"] for h in res.config] == [
        el.spec.layers[i].heads[int(k)] for i, k in enumerate(rt.fixed_heads)
    ]
    p = ids.shape[1]
    assert logits[0, p - 1 :].argmax(-1).tolist() == new[0, p:].tolist()


def test_cli_streams_defaults_to_the_project_checkpoint_and_fails_in_one_line(routed, tmp_path):
    el_dir, _ = routed
    from flexcli.io.project import record

    record(el_dir, "src", cwd=tmp_path)

    def run(*a, **k):
        return subprocess.run(
            flex_cmd() + ["generate", *a], cwd=tmp_path, capture_output=True, text=True, **k
        )

    js = run("--budget", "80%", "--max-new-tokens", "6", PROMPT, "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    plain = run(str(el_dir), "--budget", "80%", "--max-new-tokens", "6", "-", input=PROMPT)
    assert plain.returncode == 0 and plain.stdout == doc["text"] + "\n"
    assert "ms/token" in plain.stderr
    bad = run(str(el_dir), "--adaptive", PROMPT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--budget" in bad.stderr
    low = run(str(el_dir), "--budget", "1%", PROMPT)
    assert low.returncode == 3


def test_decode_table_latency_model_adds_the_router_cost(tmp_path, tokenizer_dir, calib_file):
    """Against a PyTorch decode table, train-router measures the router's cost per step and both its
    adaptive report and generate's prediction are the table's latency of the choices plus that cost."""
    from dataclasses import replace

    from flexcli.latency.table import save_table

    el, _, table = small_elastic(tmp_path, tokenizer_dir, calib_file)
    dec = replace(table, regime=replace(table.regime, seq_len=1, phase="decode", kv_len=16))
    save_table(el, dec)
    r = subprocess.run(
        flex_cmd() + ["train-router", str(el), "--regime", dec.regime.key, "--budgets", "60%", "--steps", "10",
                      "--dynamic-steps", "2", "--sm-warmup", "8", "--seq-len", "32", "--data", str(calib_file),
                      "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    overhead = doc["dynamic"]["router_step_ms"]
    assert overhead > 0
    o = GenerateOptions(
        prompt=PROMPT, budget=parse_budget("60%"), adaptive=True, max_new_tokens=6, regime=dec.regime.key
    )
    res = generate(el, o)
    assert res.router_ms == overhead
    # the table's part lies between its smallest and its full configuration's latency
    assert dec.smallest_ms() <= res.predicted_ms - overhead <= dec.full_ms()


def test_router_skips_the_head_half_when_heads_are_fixed():
    from flexcli.router.models import DynamicRouter

    d = DynamicRouter(2, 3, 64, 7, 4)
    x, b = torch.randn(1, 1, 64), torch.eye(2)[:1]
    km, kh, _, _ = d.choose(1, x, b)
    km2, kh2, _, _ = d.choose(1, x, b, heads=False)
    assert torch.equal(km, km2) and kh is not None and kh2 is None


def test_lookahead_router_decides_every_later_layer_at_its_source():
    """With a source layer, the layers before it run their prior (the budget's choice, whatever their
    input), the source's input decides every later layer (their own input is not read), the decode path
    (one argmax for all of them at the source) chooses what the logits say, and a later layer asked
    before the source is an error."""
    from flexcli.router.models import DynamicRouter

    torch.manual_seed(0)
    d = DynamicRouter(2, 4, 64, 7, 4, source=1)
    with torch.no_grad():
        d.prior_mlp.normal_()
        d.prior_att.normal_()
    b = torch.eye(2)[:1].expand(3, -1)
    xa, xb = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    assert all(torch.equal(u, v) for u, v in zip(d.layer_logits(0, xa, b), d.layer_logits(0, xb, b)))
    with pytest.raises(RuntimeError, match="before its source"):
        d.layer_logits(2, xa, b)
    with pytest.raises(RuntimeError, match="before its source"):
        d.choose(2, xa[:, :1], b, heads=False)
    d.layer_logits(1, xa, b)
    from_a = [d.layer_logits(i, xb, b) for i in (2, 3)]  # xb is ignored: decided at the source from xa
    d.layer_logits(1, xb, b)
    from_b = [d.layer_logits(i, xa, b) for i in (2, 3)]
    assert not torch.allclose(from_a[0][0], from_b[0][0])
    d.layer_logits(1, xa, b)
    assert all(torch.equal(u[0], d.layer_logits(i, xb, b)[0]) for u, i in zip(from_a, (2, 3)))
    # decode (no heads, no sampling): every later layer's argmax taken at the source
    x1 = xa[:, :1]
    want = [d.layer_logits(1, x1, b, heads=False)[0].argmax(-1)]
    want += [d.layer_logits(i, x1, b, heads=False)[0].argmax(-1) for i in (2, 3)]
    got = [d.choose(i, x1, b, heads=False)[0] for i in (1, 2, 3)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("routed", [1], indirect=True, ids=["lookahead"])
def test_lookahead_decode_runs_the_layers_unwrapped_and_close_restores_them(routed):
    """lookahead_decode: the per-layer wrappers and hooks leave the model (one hook at the source sets
    every layer's width), a decode step takes the widths the general path would, a longer forward is a
    clear error, and close leaves the model as it was."""
    from flexcli.elastic.adaptive import GroupedMLP

    el_dir, table = routed
    el, tok = load_elastic(el_dir), load_tokenizer(el_dir)
    router, doc = load_router(el_dir, "dynamic", table.regime.key)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        before = el.model(input_ids=ids, use_cache=False).logits
        runs = []
        for fast in (False, True):
            rt = DynamicRuntime(el, router)
            rt.budget = encode_budget(0.6 * table.full_ms(), doc["targets_ms"])[None]
            el.model(input_ids=ids[:, :-1], use_cache=False)
            rt.fixed_heads, rt.choices = [kh for _, kh in rt.choices], []
            if fast:
                assert rt.lookahead_decode()
                assert not any(isinstance(m, GroupedMLP) for m in el.model.modules())
                with pytest.raises(RuntimeError, match="one token per forward"):
                    el.model(input_ids=ids, use_cache=False)
                rt.choices = []
            logits = el.model(input_ids=ids[:, -1:], use_cache=False).logits  # a step without its cache
            runs.append(([int(km[0, 0]) for km, _ in rt.choices], logits))
            rt.close()
        assert runs[0][0] == runs[1][0] and torch.allclose(runs[0][1], runs[1][1], atol=1e-5)
        assert torch.equal(el.model(input_ids=ids, use_cache=False).logits, before)
    assert not any(isinstance(m, GroupedMLP) for m in el.model.modules())


@pytest.mark.parametrize("routed", ["each"], indirect=True, ids=["per-layer"])
def test_lookahead_decode_leaves_a_per_layer_router_on_the_general_path(routed):
    el_dir, table = routed
    el = load_elastic(el_dir)
    router, doc = load_router(el_dir, "dynamic", table.regime.key)
    rt = DynamicRuntime(el, router)
    rt.budget = encode_budget(0.6 * table.full_ms(), doc["targets_ms"])[None]
    with torch.inference_mode():
        el.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    rt.fixed_heads = [kh for _, kh in rt.choices]
    assert rt.lookahead_decode() is False
    rt.close()
