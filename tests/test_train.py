"""Elastic continued training: sampling, distillation, resume equivalence, refusals, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, rel_err, small_elastic
from safetensors.torch import load_file

from flexcli.arch import Dims
from flexcli.arch.spec import ElasticSpec
from flexcli.commands.convert import ConvertOptions, convert
from flexcli.errors import UsageError
from flexcli.recipe import TrainSection
from flexcli.train.checkpoints import Checkpoints
from flexcli.train.distill import distill_loss, kd_loss
from flexcli.train.elastic import random_config, sample_configs


def _recipe(tmp_path: Path, **train) -> Path:
    body = {
        "precision": "fp32",
        "batch_size": 4,
        "seq_len": 32,
        "checkpoint_every": 5,
        "warmup": 2,
        "val_samples": 4,
        "val_random_configs": 1,
        **train,
    }
    lines = ["stages: [permute, train]", "train:"] + [f"  {k}: {json.dumps(v)}" for k, v in body.items()]
    p = tmp_path / f"recipe-{abs(hash(tuple(sorted(body.items()))))}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _opts(calib, recipe, **kw) -> ConvertOptions:
    return ConvertOptions(recipe=recipe, calib=str(calib), calib_samples=4, seq_len=32, device="cpu", **kw)


def test_sampling_rules():
    spec = ElasticSpec.build(
        "llama", Dims(4, 64, 96, 8, 2, 8, 100, False), [1, 0.75, 0.5, 0.25], [1, 0.5], 64, "query"
    )
    g = torch.Generator().manual_seed(0)
    picks = [sample_configs(spec, TrainSection(p_full=0.33), g) for _ in range(3000)]
    assert all(len(p) == 1 for p in picks)
    share_full = sum(p[0] is None for p in picks) / len(picks)
    assert 0.29 < share_full < 0.37
    assert sample_configs(spec, TrainSection(p_full=0.0, sandwich=True), g)[:2] == [None, spec.smallest()]
    for _ in range(50):
        cfg = random_config(spec, "uniform", g)
        assert len(set(cfg)) == 1  # one width for every layer
        spec.check(random_config(spec, "layerwise", g))
    layerwise = [random_config(spec, "layerwise", g) for _ in range(50)]
    assert any(len(set(c)) > 1 for c in layerwise)
    fixed = [spec.smallest(), spec.uniform(0.5, 0.5)]  # train.configs: only these, and the full model
    drawn = [sample_configs(spec, TrainSection(p_full=0.33), g, fixed)[0] for _ in range(600)]
    assert {tuple(c) if c else None for c in drawn} == {None, *map(tuple, fixed)}


def _autograd_kd(s, t, temp):
    ls = torch.log_softmax(s[:, :-1] / temp, -1).flatten(0, 1)
    lt = torch.log_softmax(t[:, :-1] / temp, -1).flatten(0, 1)
    return torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="batchmean") * temp**2


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_fused_kd_matches_autograd(temp, monkeypatch):
    import flexcli.train.distill as distill

    monkeypatch.setattr(distill, "CHUNK", 7)  # chunks that do not divide the sequence
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 20, 50, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 20, 50, dtype=torch.float64, generator=g)
    fused = kd_loss(s, t, temp)
    (fused * 3).backward()
    got = s.grad.clone()
    s.grad = None
    ref = _autograd_kd(s, t, temp)
    (ref * 3).backward()
    assert torch.allclose(fused.double(), ref, rtol=1e-6)
    assert torch.allclose(got, s.grad, atol=1e-7)
    assert got[:, -1].abs().max() == 0  # the last position predicts nothing
    assert kd_loss(t, t, temp).abs() < 1e-6


def test_distill_loss_mixes_ce_and_keeps_logit_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50, (2, 9), generator=g)
    s = torch.randn(2, 9, 50, generator=g).bfloat16().requires_grad_(True)
    t = torch.randn(2, 9, 50, generator=g).bfloat16()
    ce = torch.nn.functional.cross_entropy(s[:, :-1].float().reshape(-1, 50), x[:, 1:].reshape(-1))
    kd = _autograd_kd(s.float(), t.float(), 1.0)
    mixed = distill_loss(s, x, t, TrainSection(distill=0.25))
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * kd, rtol=1e-4)
    assert torch.allclose(distill_loss(s, x, None, TrainSection()), ce)  # no teacher: plain LM loss
    distill_loss(s, x, t, TrainSection()).backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.abs().sum() > 0


def test_training_improves_subnetworks_and_writes_report(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2, hidden=64, layers=2)
    res = convert(
        str(src),
        _opts(
            calib_file,
            _recipe(tmp_path, steps=30, lr=3e-3, distill=0.5, freeze_embeddings=False),
            output=tmp_path / "out",
        ),
    )
    t = res.training
    before = {r.name: r.loss for r in t.before}
    after = {r.name: r.loss for r in t.after}
    assert after["uniform 50%"] < before["uniform 50%"]
    assert after["full"] < before["full"]  # a random model: training helps everywhere
    out = Path(res.output)
    assert json.loads((out / "flex_train_report.json").read_text())["steps"] == 30
    manifest = json.loads((out / "flex_elastic.json").read_text())
    assert manifest["stages"]["train"]["steps"] == 30 and "train" in manifest["recipe"]["stages"]
    assert not (tmp_path / ".out.flex-train").exists()  # checkpoints removed after commit
    emb = "model.embed_tokens.weight"  # freeze_embeddings: false trains them
    assert not torch.equal(
        load_file(src / "model.safetensors")[emb], load_file(out / "model.safetensors")[emb]
    )


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_weights(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    src = make_model(tmp_path / "src", tokenizer_dir, "qwen2", 4, 2, hidden=64, layers=2)
    recipe = _recipe(tmp_path, steps=12, p_full=0.3, sampling="mixed")
    straight = Path(convert(str(src), _opts(calib_file, recipe, output=tmp_path / "a")).output)

    real_save = Checkpoints.save

    def save_then_die(self, step, *a, **kw):
        path = real_save(self, step, *a, **kw)
        if step == 10:
            raise Interrupt
        return path

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(Interrupt):
        convert(str(src), _opts(calib_file, recipe, output=tmp_path / "b"))
    monkeypatch.setattr(Checkpoints, "save", real_save)
    assert not (tmp_path / "b").exists()
    work = tmp_path / ".b.flex-train"
    assert sorted(p.name for p in work.glob("step-*")) == ["step-0000005", "step-0000010"]

    with pytest.raises(UsageError, match="resume=True"):  # without resuming the checkpoints are not discarded
        convert(str(src), _opts(calib_file, recipe, output=tmp_path / "b"))
    with pytest.raises(UsageError, match="different recipe"):
        convert(
            str(src),
            _opts(calib_file, _recipe(tmp_path, steps=12, lr=1e-3), resume=True, output=tmp_path / "b"),
        )
    other = make_model(tmp_path / "other", tokenizer_dir, "qwen2", 4, 2, hidden=64, layers=2, seed=1)
    with pytest.raises(UsageError, match="another model"):
        convert(str(other), _opts(calib_file, recipe, resume=True, output=tmp_path / "b"))

    resumed = Path(convert(str(src), _opts(calib_file, recipe, resume=True, output=tmp_path / "b")).output)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    rep = json.loads((resumed / "flex_train_report.json").read_text())
    assert rep["resumed_from"] == 10


def test_bad_training_inputs(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2)
    with pytest.raises(UsageError, match="p_full"):
        convert(str(src), _opts(calib_file, _recipe(tmp_path, steps=2, p_full=1.5), output=tmp_path / "o"))
    with pytest.raises(UsageError, match="no checkpoint"):
        convert(str(src), _opts(calib_file, _recipe(tmp_path, steps=2), resume=True, output=tmp_path / "o"))
    with pytest.raises(UsageError, match="fewer than one batch"):
        convert(
            str(src), _opts(calib_file, _recipe(tmp_path, steps=2, batch_size=4096), output=tmp_path / "o")
        )
    with pytest.raises(UsageError, match="train.steps or train.tokens"):
        r = tmp_path / "r.yaml"
        r.write_text("stages: [permute, train]\n")
        convert(str(src), _opts(calib_file, r, output=tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.flex-train").exists()


def test_blockwise_warm_start_lowers_block_error_and_keeps_full(tmp_path, tokenizer_dir, calib_file):
    """The warm start trains every block at narrow widths toward the full block's output: the smallest
    widths' reconstruction error falls, the full width stays near exact, and the convert report says so."""
    import copy

    from flexcli.elastic.runtime import load_elastic
    from flexcli.train.blockwise import cache_activations, reconstruct

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file)
    elastic = load_elastic(el)
    teacher = copy.deepcopy(elastic.model).requires_grad_(False)
    tokens = torch.randint(0, 200, (4096,), generator=torch.Generator().manual_seed(0))
    emb = elastic.model.get_input_embeddings().weight.clone()
    tc = TrainSection(
        batch_size=4, seq_len=32, precision="fp32", warmup=2, blockwise_tokens=512, blockwise_epochs=6,
        blockwise_lr=3e-3, p_full=0.3,
    )  # fmt: skip
    rep = reconstruct(elastic, teacher, tokens, tc, seed=0)
    assert rep.steps == 24 and rep.tokens == 512
    assert all(a < b for a, b in zip(rep.smallest_after, rep.smallest_before, strict=True))
    assert max(rep.full_after) < 0.5 * min(rep.smallest_after)
    assert torch.equal(elastic.model.get_input_embeddings().weight, emb)  # blocks only

    # the captured activations are the model's own: block i's output is block i+1's input
    x = tokens[:64].view(2, 32)
    (acts,), kwargs = cache_activations(teacher, elastic.arch.layers, [x])
    assert acts.shape == (spec.dims.num_layers + 1, 2, 32, spec.dims.hidden_size)
    with torch.no_grad():
        out = teacher(input_ids=x, output_hidden_states=True).hidden_states
    assert rel_err(acts[1], out[1]) < 1e-2  # bf16 cache


