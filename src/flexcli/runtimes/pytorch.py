"""PyTorch (transformers) as a runtime: safetensors directories that stock transformers loads, timed on
the regime's device and dtype.

- write: the streaming slicer into io.safetensors shards, the source's other files, config.json for the
  sliced shapes (stock: uniform widths; flex: per-layer widths with the bundled modeling code);
  verification compares the logits with the elastic model at the same configuration (1e-4 relative).
- timing: latency.timing's Runner builds the regime's calls; the fixed part (embedding -> norm -> LM
  head) is timed directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..arch.family import Architecture, by_family
from ..arch.spec import Config, ElasticSpec
from ..device import device_name, resolve_device
from ..errors import RuntimeFailure, UsageError
from ..io import layout
from ..io.atomic import copy_files
from ..io.safetensors import ShardPlan, write_model
from ..io.source import SourceModel
from ..io.submodel import hf_config_for, modeling_source
from ..latency.table import Regime
from ..latency.timing import Runner
from ..progress import Reporter
from .base import ArtifactOptions, Fn, WriteJob, Written

MAX_REL_ERR = 1e-4  # verification: max |logit difference| / max |logit| against the elastic model


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
        self.dtype = getattr(torch, o.dtype)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, local_files_only=True, trust_remote_code=False
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
    def open_artifact(self, path: Path) -> Iterator[Fn]:
        """An extracted sub-model directory, loaded in this regime's dtype and device."""
        from transformers import AutoModelForCausalLM

        from ..arch.hf_modeling import register

        register()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, local_files_only=True)
        model = model.to(self.runner.device).eval()
        try:
            yield self.runner.model_fn(model)
        finally:
            del model

    def fixed_items(self) -> dict[str, Any]:
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


class TorchRuntime:
    name = "torch"
    formats = ("auto", "stock", "flex")
    suffix = ""

    def missing(self) -> str | None:
        return None

    def check(
        self, o: ArtifactOptions, src: SourceModel, spec: ElasticSpec, elastic: Path, writing: bool
    ) -> None:
        pass

    def plan(self, job: WriteJob) -> Written:
        from ..elastic.slicing import planned_specs

        plan = ShardPlan.make(planned_specs(job.src, job.spec, job.cfg), job.options.max_shard_bytes)
        kind = hf_config_for(job.src.config, job.spec, job.cfg, job.options.fmt)[1]
        n = sum(math.prod(v["shape"]) for h in plan.headers for k, v in h.items() if k != "__metadata__")
        return Written(kind, n, {"planned_bytes": plan.total_bytes, "planned_files": plan.files})

    def write(self, job: WriteJob, tmp: Path, verify: bool, rep: Reporter) -> Written:
        from ..elastic.slicing import planned_specs, stream_sliced

        src, spec, cfg = job.src, job.spec, job.cfg
        hf_cfg, kind = hf_config_for(src.config, spec, cfg, job.options.fmt)
        written = [0]  # parameters actually written

        def counted(stream):
            for name, x in stream:
                written[0] += x.numel()
                yield name, x

        write_model(
            tmp,
            planned_specs(src, spec, cfg),
            counted(stream_sliced(src, spec, cfg, job.overrides)),
            job.options.max_shard_bytes,
        )
        layout.write_json(tmp / "config.json", hf_cfg)
        copy_files(
            [
                f
                for f in src.non_weight_files()
                if f.name != "config.json" and not layout.is_flex_file(f.name)
            ],
            tmp,
        )
        if kind == "flex":
            (tmp / layout.MODELING).write_text(modeling_source(src.config["model_type"]))
        layout.write_json(tmp / layout.EXTRACT, {**job.provenance, "format": kind, "params": written[0]})
        out = Written(kind, written[0])
        if verify:  # before the commit: a sub-model that fails verification is never left behind
            out.fields["verified_max_rel_err"] = verify_submodel(job, tmp, rep)
            out.fields["verified_in"] = "transformers"
        return out

    def backend(self, path: Path, o) -> TorchBackend:
        return TorchBackend(path, o)

    def options_for(self, table):
        from ..latency.profile import ProfileOptions, regime_kw

        r = table.regime
        if r.device == "cuda" and not torch.cuda.is_available():
            return None
        o = ProfileOptions(device=r.device, dtype=r.dtype, cuda_graphs=r.graphs, **regime_kw(r))
        return o if device_name(torch.device(r.device)) == r.device_name else None


def verify_submodel(job: WriteJob, sub: Path, rep: Reporter) -> float:
    """Max relative logit error of the extracted model vs the elastic model at the job's configuration
    (its compensated weights written in) on the same batch."""
    from transformers import AutoModelForCausalLM

    from ..arch.hf_modeling import register  # imports transformers: only when verifying

    register()
    with rep.task("verifying against the elastic model"), torch.no_grad():
        el = job.reference()
        model = AutoModelForCausalLM.from_pretrained(sub, dtype=torch.float32, local_files_only=True).eval()
        x = torch.randint(0, job.spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        want = el(input_ids=x).logits
        got = model(input_ids=x).logits
        err = ((got - want).abs().max() / want.abs().max()).item()
    if err > MAX_REL_ERR:
        raise RuntimeFailure(
            f"verification failed: the extracted model's logits differ from the elastic "
            f"model's by {err:.2e} (nothing was written)"
        )
    return err
