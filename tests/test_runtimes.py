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
