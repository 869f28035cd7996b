"""`flex extract`: cut standalone sub-models out of an elastic checkpoint, streamed out-of-core.

plan (budget -> configuration, plan.search) -> streaming slicer (elastic.slicing) -> a writer
(io.safetensors for a transformers directory, io.gguf_export for one llama.cpp file) into a temporary
sibling -> verification against the elastic model (in transformers, or in llama.cpp for GGUF) ->
atomic commit.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..arch.spec import Config, ElasticSpec, config_to_json
from ..elastic.runtime import load_elastic
from ..elastic.slicing import planned_specs, stream_sliced
from ..errors import RuntimeFailure, UsageError
from ..io import layout
from ..io.atomic import atomic_dir, atomic_file, check_output, copy_files
from ..io.gguf_export import GGUF_TYPES, check_tokenizer, plan_gguf, write_gguf
from ..io.safetensors import ShardPlan, write_model
from ..io.source import SourceModel
from ..io.submodel import hf_config_for, modeling_source
from ..latency.table import LatencyTable
from ..plan.search import Request, Target, optional_table, param_counter, resolve_targets
from ..progress import Reporter
from ..router.store import load_router

FORMATS = ("auto", "stock", "flex", "gguf")
GGUF_MIN_AGREEMENT = 0.99  # top-1 agreement llama.cpp must reach with the sub-model for f32 / f16 files


@dataclass(kw_only=True)
class ExtractOptions:
    request: Request  # budgets, an explicit configuration, or uniform fractions
    output: Path | None = None  # default ./NAME-BUDGET; with several budgets the parent of one dir each
    regime: str | None = None  # latency-table regime key (or a unique part of it); None: the newest
    fmt: str = "auto"  # auto | stock (uniform only) | flex (per-layer sizes) | gguf (llama.cpp)
    gguf_type: str = "f16"  # gguf: f32 | f16 | bf16 | q8_0
    max_shard_bytes: int = 5 * 10**9
    verify: bool | None = None  # None: when the model fits comfortably in RAM
    dry_run: bool = False  # plan only: shapes, shards and sizes from the headers
    force: bool = False


@dataclass
class SubModel:
    output: str
    format: str
    needs_remote_code: bool
    config: list[dict[str, int]]
    params: int
    method: str
    budget: str | None
    budget_ms: float | None
    predicted_latency_ms: float | None
    measured_latency_ms: float | None = None  # in the table's regime (runtime), this run
    verified_max_rel_err: float | None = None
    regime: str | None = None
    planned_bytes: int | None = None  # total size of the output weight files
    planned_files: list[str] | None = None
    gguf_arch: str | None = None  # gguf: llama.cpp architecture (llama / qwen2 when uniform, else deci)
    gguf_type: str | None = None
    verified_in: str | None = None  # the runtime the logits were compared in; None: not verified
    verify_note: str | None = None  # why not, when verification was asked for but could not run
    top1_agreement: float | None = None  # gguf: share of positions where llama.cpp's argmax matches
    reference_ms: float | None = None  # the full model, timed in pairs with the sub-model
    reference_drift: float | None = None  # reference_ms / the table's full model - 1
    measured_at_table_speed_ms: float | None = None  # measured, rescaled to the machine's speed at table time
    latency_note: str | None = None  # why the latency was not measured, when a table exists


@dataclass
class ExtractResult:
    elastic: str
    models: list[SubModel] = field(default_factory=list)
    seconds: float = 0.0


def extract(elastic: Path, options: ExtractOptions, reporter: Reporter | None = None) -> ExtractResult:
    """Write one sub-model per requested configuration (several: one directory each inside the output)."""
    rep = reporter or Reporter()
    o = options
    t0 = time.time()
    if o.fmt not in FORMATS:
        raise UsageError(f"format must be auto, stock, flex or gguf, got {o.fmt!r}", option="fmt")
    if o.fmt == "gguf" and o.gguf_type not in GGUF_TYPES:
        raise UsageError(f"must be one of {', '.join(GGUF_TYPES)}, got {o.gguf_type!r}", option="gguf_type")
    spec = layout.read_spec(elastic)
    src = SourceModel.open(elastic)
    table = optional_table(elastic, o.regime)
    if (
        o.fmt == "gguf"
        and wants_latency(o.request)
        and table is not None
        and table.regime.device != "llama.cpp"
    ):
        rep.warn(
            f"latency budgets are read in regime {table.regime.key}, not in llama.cpp; for llama.cpp budgets run "
            "`flex profile --runtime llama.cpp` and extract with --regime llama.cpp"
        )
    wants_router = wants_latency(o.request)
    router = load_router(elastic, "static") if wants_router else None
    targets = resolve_targets(elastic, spec, src.config, o.request, table, router, rep)  # type: ignore[arg-type]
    outs = _outputs(elastic, o.output, targets, ".gguf" if o.fmt == "gguf" else "")
    if o.fmt == "gguf":
        check_tokenizer(elastic, spec.dims.vocab_size)
    res = ExtractResult(str(elastic))
    if o.dry_run:  # shapes, shards and sizes from the headers alone; nothing is read or written
        res.models = [_planned(src, spec, t, out, table, o) for t, out in zip(targets, outs)]
    else:
        _check_outputs(outs, many=len(targets) > 1, force=o.force, files=o.fmt == "gguf")
        verify = o.verify if o.verify is not None else _fits_in_ram(spec, src.config)
        write = _write_gguf if o.fmt == "gguf" else _write
        res.models = [
            write(elastic, src, spec, t, out, table, o, verify, rep) for t, out in zip(targets, outs)
        ]
    res.seconds = round(time.time() - t0, 3 if o.dry_run else 2)
    return res


def wants_latency(request: Request) -> bool:
    return request.budgets is not None and any(b.kind != "params" for b in request.budgets)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", label.replace("%", "pct")) or "sub"


def _outputs(elastic: Path, out: Path | None, targets: list[Target], suffix: str = "") -> list[Path]:
    """One output per target: ./NAME-LABEL[SUFFIX], or with several a directory of LABEL[SUFFIX] each."""
    many = len(targets) > 1
    stem = elastic.resolve().name.removesuffix("-elastic")
    one = f"{stem}-{_slug(targets[0].label)}{suffix}"
    base = (out or Path.cwd() / (f"{stem}-submodels" if many else one)).resolve()
    return [base / f"{_slug(t.label)}{suffix}" for t in targets] if many else [base]


def _check_outputs(outs: list[Path], many: bool, force: bool, files: bool = False) -> None:
    """Every output checked before the first is written; with several, their parent is created."""
    base = outs[0].parent if many else outs[0]
    if many and base.exists() and not base.is_dir():
        raise UsageError(f"output {base} exists and is not a directory", option="output")
    for o in outs:
        if o.parent.exists():
            check_output(o, force, file=files)
    if many:
        base.mkdir(parents=True, exist_ok=True)


def _fits_in_ram(spec: ElasticSpec, config: dict) -> bool:
    """Verification loads the elastic model and the sub-model in fp32: do so below half the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return param_counter(spec, config)(spec.full()) * 4 * 3 < ram * 0.5


