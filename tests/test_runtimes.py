"""The runtime room: one protocol, two implementations, and regimes that name their runtime while keeping
the keys (and files) of tables written before they did."""

from __future__ import annotations

import inspect

import pytest

from flexcli import runtimes
from flexcli.errors import UsageError
from flexcli.latency.table import LatencyTable, Regime
from flexcli.runtimes.base import Backend, Runtime


def test_every_runtime_implements_the_protocol():
    for name, rt in runtimes.RUNTIMES.items():
        assert rt.name == name
        for member in ("missing", "check", "plan", "write", "backend", "options_for"):
            want = inspect.signature(getattr(Runtime, member)).parameters
            got = inspect.signature(getattr(type(rt), member)).parameters
            assert list(got) == list(want), (name, member)
    from flexcli.runtimes.llamacpp import LlamaCppBackend
    from flexcli.runtimes.pytorch import TorchBackend

    for cls in (TorchBackend, LlamaCppBackend):
        for member in ("open", "open_artifact", "fixed_items", "fixed_ms", "forget", "close"):
            assert list(inspect.signature(getattr(cls, member)).parameters) == list(
                inspect.signature(getattr(Backend, member)).parameters
            ), (cls, member)


def test_formats_and_names_resolve_to_one_runtime():
    assert runtimes.for_format("gguf").name == "llama.cpp"
    assert {runtimes.for_format(f).name for f in ("auto", "stock", "flex")} == {"torch"}
    with pytest.raises(UsageError, match="runtime must be one of torch, llama.cpp") as e:
        runtimes.get("onnx")
    assert e.value.option == "runtime"
    with pytest.raises(UsageError, match="format must be one of"):
        runtimes.for_format("onnx")


def test_old_llama_cpp_tables_load_with_their_keys():
    """Before regimes named their runtime, llama.cpp was stored as the device: the same table now reads
    as runtime llama.cpp on the cpu, under the same key."""
    old = {"device": "llama.cpp", "device_name": "Xeon 2t", "dtype": "q8_0", "batch": 1, "seq_len": 1,
           "phase": "decode", "kv_len": 128, "graphs": False}  # fmt: skip
    r = Regime.from_dict(old)
    assert (r.runtime, r.device) == ("llama.cpp", "cpu")
    assert r.key == "llama.cpp:Xeon_2t|q8_0|b1|s1|decode|kv128|eager"
    t = LatencyTable.from_dict(
        {"regime": old, "header": {}, "fixed_ms": 1.0, "mlp": [[2]], "heads": [[1]], "ms": [[[1.0]]]}
    )
    assert t.regime == r
    torch_regime = Regime("cpu", "Xeon", "float32", 1, 16, "prefill", 0)
    assert torch_regime.key == "cpu:Xeon|float32|b1|s16|prefill|kv0|eager" and torch_regime.runtime == "torch"


def _two_tables(el, spec):
    """Two synthetic regimes (batch 1 and batch 2) whose tables differ: each trains its own router."""
    from flexcli.latency.table import save_table

    mlp, heads, L = spec.layers[0].mlp, spec.layers[0].heads, spec.dims.num_layers
    for batch, scale in ((1, 1.0), (2, 3.0)):
        save_table(
            el,
            LatencyTable(
                Regime("cpu", "synthetic", "float32", batch, 16, "prefill", 0),
                {},
                0.2 * scale,
                [mlp] * L,
                [heads] * L,
                [[[scale * (0.01 * m / 16 + 0.1 * h) for h in heads] for m in mlp]] * L,
            ),
        )
    return [
        "cpu:synthetic|float32|b1|s16|prefill|kv0|eager",
        "cpu:synthetic|float32|b2|s16|prefill|kv0|eager",
    ]


