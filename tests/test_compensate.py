"""Compensation at extraction (elastic.compensate): the damped least-squares refit of narrowed output
projections, checked against an independent least-squares solve, and end to end through `flex extract`
(the file holds the refit, is verified against the refit reference, and says so in its JSON)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_err, small_elastic
from typer.testing import CliRunner

from flexcli.arch.spec import config_from_json
from flexcli.cli import app
from flexcli.elastic import compensate

runner = CliRunner()


def _data(n=400, d=12, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix  # correlated inputs (tokens, d)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w, x.T @ x / n


@pytest.mark.parametrize("keep", [torch.arange(7), torch.tensor([0, 3, 4, 8, 9, 11])])
def test_refit_is_the_damped_least_squares_solution(keep):
    """The closed form equals lstsq on the stacked system [X_K; sqrt(lam) I] V^T = [X W^T; sqrt(lam) W_K^T],
    for a prefix (MLP neurons, whole KV groups) and an index set (query heads inside groups)."""
    x, w, g = _data()
    damping = 0.05
    got = compensate.refit(w, g, keep, damping)
    n = x.shape[0]
    lam = damping * g[keep][:, keep].diagonal().mean()
    a = torch.cat([x[:, keep] / n**0.5, lam.sqrt() * torch.eye(len(keep), dtype=x.dtype)])
    b = torch.cat([x @ w.T / n**0.5, lam.sqrt() * w[:, keep].T])
    want = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(got, want, atol=1e-8, rtol=1e-6)

    def err(v):  # the data term: what the sub-model's projection loses on the calibration activations
        return ((x @ w.T - x[:, keep] @ v.T) ** 2).mean()

    assert err(got) < 0.9 * err(w[:, keep])  # correlated inputs: the kept columns take over a real part
    assert torch.allclose(compensate.refit(w, g, keep, 1e6), w[:, keep], atol=1e-3)  # damping -> plain slice


def test_nothing_to_refit_at_full_width(tmp_path, tokenizer_dir, calib_file):
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    full = spec.full()
    assert compensate.narrowed(spec, full) == {}
    cfg = [full[0], (spec.layers[1].mlp[-1], full[1][1]), (full[2][0], spec.layers[2].heads[-1])]
    assert set(compensate.narrowed(spec, cfg)) == {(1, "neuron"), (2, "qhead")}


def _extract(el, tmp_path, name, *extra):
    res = runner.invoke(
        app,
        ["extract", str(el), "--uniform", "mlp=0.5,heads=0.5", "-o", str(tmp_path / name), "--json", *extra],
    )
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)["models"][0]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("gqa", ["group", "query"])
def test_extract_writes_the_refit_and_verifies_against_it(tmp_path, tokenizer_dir, calib_file, gqa):
    """Compensated: down_proj / o_proj of narrowed layers hold the refit (computed here independently from
    the calibration moments), everything else is the plain slice, logits match the elastic model with the
    refit written in, and calibration-text loss drops. --no-compensate writes the plain slice."""
    from flexcli.elastic.runtime import load_elastic
    from flexcli.elastic.slicing import slice_tensor
    from flexcli.train.data import calibration_sequences

    if gqa == "query":
        import yaml

        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"elastic": {"gqa": "query"}}))
    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    if gqa == "query":  # the same model, converted with heads dropped inside every group
        from flexcli.commands.convert import ConvertOptions, convert

        el = convert(
            str(tmp_path / "src"),
            ConvertOptions(
                calib=str(calib_file),
                calib_samples=2,
                seq_len=32,
                device="cpu",
                output=tmp_path / "elq",
                recipe=str(recipe),
            ),  # fmt: skip
        ).output
    m = _extract(el, tmp_path, "comp", "--compensate-tokens", "2048")
    plain = _extract(el, tmp_path, "plain", "--no-compensate")
    cfg = config_from_json(m["config"])
    assert m["compensation"]["tensors"] == len(compensate.narrowed(spec, cfg)) > 0
    assert m["compensation"]["tokens"] == 2048 and m["verified_max_rel_err"] <= 1e-5
    assert plain["compensation"] is None and plain["compensation_note"] == "--no-compensate"

    e = load_elastic(el)
    seqs = calibration_sequences(el, 2048)
    g = compensate.moments(e.model, e.arch, seqs, set(compensate.narrowed(e.spec, cfg)))
    state = dict(e.model.state_dict())
    sub, flat = _hf(tmp_path / "comp").state_dict(), _hf(tmp_path / "plain").state_dict()
    for name, t in sub.items():
        ref = slice_tensor(name, state[name], e.arch, e.spec, cfg)
        assert torch.equal(flat[name], ref)  # --no-compensate: the plain slice
        hit = e.arch.locate(name)
        key = (hit[0], hit[1]) if hit else None
        if key in g and name == compensate.weight_name(e.arch, *key):
            keep = compensate.narrowed(e.spec, cfg)[key]
            assert torch.allclose(t, compensate.refit(state[name], g[key], keep).float(), atol=1e-5)
            assert not torch.allclose(t, ref)
        else:
            assert torch.equal(t, ref)
    names = [compensate.weight_name(e.arch, *k) for k in compensate.narrowed(e.spec, cfg)]
    compensate.apply(e.model, e.arch, e.spec, cfg, {n: sub[n] for n in names})
    x = torch.randint(0, e.spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), e.configured(cfg):
        assert rel_err(_hf(tmp_path / "comp")(input_ids=x).logits, e(input_ids=x).logits) <= 1e-5
    # what each narrowed projection loses on the calibration activations, E||W x - V x_K||^2 =
    # tr(D G D^T) with D = W minus V in the kept columns: lower with the refit than with the plain slice
    for key, keep in compensate.narrowed(e.spec, cfg).items():
        name = compensate.weight_name(e.arch, *key)

        def lost(v, w=state[name].double(), keep=keep, gk=g[key]):
            d = w.clone()
            d[:, keep] -= v.double()
            return torch.trace(d @ gk @ d.T)

        assert lost(sub[name]) < lost(flat[name])


def test_compensation_skipped_when_it_would_not_fit(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    import flexcli.commands.extract as ex

    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    monkeypatch.setattr(ex, "ram_bytes", lambda: 1 << 20)
    m = _extract(el, tmp_path, "sub", "--no-verify")
    assert m["compensation"] is None and "do not fit comfortably in RAM" in m["compensation_note"]


def test_router_oracle_judges_configurations_compensated_and_restores(tmp_path, tokenizer_dir, calib_file):
    """The router's loss oracle with a Bank: a configuration's loss is that of the refit sub-model (the
    same refit extract computes), the weights are restored after each look, and refits are cached per
    layer and width."""
    from flexcli.elastic.evaluate import mean_loss
    from flexcli.elastic.runtime import load_elastic
    from flexcli.router.surrogate import LossOracle
    from flexcli.train.data import calibration_sequences

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    e = load_elastic(el)
    seqs = calibration_sequences(el, 2048)
    every = {(i, u) for i in range(spec.dims.num_layers) for u in compensate.UNITS}
    bank = compensate.Bank(e.model, e.arch, e.spec, compensate.moments(e.model, e.arch, seqs, every))
    before = {n: p.detach().clone() for n, p in e.model.named_parameters()}
    batches = seqs[:4]
    oracle, plain = LossOracle(e, batches, bank), LossOracle(e, batches)
    cfg = spec.uniform(0.5, 0.5)
    got = oracle(cfg)
    assert all(torch.equal(p, before[n]) for n, p in e.model.named_parameters())  # restored
    assert oracle(spec.full()) == plain(spec.full())  # nothing to refit at full width
    f = load_elastic(el)  # an independent reference: extract's overrides written into a fresh model
    new = compensate.calibrated_bank(
        f.model, f.arch, f.spec, seqs, set(compensate.narrowed(f.spec, cfg))
    ).overrides(cfg)
    compensate.apply(f.model, f.arch, f.spec, cfg, new)
    with f.configured(cfg):
        assert got == pytest.approx(mean_loss(f.model, batches), rel=1e-6)
    assert got != plain(cfg)
    mixed = [cfg[0], spec.full()[1], cfg[2]]
    oracle(mixed)
    narrowed = sum(1 for m, _ in cfg if m != spec.dims.intermediate_size)
    assert len(bank._refits) == 2 * narrowed  # layers 0 and 2 reuse their refits


def test_eval_evaluates_plain_slices_when_moments_would_not_fit(
    tmp_path, tokenizer_dir, calib_file, monkeypatch
):
    import flexcli.commands.evaluate as ev

    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    args = ["eval", str(el), "--uniform", "mlp=0.5,heads=0.5", "--data", str(calib_file), "--samples", "2",
            "--seq-len", "32", "--json"]  # fmt: skip
    rows = json.loads(runner.invoke(app, args).stdout)["rows"]
    monkeypatch.setattr(ev, "ram_bytes", lambda: 1 << 20)
    small = runner.invoke(app, args)
    assert small.exit_code == 0 and "do not fit comfortably in RAM" in small.stderr
    plain = json.loads(runner.invoke(app, [*args, "--no-compensate"]).stdout)["rows"]
    assert rows[1]["compensated"] is True and json.loads(small.stdout)["rows"][1]["compensated"] is False
    assert json.loads(small.stdout)["rows"][1]["ppl"] == plain[1]["ppl"] != rows[1]["ppl"]


def test_sequential_refit_uses_the_sub_networks_own_inputs(tmp_path, tokenizer_dir, calib_file):
    """Block 0 sees the full model's input, so its o_proj refit is the parallel one; later projections are
    refit on the narrowed upstream's activations (different from the parallel refit), which brings the
    sub-network's output closer to the full model's on the calibration text; the model is left untouched."""
    from flexcli.elastic.runtime import load_elastic

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    elastic = load_elastic(el)
    seqs = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    small = [(lc.mlp[-2], lc.heads[-2]) for lc in spec.layers]
    before = {k: v.clone() for k, v in elastic.model.state_dict().items()}
    seq = compensate.sequential_overrides(elastic, small, seqs, batch_size=3)
    assert all(torch.equal(v, elastic.model.state_dict()[k]) for k, v in before.items())
    assert compensate.sequential_overrides(elastic, spec.full(), seqs) == {}

    wanted = set(compensate.narrowed(spec, small))
    bank = compensate.calibrated_bank(elastic.model, elastic.arch, spec, seqs, wanted)
    par = bank.overrides(small)
    assert set(seq) == set(par)
    o0, d2 = (
        compensate.weight_name(elastic.arch, 0, "qhead"),
        compensate.weight_name(elastic.arch, 2, "neuron"),
    )
    assert torch.allclose(seq[o0], par[o0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(seq[d2], par[d2], atol=1e-3)

    with torch.no_grad():
        ref = elastic.model(input_ids=seqs).logits

    def err(new):
        compensate.apply(elastic.model, elastic.arch, spec, small, new)
        with torch.no_grad(), elastic.configured(small):
            out = elastic.model(input_ids=seqs).logits
        elastic.model.load_state_dict(before)
        return (out - ref).pow(2).mean().item()

    assert err(seq) < err(par) < err({})


def test_moments_are_kept_for_the_same_weights_and_text(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    """A second extraction from one checkpoint on one text reuses the first's moments: only projections
    not kept yet cost a calibration pass, the kept ones equal a fresh pass bit for bit, and other weights
    or other text are computed afresh. The weights' identity is the same for a hard-linked copy, not a rewrite."""
    import os
    import shutil

    from flexcli.elastic.runtime import load_elastic
    from flexcli.io.source import SourceModel
    from flexcli.train.data import calibration_sequences

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 4)
    e = load_elastic(el)
    seqs = calibration_sequences(el, 1024)
    real, passes = compensate.moments, []
    monkeypatch.setattr(compensate, "moments", lambda *a, **k: passes.append(set(a[3])) or real(*a, **k))
    a, b = {(0, "neuron"), (1, "qhead")}, {(1, "neuron")}
    _, n1 = compensate.kept_moments(e.model, e.arch, seqs, a, "w1")
    g, n2 = compensate.kept_moments(e.model, e.arch, seqs, a | b, "w1")
    assert (n1, n2) == (2, 1) and passes == [a, b]
    fresh = real(e.model, e.arch, seqs, a | b)
    assert g.keys() == fresh.keys() and all(torch.equal(g[k], fresh[k]) for k in fresh)
    assert compensate.kept_moments(e.model, e.arch, seqs, a, "w1")[1] == 0  # all kept: no pass
    assert compensate.kept_moments(e.model, e.arch, seqs, a, "w2")[1] == 2  # other weights
    assert compensate.kept_moments(e.model, e.arch, seqs[:2], a, "w2")[1] == 2  # other text

    copy = tmp_path / "linked"
    shutil.copytree(el, copy, copy_function=os.link)
    assert SourceModel.open(copy).weights_identity() == SourceModel.open(el).weights_identity()
    w = SourceModel.open(copy).weight_files[0]
    data = w.read_bytes()
    w.unlink()
    w.write_bytes(data)  # the same bytes in a new file: not known to be the same weights
    assert SourceModel.open(copy).weights_identity() != SourceModel.open(el).weights_identity()