def _record(t: Target, out: Path, kind: str, n_params: int, table: LatencyTable | None) -> SubModel:
    return SubModel(
        str(out),
        kind,
        kind == "flex",
        config_to_json(t.cfg),
        n_params,
        t.method,
        t.budget.text if t.budget else None,
        t.budget_ms,
        table.predict(t.cfg) if table is not None else None,
        regime=table.regime.key if table else None,
    )


def _planned(
    src: SourceModel, spec: ElasticSpec, t: Target, out: Path, table: LatencyTable | None, o: ExtractOptions
) -> SubModel:
    if o.fmt == "gguf":
        gp = plan_gguf(spec.family, src.config, spec, t.cfg, planned_specs(src, spec, t.cfg), o.gguf_type)
        sm = _record(t, out, "gguf", sum(math.prod(s) for _, _, s, _ in gp.tensors), table)
        sm.planned_bytes, sm.planned_files = gp.nbytes, [out.name]
        sm.gguf_arch, sm.gguf_type = gp.arch, o.gguf_type
        return sm
    plan = ShardPlan.make(planned_specs(src, spec, t.cfg), o.max_shard_bytes)
    kind = hf_config_for(src.config, spec, t.cfg, o.fmt)[1]
    n = sum(math.prod(v["shape"]) for h in plan.headers for k, v in h.items() if k != "__metadata__")
    sm = _record(t, out, kind, n, table)
    sm.planned_bytes, sm.planned_files = plan.total_bytes, plan.files
    return sm


