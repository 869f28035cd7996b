"""What `flex profile` times: an elastic checkpoint sliced to a configuration, in one runtime.

A backend opens a timed callable for any per-layer configuration (a context manager: the sliced model
lives only while it is timed) and says how the fixed part (embeddings, final norm, LM head) is measured.

- `TorchBackend`: transformers in PyTorch on the regime's device and dtype; the fixed part is timed
  directly (embedding -> norm -> LM head on the regime's tokens).
- `LlamaCppBackend`: llama.cpp through llama-cpp-python. Each configuration is exported as the GGUF
  `flex extract --format gguf` would write (same writer, same tensor types) into a scratch directory and
  loaded with the regime's threads; a call is one `llama_decode`. llama.cpp cannot run the fixed part
  alone, so it is derived from depth: a one-layer model at full width (T1) and the full model (TL) give
  fixed = (L*T1 - TL) / (L - 1).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..arch.family import Architecture, by_family
from ..arch.spec import Config, ElasticSpec
from ..device import device_name, resolve_device
from ..errors import UsageError
from ..io import layout
from .table import Regime
from .timing import Runner

Fn = Callable[[], Any]


class TorchBackend:
    """transformers in PyTorch (latency.timing's Runner builds the regime's calls)."""

    name = "torch"

    def __init__(self, path: Path, o) -> None:
        from transformers import AutoModelForCausalLM

        self.spec = layout.read_spec(path)
        self.arch: Architecture = by_family(self.spec.family)
        device = resolve_device(o.device)
        if device.type == "cpu" and o.dtype == "float16":
            raise UsageError("float16 is not supported on CPU; use float32 or bfloat16", option="dtype")
        if o.cuda_graphs and device.type != "cuda":
            raise UsageError("CUDA graphs need the cuda device", option="cuda_graphs")
        kv = (o.kv_len if o.kv_len is not None else o.seq_len) if o.phase == "decode" else 0
        self.regime = Regime(
            device.type,
            device_name(device),
            o.dtype,
            o.batch,
            o.seq_len if o.phase == "prefill" else 1,
            o.phase,
            kv,
            o.cuda_graphs,
        )
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, o.dtype), local_files_only=True, trust_remote_code=False
            )
            .to(device)
            .eval()
        )
        self.runner = Runner(self.model, self.regime, device, o.seed)
        self.sync = self.runner.sync
        self.header = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    @contextmanager
    def open(self, cfg: Config) -> Iterator[Fn]:
        from ..elastic.slicing import sliced_model

        sub = sliced_model(self.model, self.arch, self.spec, cfg)
        try:
            yield self.runner.model_fn(sub)
        finally:
            del sub

    @contextmanager
    def open_model(self, model) -> Iterator[Fn]:
        """A model loaded elsewhere (an extracted sub-model), timed in this regime."""
        yield self.runner.model_fn(model)

    def fixed_items(self) -> dict[str, Callable[[], Any]]:
        """Extra timed items the fixed part is computed from (context-manager factories)."""

        @contextmanager
        def fixed():
            yield self.runner.fixed_fn(self.model, self.arch)

        return {"fixed": fixed}

    def fixed_ms(self, med: dict[Any, float]) -> float:
        return med["fixed"]

    def forget(self, cfg: Config) -> None:
        pass

    def close(self) -> None:
        pass


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python, on this CPU with `threads` threads."""

    name = "llama.cpp"

    def __init__(self, path: Path, o) -> None:
        from .. import llamacpp
        from ..io.gguf_export import GGUF_TYPES, check_tokenizer
        from ..io.source import SourceModel

        llamacpp.require()
        if o.device != "cpu":
            raise UsageError("the llama.cpp runtime is profiled on this CPU (--device cpu)", option="device")
        if o.batch != 1:
            raise UsageError("the llama.cpp runtime is profiled at batch 1", option="batch")
        if o.cuda_graphs:
            raise UsageError("CUDA graphs are a PyTorch option", option="cuda_graphs")
        if o.gguf_type not in GGUF_TYPES:
            raise UsageError(
                f"must be one of {', '.join(GGUF_TYPES)}, got {o.gguf_type!r}", option="gguf_type"
            )
        self.path, self.o = path, o
        self.spec: ElasticSpec = layout.read_spec(path)
        self.src = SourceModel.open(path)
        check_tokenizer(path, self.spec.dims.vocab_size)
        self.threads = o.threads or llamacpp.default_threads()
        kv = (o.kv_len if o.kv_len is not None else o.seq_len) if o.phase == "decode" else 0
        self.regime = Regime(
            "llama.cpp",
            f"{device_name(torch.device('cpu'))} {self.threads}t",
            o.gguf_type,
            1,
            o.seq_len if o.phase == "prefill" else 1,
            o.phase,
            kv,
        )
        g = torch.Generator().manual_seed(o.seed)
        vocab = self.spec.dims.vocab_size
        self.ids = torch.randint(0, vocab, (self.regime.seq_len,), generator=g).tolist()
        self.ctx = torch.randint(0, vocab, (max(kv, 1),), generator=g).tolist()
        self.n_ctx = max(kv, 0) + self.regime.seq_len + 1
        self.scratch = Path(tempfile.mkdtemp(prefix="flex-llamacpp-"))
        self.files: dict[tuple, Path] = {}
        self.sync = lambda: None
        self.header = {"llama_cpp": llamacpp.version(), "threads": self.threads, "gguf_type": o.gguf_type}

    def gguf(self, cfg: Config) -> Path:
        """The GGUF of `cfg` (a prefix of the layers when `cfg` is shorter), written once per run."""
        from ..elastic.slicing import planned_specs, stream_sliced
        from ..io.gguf_export import plan_gguf, write_gguf

        key = tuple(cfg)
        if key not in self.files:
            n = len(cfg)
            full = cfg + [self.spec.full()[0]] * (self.spec.dims.num_layers - n)  # sliced as a whole model
            keep = self._keep(n)
            specs = [s for s in planned_specs(self.src, self.spec, full) if keep(s[0])]
            plan = plan_gguf(self.spec.family, self.src.config, self.spec, cfg, specs, self.o.gguf_type)
            f = self.scratch / f"{len(self.files)}.gguf"
            stream = ((k, x) for k, x in stream_sliced(self.src, self.spec, full) if keep(k))
            write_gguf(
                f, plan, stream, self.src.config, self.spec, cfg, self.o.gguf_type, self.path, "timing"
            )
            self.files[key] = f
        return self.files[key]

    def forget(self, cfg: Config) -> None:
        """Delete the file of a configuration timed once (correction, validation): disk stays bounded."""
        f = self.files.pop(tuple(cfg), None)
        if f is not None:
            f.unlink(missing_ok=True)

    def _keep(self, n: int) -> Callable[[str], bool]:
        prefix = self.src.arch.layers + "."

        def keep(name: str) -> bool:
            return not name.startswith(prefix) or int(name[len(prefix) :].split(".", 1)[0]) < n

        return keep

    def open(self, cfg: Config):
        return self.open_file(self.gguf(list(cfg)))

    @contextmanager
    def open_file(self, gguf: Path) -> Iterator[Fn]:
        """A GGUF written elsewhere (an extracted sub-model), timed in this regime."""
        from .. import llamacpp

        with llamacpp.Model(gguf, self.n_ctx, self.threads) as m:
            yield m.step_fn(self.regime.phase, self.ids, self.ctx)

    def fixed_items(self) -> dict[str, Callable[[], Any]]:
        one = [self.spec.full()[0]]
        return {"depth1": lambda: self.open(one)}

    def fixed_ms(self, med: dict[Any, float]) -> float:
        L = self.spec.dims.num_layers
        full = med[("entry", *self.spec.full()[0])]
        return (L * med["depth1"] - full) / (L - 1) if L > 1 else 0.0

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
