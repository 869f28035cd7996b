"""Claim §6.3: before any training, importance-ordered prefixes beat a random order (trained tiny model)."""

from __future__ import annotations

from flexcli.commands.convert import ConvertOptions, convert
from flexcli.commands.pretrain import PretrainOptions, pretrain


def test_importance_order_beats_random_order_at_half_width(tmp_path):
    base = pretrain(
        tmp_path / "base",
        PretrainOptions(size="tiny", steps=150, batch_size=8, seq_len=128, precision="fp32"),
    )
    assert base.heldout_ppl < 200  # it learned something (vocab 512: uniform guessing is 512)
    recipe = tmp_path / "random.yaml"
    recipe.write_text("importance:\n  order: random\n  seed: 1\n")
    common = dict(calib="stdlib", calib_samples=16, seq_len=128, eval_data="stdlib", device="cpu")
    imp = convert(base.output, ConvertOptions(**common, output=tmp_path / "imp"))
    rnd = convert(base.output, ConvertOptions(recipe=recipe, **common, output=tmp_path / "rnd"))
    half = {w.ratio: w.ppl for w in imp.widths}[0.5]
    half_rnd = {w.ratio: w.ppl for w in rnd.widths}[0.5]
    full = {w.ratio: w.ppl for w in imp.widths}[1.0]
    assert abs(full - {w.ratio: w.ppl for w in rnd.widths}[1.0]) < 1e-3 * full  # same function at full width
    assert half < half_rnd, (half, half_rnd)


def test_taylor_head_scores_match_autograd(tmp_path, tokenizer_dir):
    """`taylor` is sum over tokens of |a_h . dL/da_h| at each layer's o_proj input, computed without
    weight gradients; the model's requires_grad flags are restored."""
    import torch
    from conftest import make_model
    from transformers import AutoModelForCausalLM

    from flexcli.arch.dims import Dims
    from flexcli.arch.family import by_family
    from flexcli.elastic.importance import compute_importance

    model = AutoModelForCausalLM.from_pretrained(make_model(tmp_path / "m", tokenizer_dir, heads=4, kv=2))
    dims, arch = Dims.from_config(model.config.to_dict()), by_family("llama")
    seqs = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    got = compute_importance(model, arch, dims, seqs, batch_size=2, head_score="taylor")
    assert all(p.requires_grad for p in model.parameters()) and all(
        p.grad is None for p in model.parameters()
    )

    want = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64)
    acts: list[torch.Tensor] = []
    for b in (seqs[:2], seqs[2:]):
        acts.clear()
        hooks = [
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, a: acts.append(a[0].retain_grad() or a[0])
            )
            for layer in model.model.layers
        ]
        logits = model(input_ids=b).logits[:, :-1]
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)
        ).backward()
        for h in hooks:
            h.remove()
        for i, a in enumerate(acts):
            dot = (a * a.grad).unflatten(-1, (dims.num_heads, dims.head_dim)).sum(-1)  # (batch, seq, H)
            want[i] += dot.abs().sum((0, 1)).double()
        model.zero_grad(set_to_none=True)
    for i in range(dims.num_layers):
        assert torch.allclose(got[i]["qhead"], want[i], rtol=1e-4), (got[i]["qhead"], want[i])


import pytest  # noqa: E402


@pytest.mark.parametrize(
    "family,heads,kv,tied,shard",
    [("llama", 4, 2, False, None), ("qwen2", 4, 1, True, None), ("mistral", 8, 2, False, "60KB")],
)
def test_layerwise_scores_equal_whole_model_scores(tmp_path, tokenizer_dir, family, heads, kv, tied, shard):
    """Scoring one layer at a time from the files (what a prune-only convert does) gives the whole
    model's scores: same hooks, hidden states carried between layers; sharded sources too."""
    import torch
    from conftest import make_model
    from transformers import AutoModelForCausalLM

    from flexcli.elastic.importance import compute_importance, compute_importance_layerwise
    from flexcli.io.source import SourceModel

    path = make_model(tmp_path / "m", tokenizer_dir, family, heads, kv, tied, layers=3, shard=shard)
    src = SourceModel.open(path)
    assert (len(src.weight_files) > 1) == (shard is not None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seqs = torch.randint(0, 300, (5, 19), generator=torch.Generator().manual_seed(0))
    want = compute_importance(model, src.arch, src.dims, seqs, batch_size=2)
    done = []
    got = compute_importance_layerwise(src, seqs, torch.device("cpu"), torch.float32, 2, done.append)
    assert len(done) == src.dims.num_layers == 3
    for g, w in zip(got, want):
        for unit in ("neuron", "qhead"):
            assert torch.allclose(g[unit], w[unit], rtol=1e-5, atol=1e-6), (unit, g[unit], w[unit])


def test_when_calibration_goes_layer_by_layer(tmp_path, tokenizer_dir):
    """Layer by layer only where it is the smaller (and an exact) way: safetensors, the norm score, no
    sliding window shorter than the sequences, activations smaller than the weights."""
    import json

    from conftest import make_model

    from flexcli.elastic.importance import layerwise_supported
    from flexcli.io.source import SourceModel

    src = SourceModel.open(make_model(tmp_path / "m", tokenizer_dir, hidden=64, layers=2, inter=96))
    weights = sum(p for p in (64 * 320 * 2, 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 96 + 128), 64))
    assert layerwise_supported(src, (4, 32), "norm") is None
    assert "Taylor" in layerwise_supported(src, (4, 32), "taylor")
    assert "outweigh" in layerwise_supported(src, (weights // (64 * 32) + 1, 32), "norm")
    assert layerwise_supported(src, (weights // (64 * 32) - 1, 32), "norm") is None
    cfg = json.loads((src.path / "config.json").read_text())
    (src.path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    assert "sliding-window" in layerwise_supported(SourceModel.open(src.path), (4, 32), "norm")
