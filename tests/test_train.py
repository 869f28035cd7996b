"""Elastic continued training: sampling, distillation, resume equivalence, refusals, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model
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
        _opts(calib_file, _recipe(tmp_path, steps=30, lr=3e-3, distill=0.5), output=tmp_path / "out"),
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
