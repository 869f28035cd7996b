"""Elastic runtime parity: full width == transformers; any sub-configuration == physically sliced model;
permutation preserves the function. Llama / Mistral / Qwen2, MHA / GQA / MQA, tied and untied."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_model, rel_err
from transformers import AutoModelForCausalLM

from flexcli.arch import Dims, detect
from flexcli.arch.spec import ElasticSpec
from flexcli.elastic.importance import random_scores
from flexcli.elastic.permute import permutations, permute_model_
from flexcli.elastic.runtime import ElasticModel
from flexcli.elastic.slicing import sliced_model

VARIANTS = {  # id: (family, heads, kv, tied, gqa mode)
    "llama-mha-untied": ("llama", 4, 4, False, "query"),
    "llama-gqa-tied": ("llama", 8, 2, True, "query"),
    "llama-gqa-groups": ("llama", 8, 4, False, "group"),
    "mistral-gqa": ("mistral", 8, 2, False, "query"),
    "qwen2-mqa-tied": ("qwen2", 4, 1, True, "query"),
    "qwen2-gqa-groups": ("qwen2", 8, 4, False, "group"),
}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _setup(tmp_path, tokenizer_dir, variant):
    family, heads, kv, tied, gqa = VARIANTS[variant]
    path = make_model(
        tmp_path / variant, tokenizer_dir, family, heads, kv, tied, hidden=64, layers=3, inter=96
    )
    model = _load(path)
    cfg = model.config.to_dict()
    arch, dims = detect(cfg), Dims.from_config(cfg)
    spec = ElasticSpec.build(arch.family, dims, [1.0, 0.75, 0.5, 0.25], [1.0, 0.75, 0.5, 0.25], 64, gqa)
    return path, model, arch, dims, spec


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_width_equals_transformers_and_subconfigs_equal_sliced(tmp_path, tokenizer_dir, variant):
    path, model, arch, dims, spec = _setup(tmp_path, tokenizer_dir, variant)
    x = torch.randint(0, dims.vocab_size, (2, 17))
    reference = _load(path)(x).logits  # a second, untouched stock copy
    elastic = ElasticModel(model, arch, spec)
    with torch.no_grad():
        assert rel_err(elastic(x).logits, reference) <= 1e-6  # exactly transformers' forward at full width

        rng = random.Random(0)
        configs = [spec.uniform(r, r) for r in (0.75, 0.5, 0.25)] + [spec.smallest()]
        configs += [[(rng.choice(lc.mlp), rng.choice(lc.heads)) for lc in spec.layers] for _ in range(4)]
        for cfg in configs:
            elastic.set_config(cfg)
            got = elastic(x).logits
            want = sliced_model(model, arch, spec, cfg)(x).logits
            assert rel_err(got, want) <= 1e-5, (variant, cfg)
        elastic.set_config(None)
        assert rel_err(elastic(x).logits, reference) <= 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_permutation_preserves_function(tmp_path, tokenizer_dir, variant):
    path, model, arch, dims, spec = _setup(tmp_path, tokenizer_dir, variant)
    x = torch.randint(0, dims.vocab_size, (2, 19))
    with torch.no_grad():
        before = model(x).logits
        perms = permutations(random_scores(dims, seed=3), dims)
        assert any(not torch.equal(p["qhead"], torch.arange(dims.num_heads)) for p in perms)
        permute_model_(model, arch, dims, perms)
        assert rel_err(model(x).logits, before) <= 1e-5


def test_sliced_parameter_count_matches_formula(tmp_path, tokenizer_dir):
    path, model, arch, dims, spec = _setup(tmp_path, tokenizer_dir, "llama-gqa-groups")
    cfg = [(48, 4), (96, 8), (24, 2)]
    sub = sliced_model(model, arch, spec, cfg)
    per_layer = 0
    for m, h in cfg:
        kv = spec.kv_heads(h)
        per_layer += (
            3 * dims.hidden_size * m
            + 2 * dims.hidden_size * h * dims.head_dim
            + 2 * dims.hidden_size * kv * dims.head_dim
            + 2 * dims.hidden_size
        )
    other = 2 * dims.vocab_size * dims.hidden_size + dims.hidden_size  # embed + untied head + final norm
    assert sum(p.numel() for p in sub.parameters()) == per_layer + other


def test_gqa_choices_follow_the_rule(tokenizer_dir):
    dims = Dims(2, 64, 96, 8, 2, 8, 100, False)
    q = ElasticSpec.build("llama", dims, [1.0, 0.5], [1.0, 0.75, 0.5, 0.25], 64, "query")
    g = ElasticSpec.build("llama", dims, [1.0, 0.5], [1.0, 0.75, 0.5, 0.25], 64, "group")
    assert all(h % dims.num_kv_heads == 0 for h in q.layers[0].heads)
    assert all(h % dims.group_size == 0 for h in g.layers[0].heads)
    assert q.kv_heads(4) == 2 and g.kv_heads(4) == 1
    # query mode keeps the first heads of each group: 2 of 4 per group
    assert q.head_index(4)[0].tolist() == [0, 1, 4, 5]
    mha = ElasticSpec.build("llama", Dims(2, 64, 96, 4, 4, 16, 100, False), [1.0], [1.0, 0.5], 64, "query")
    assert mha.gqa == "group"


def test_sliced_model_initialises_nothing_and_shares_unsliced_tensors(tmp_path, tokenizer_dir, monkeypatch):
    """What the profiler builds per timed configuration: no weight is initialised for real (the model is
    built on the meta device and filled by assignment), unsliced tensors and the rotary tables are the
    source's own, and nothing is left on the meta device."""
    path, model, arch, dims, spec = _setup(tmp_path, tokenizer_dir, "llama-gqa-groups")
    initialised = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_"):
        real = getattr(torch.nn.init, name)

        def spy(*a, _real=real, **k):
            initialised.append((a[0] if a else k["tensor"]).is_meta)
            return _real(*a, **k)

        monkeypatch.setattr(torch.nn.init, name, spy)
    cfg = [(48, 4), (96, 8), (24, 2)]
    sub = sliced_model(model, arch, spec, cfg)
    assert initialised and all(initialised)  # only meta tensors were ever initialised
    assert not any(t.is_meta for t in [*sub.parameters(), *sub.buffers()])
    same = lambda a, b: a.data_ptr() == b.data_ptr()  # noqa: E731
    assert same(sub.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert same(
        sub.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight
    )  # full width
    assert not same(sub.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert sub.model.rotary_emb is model.model.rotary_emb
    assert sub.model.layers[0].mlp.up_proj.weight.shape == (48, dims.hidden_size)