def _write(
    elastic: Path,
    src: SourceModel,
    spec: ElasticSpec,
    t: Target,
    out: Path,
    table: LatencyTable | None,
    o: ExtractOptions,
    verify: bool,
    rep: Reporter,
) -> SubModel:
    hf_cfg, kind = hf_config_for(src.config, spec, t.cfg, o.fmt)
    with atomic_dir(out, o.force) as tmp, rep.task(f"extracting {t.label} -> {out.name}"):
        written = [0]  # parameters actually written

        def counted(stream):
            for name, x in stream:
                written[0] += x.numel()
                yield name, x

        write_model(
            tmp, planned_specs(src, spec, t.cfg), counted(stream_sliced(src, spec, t.cfg)), o.max_shard_bytes
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
        sm = _record(t, out, kind, written[0], table)
        layout.write_json(
            tmp / layout.EXTRACT,
            {
                "source": str(elastic.resolve()),
                "format": kind,
                "config": sm.config,
                "method": t.method,
                "budget": sm.budget,
                "budget_ms": t.budget_ms,
                "predicted_latency_ms": sm.predicted_latency_ms,
                "regime": sm.regime,
                "params": sm.params,
            },
        )
        if verify:  # before the commit: a sub-model that fails verification is never left behind
            sm.verified_max_rel_err = verify_submodel(elastic, tmp, spec, t.cfg, rep)
            sm.verified_in = "transformers"
            measure_latency(elastic, table, sm, rep, tmp)
    return sm


def _write_gguf(
    elastic: Path,
    src: SourceModel,
    spec: ElasticSpec,
    t: Target,
    out: Path,
    table: LatencyTable | None,
    o: ExtractOptions,
    verify: bool,
    rep: Reporter,
) -> SubModel:
    """One llama.cpp file: planned from the headers, streamed, verified in llama.cpp, then committed."""
    from .. import llamacpp

    plan = plan_gguf(spec.family, src.config, spec, t.cfg, planned_specs(src, spec, t.cfg), o.gguf_type)
    with (
        atomic_file(out, o.force) as tmp,
        rep.task(f"extracting {t.label} -> {out.name} ({plan.arch}, {o.gguf_type})"),
    ):
        sm = _record(t, out, "gguf", 0, table)
        provenance = {
            "source": str(elastic.resolve()),
            "config": sm.config,
            "method": t.method,
            "budget": sm.budget,
        }
        sm.params = write_gguf(
            tmp,
            plan,
            stream_sliced(src, spec, t.cfg),
            src.config,
            spec,
            t.cfg,
            o.gguf_type,
            elastic,
            f"{elastic.resolve().name.removesuffix('-elastic')} {t.label}",
            provenance,
        )
        sm.gguf_arch, sm.gguf_type = plan.arch, o.gguf_type
        if verify:  # before the commit, as for the other formats
            if (why := llamacpp.missing()) is not None:
                sm.verify_note = why
            else:
                sm.top1_agreement, sm.verified_max_rel_err = verify_gguf(
                    elastic, tmp, spec, t.cfg, o.gguf_type, rep
                )
                sm.verified_in = llamacpp.version()
                measure_latency(elastic, table, sm, rep, tmp)
    return sm


def verify_gguf(
    elastic: Path, gguf: Path, spec: ElasticSpec, cfg: Config, gguf_type: str, rep: Reporter
) -> tuple[float, float]:
    """(top-1 agreement, max relative logit error) of llama.cpp running `gguf` against the elastic model
    at `cfg`, on held-out stdlib text; f32 / f16 files below GGUF_MIN_AGREEMENT fail (nothing is kept)."""
    from transformers import AutoTokenizer

    from .. import llamacpp
    from ..train.data import load_sequences

    with rep.task("verifying in llama.cpp"), torch.no_grad():
        tok = AutoTokenizer.from_pretrained(elastic, local_files_only=True)
        seqs = load_sequences(tok, "stdlib", 4, 64, "heldout")  # (4, 64)
        el = load_elastic(elastic)
        with el.configured(cfg):
            want = el(input_ids=seqs).logits.float().numpy()  # (4, 64, vocab)
        del el
        with llamacpp.Model(gguf, n_ctx=seqs.shape[1], threads=None, logits=True) as m:
            got = np.stack([m.logits(s.tolist()) for s in seqs])
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    err = float(np.abs(got - want).max() / np.abs(want).max())
    if gguf_type in ("f32", "f16") and top1 < GGUF_MIN_AGREEMENT:
        raise RuntimeFailure(
            f"verification failed: llama.cpp's top-1 token agrees with the sub-model on {top1:.1%} of "
            f"{got.shape[0] * got.shape[1]} held-out positions (need {GGUF_MIN_AGREEMENT:.0%}; max relative "
            f"logit error {err:.2e}); nothing was written"
        )
    return top1, err


def verify_submodel(elastic: Path, sub: Path, spec: ElasticSpec, cfg: Config, rep: Reporter) -> float:
    """Max relative logit error of the extracted model vs the elastic model at `cfg` on the same batch."""
    from transformers import AutoModelForCausalLM

    from ..arch.hf_modeling import register  # imports transformers: only when verifying

    register()
    with rep.task("verifying against the elastic model"), torch.no_grad():
        el = load_elastic(elastic)
        model = AutoModelForCausalLM.from_pretrained(sub, dtype=torch.float32, local_files_only=True).eval()
        x = torch.randint(0, spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with el.configured(cfg):
            want = el(input_ids=x).logits
        got = model(input_ids=x).logits
        err = ((got - want).abs().max() / want.abs().max()).item()
    if err > 1e-4:
        raise RuntimeFailure(
            f"verification failed: the extracted model's logits differ from the elastic "
            f"model's by {err:.2e} (nothing was written)"
        )
    return err


def measure_latency(
    elastic: Path, table: LatencyTable | None, sm: SubModel, rep: Reporter, artifact: Path
) -> None:
    """The written sub-model's latency in the table's regime, timed in pairs with the full model, into
    `sm` (measured, the reference's drift since the table, and the measurement at the table's speed); or
    why it was not timed."""
    from ..latency.profile import open_session, options_for, time_alongside

    if table is None:
        return
    o = options_for(table)
    if o is None:
        sm.latency_note = f"regime {table.regime.key} cannot be timed on this machine"
        return
    if (o.runtime == "llama.cpp") != (sm.format == "gguf"):
        sm.latency_note = f"a {sm.format} model is not timed in the {o.runtime} regime {table.regime.key}"
        return
    with rep.task(f"timing in {table.regime.key}"), torch.inference_mode():
        sess = open_session(elastic, o)
        try:
            if sm.format == "gguf":
                opened = sess.backend.open_file(artifact)
            else:
                from transformers import AutoModelForCausalLM

                from ..arch.hf_modeling import register

                register()
                model = AutoModelForCausalLM.from_pretrained(
                    artifact, dtype=getattr(torch, o.dtype), local_files_only=True
                )
                opened = sess.backend.open_model(model.to(sess.backend.runner.device).eval())
            with opened as fn:
                a = time_alongside(sess, table, fn)
        finally:
            sess.close()
    sm.measured_latency_ms, sm.reference_ms = a.measured_ms, a.reference_ms
    sm.reference_drift, sm.measured_at_table_speed_ms = a.reference_drift, a.at_table_speed_ms