def test_train_router_against_each_table_keeps_one_router_set_per_regime(tmp_path, tokenizer_dir, calib_file):
    import json

    from conftest import small_elastic
    from typer.testing import CliRunner

    from flexcli.cli import app
    from flexcli.io import layout
    from flexcli.router.store import load_router, router_sets

    el, spec, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 2)
    (el / layout.LATENCY).unlink()
    keys = _two_tables(el, spec)
    args = ["--no-dynamic", "--steps", "20", "--sm-warmup", "8", "--seq-len", "32", "--data", str(calib_file)]
    r = CliRunner().invoke(
        app, ["train-router", str(el), "--regime", "synthetic", "--budgets", "60%", *args, "--json"]
    )
    assert r.exit_code == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [x["regime"] for x in runs] == keys
    sets = router_sets(el)
    assert list(sets) == keys and sets[keys[0]][0]["targets_ms"] != sets[keys[1]][0]["targets_ms"]
    for k in keys:  # each regime's router answers in its own table's milliseconds
        router, doc = load_router(el, "static", k)
        assert doc["regime"] == k and doc["targets_ms"] == sets[k][0]["targets_ms"]
    # retraining one regime replaces it and keeps the other
    r = CliRunner().invoke(app, ["train-router", str(el), "--regime", keys[0], "--budgets", "75%", *args])
    assert r.exit_code == 0, r.stderr
    sets2 = router_sets(el)
    assert sets2[keys[1]][0]["targets_ms"] == sets[keys[1]][0]["targets_ms"]
    assert sets2[keys[0]][0]["targets_ms"] != sets[keys[0]][0]["targets_ms"]
    # extract picks the router of the table it reads
    for k in keys:
        m = CliRunner().invoke(
            app,
            [
                "extract",
                str(el),
                "--regime",
                k,
                "--budget",
                f"{sets2[k][0]['targets_ms'][0]:.6f}ms",
                "--dry-run",
                "--json",
            ],  # fmt: skip
        )
        assert m.exit_code == 0, m.stderr
        assert json.loads(m.stdout)["models"][0]["method"] == "static router"
    # joint fine-tuning across several tables is refused (it changes the weights for one regime)
    r = CliRunner().invoke(
        app, ["train-router", str(el), "--regime", "synthetic", "--joint-steps", "2", *args]
    )
    assert r.exit_code == 2 and "--joint-steps" in r.stderr


def test_a_router_file_from_before_per_regime_storage_reads_as_its_regime(tmp_path):
    import torch

    from flexcli.io import layout
    from flexcli.io.atomic import update_dir
    from flexcli.router.store import router_sets

    tmp_path.mkdir(exist_ok=True)
    old = {"format": "flexcli.routers/1", "regime": "cpu:x|float32|b1|s16|prefill|kv0|eager", "static": True,
           "dynamic": False, "targets_ms": [1.0], "sha256": None}  # fmt: skip
    update_dir(tmp_path, layout.router_writers({"static.w": torch.ones(2)}, old))
    sets = router_sets(tmp_path)
    assert list(sets) == [old["regime"]] and torch.equal(sets[old["regime"]][1]["static.w"], torch.ones(2))


def test_gguf_type_auto_refusals_are_one_line(tmp_path, tokenizer_dir, calib_file, monkeypatch):
    from conftest import small_elastic
    from typer.testing import CliRunner

    import flexcli.runtimes.llamacpp as lc
    from flexcli.cli import app

    el, _, _ = small_elastic(tmp_path, tokenizer_dir, calib_file, "llama", 8, 2)
    base = ["extract", str(el), "--format", "gguf", "--gguf-type", "auto", "-o", str(tmp_path / "a.gguf")]
    for extra, says in (
        (["--budget", "60%"], "give --budget in ms or s"),
        (["--uniform", "mlp=1,heads=1"], "give --budget in ms or s"),
        (["--budget", "1ms", "--dry-run"], "no dry run"),
    ):
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    monkeypatch.setattr(lc, "missing", lambda: "llama-cpp-python is not installed; make install-llamacpp")
    r = CliRunner().invoke(app, [*base, "--budget", "1ms"])
    assert r.exit_code == 2 and "make install-llamacpp" in r.stderr
    monkeypatch.setattr(lc, "missing", lambda: None)
    r = CliRunner().invoke(app, [*base, "--budget", "1ms"])  # only a torch table here
    assert r.exit_code == 2 and "flex profile --runtime llama.cpp" in r.stderr
    assert list(tmp_path.glob("*a.gguf*")) == []