def test_convert_runs_blockwise_and_freezes_embeddings(tmp_path, tokenizer_dir, calib_file):
    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2, hidden=64, layers=2)
    recipe = _recipe(
        tmp_path, steps=4, lr=3e-3, blockwise_tokens=256, blockwise_lr=1e-3
    )  # embeddings frozen by default
    res = convert(str(src), _opts(calib_file, recipe, output=tmp_path / "out"))
    bw = res.training.blockwise
    assert bw["steps"] == 2 and len(bw["smallest_before"]) == 2
    manifest = json.loads((Path(res.output) / "flex_elastic.json").read_text())
    assert manifest["stages"]["train"]["blockwise"]["tokens"] == 256
    before = load_file(src / "model.safetensors")
    after = load_file(Path(res.output) / "model.safetensors")
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    layer = "model.layers.0.post_attention_layernorm.weight"  # not permuted, but trained
    assert not torch.equal(before[layer], after[layer])


def test_train_configs_file(tmp_path, tokenizer_dir, calib_file):
    """train.configs trains the listed configurations; a file that is not a list of valid configurations
    is a one-line error before any training."""
    from flexcli.arch.spec import config_to_json

    src = make_model(tmp_path / "src", tokenizer_dir, "llama", 4, 2, hidden=64, layers=2)
    el = Path(convert(str(src), _opts(calib_file, None, output=tmp_path / "el")).output)
    spec = ElasticSpec.from_dict(json.loads((el / "flex_elastic.json").read_text())["spec"])
    good = tmp_path / "configs.json"
    good.write_text(json.dumps([config_to_json(spec.smallest())]))
    res = convert(
        str(src), _opts(calib_file, _recipe(tmp_path, steps=25, configs=str(good)), output=tmp_path / "out")
    )
    assert res.training.steps == 25
    bad = tmp_path / "bad.json"
    for text in ("{}", "[]", json.dumps([[{"mlp": 7, "heads": 1}] * 2]), "not json"):
        bad.write_text(text)
        with pytest.raises(UsageError, match="train.configs"):
            convert(
                str(src),
                _opts(calib_file, _recipe(tmp_path, steps=25, configs=str(bad)), output=tmp_path / "o2"),
            )
    assert not (tmp_path / "o2").exists()
