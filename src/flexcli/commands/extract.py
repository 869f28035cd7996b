"""`flex extract`: cut standalone sub-models out of an elastic checkpoint, streamed out-of-core.

plan (budget -> configuration, plan.search) -> the runtime the format belongs to (runtimes: torch for
a transformers directory, llama.cpp for one GGUF file) writes it into a temporary sibling through the
streaming slicer and verifies it against the elastic model -> its latency in the table's regime, timed
in pairs with the full model -> atomic commit.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import runtimes
from ..arch.spec import ElasticSpec, config_to_json
from ..device import ram_bytes
from ..errors import UsageError
from ..io import layout
from ..io.atomic import atomic_dir, atomic_file, check_output
from ..io.source import SourceModel
from ..latency.table import LatencyTable
from ..plan.search import Request, Target, optional_table, param_counter, resolve_targets
from ..progress import Reporter
from ..router.store import load_router
from ..runtimes.base import ArtifactOptions, Runtime, WriteJob, Written

FORMATS = ("auto", "stock", "flex", "gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(kw_only=True)
class ExtractOptions:
    request: Request  # budgets, an explicit configuration, or uniform fractions
    output: Path | None = None  # default ./NAME-BUDGET; with several budgets the parent of one dir each
    regime: str | None = None  # latency-table regime key (or a unique part of it); None: the newest
    fmt: str = "auto"  # auto | stock (uniform only) | flex (per-layer sizes) | gguf (llama.cpp)
    gguf_type: str = (
        "f16"  # gguf: WEIGHTS[/EMBED], f32 | f16 | bf16 as written, others via llama.cpp's quantizer
    )
    imatrix: bool = True  # gguf, quantized: the sub-model's importance matrix weighs the quantizer
    imatrix_tokens: int = 8192  # calibration tokens for the importance matrix
    # refit narrowed output projections on calibration text (elastic.compensate); None: when the model
    # and its calibration moments fit comfortably in RAM
    compensate: bool | None = None
    compensate_tokens: int = 16384
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
    bits_per_weight: float | None = None  # gguf: all tensor bytes x 8 / all values
    stored_types: dict[str, int] | None = None  # gguf: tensors per stored ggml type
    file_bytes: int | None = None
    imatrix: bool | None = None  # gguf, quantized: an importance matrix weighed the quantizer
    fallbacks: int | None = None  # gguf, quantized: tensors stored in another type (rows not whole blocks)
    fallbacks_from_widths: int | None = None  # ... of them ffn_down / attn_output rows (widths flexcli chose)
    fallbacks_from_model_shape: int | None = None  # ... of them rows the model's hidden size fixes
    fallback_tensors: list[str] | None = None
    block: int | None = None  # dry run, quantized: values per quantization block of the weights' type
    width_rows_not_whole: int | None = None  # dry run: planned ffn_down / attn_output rows not whole blocks
    hidden_not_whole: bool | None = None  # dry run: the hidden size itself is not whole blocks
    verified_in: str | None = None  # the runtime the logits were compared in; None: not verified
    verify_note: str | None = None  # why not, when verification was asked for but could not run
    top1_agreement: float | None = None  # gguf: share of positions where llama.cpp's argmax matches
    f16_top1_agreement: float | None = (
        None  # gguf, quantized: the 16-bit file it came from vs the elastic model
    )
    f16_max_rel_err: float | None = None
    ppl_f16: float | None = None  # gguf, quantized: held-out perplexity in llama.cpp of the 16-bit file
    ppl_quantized: float | None = None  # ... and of the quantized file
    ppl_ratio: float | None = None  # ppl_quantized / ppl_f16
    reference_ms: float | None = None  # the full model, timed in pairs with the sub-model
    reference_drift: float | None = None  # reference_ms / the table's full model - 1
    measured_at_table_speed_ms: float | None = None  # measured, rescaled to the machine's speed at table time
    latency_note: str | None = None  # why the latency was not measured, when a table exists
    compensation: dict | None = None  # the refit of narrowed output projections (elastic.compensate)
    compensation_note: str | None = None  # why it was not applied, when it was asked for or defaulted
    candidates: list[dict] | None = (
        None  # --gguf-type auto: every type's configuration for the budget, scored
    )


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
    rt = runtimes.for_format(o.fmt)
    if o.fmt == "gguf" and o.gguf_type == "auto":
        if o.dry_run:
            raise UsageError(
                "--gguf-type auto writes and scores every candidate; it has no dry run", option="dry_run"
            )
        return _extract_auto(elastic, o, rep, t0)
    art = ArtifactOptions(
        fmt=o.fmt,
        gguf_type=o.gguf_type,
        imatrix=o.imatrix,
        imatrix_tokens=o.imatrix_tokens,
        max_shard_bytes=o.max_shard_bytes,
    )
    spec = layout.read_spec(elastic)
    src = SourceModel.open(elastic)
    rt.check(art, src, spec, elastic, writing=not o.dry_run)
    table = optional_table(elastic, o.regime)
    if wants_latency(o.request) and table is not None and table.regime.runtime != rt.name:
        rep.warn(
            f"latency budgets are read in regime {table.regime.key}, not in {rt.name}; for {rt.name} budgets "
            f"run `flex profile --runtime {rt.name}` and extract with --regime {rt.name}"
        )
    wants_router = wants_latency(o.request)
    router = load_router(elastic, "static", table.regime.key if table else None) if wants_router else None
    targets = resolve_targets(elastic, spec, src.config, o.request, table, router, rep)  # type: ignore[arg-type]
    outs = _outputs(elastic, o.output, targets, rt.suffix)
    res = ExtractResult(str(elastic))
    jobs = [_job(elastic, src, spec, t, table, art) for t in targets]
    notes = [None] * len(jobs) if o.dry_run else compensate_jobs(elastic, src, spec, jobs, o, rep)
    if o.dry_run:  # shapes, shards and sizes from the headers alone; nothing is read or written
        res.models = [_record(t, out, rt.plan(j), table) for t, out, j in zip(targets, outs, jobs)]
        for m in res.models if rt.suffix else []:  # one file: the output itself
            m.planned_files = [Path(m.output).name]
    else:
        _check_outputs(outs, many=len(targets) > 1, force=o.force, files=bool(rt.suffix))
        verify = o.verify if o.verify is not None else _fits_in_ram(spec, src.config)
        res.models = [
            _write(rt, j, t, out, table, o.force, verify, rep) for t, out, j in zip(targets, outs, jobs)
        ]
        for m, j, note in zip(res.models, jobs, notes):
            m.compensation, m.compensation_note = j.provenance.get("compensation"), note
    res.seconds = round(time.time() - t0, 3 if o.dry_run else 2)
    return res


AUTO_EVAL = (4, 256)  # held-out calibration-text sequences x tokens each candidate is scored on


def _extract_auto(elastic: Path, o: ExtractOptions, rep: Reporter, t0: float) -> ExtractResult:
    """--gguf-type auto: for each latency budget, every llama.cpp table (one per GGUF type) proposes its
    configuration (its static router, else the greedy search); each proposal is written at its type,
    verified and timed in its own regime, and scored by held-out loss in llama.cpp on the conversion's
    calibration text; the lowest loss is kept, the others are reported as runners-up."""
    from dataclasses import replace

    from ..io.atomic import sibling
    from ..latency.table import load_table, matching_regimes
    from ..runtimes import llamacpp

    req = o.request
    if req.budgets is None or any(b.kind != "latency" for b in req.budgets):
        raise UsageError(
            "--gguf-type auto compares types at one latency: give --budget in ms or s (a percentage is a share "
            "of one table's full model)",
            option="gguf_type",
        )
    llamacpp.require("--gguf-type auto scores candidates in llama.cpp")
    rt = runtimes.get("llama.cpp")
    keys = [k for k in matching_regimes(elastic, o.regime or "llama.cpp:") if k.startswith("llama.cpp:")]
    if not keys:
        raise UsageError(
            "--gguf-type auto chooses among llama.cpp latency tables; run `flex profile --runtime llama.cpp "
            "--gguf-type q4_0,q8_0,f16` first",
            option="gguf_type",
        )
    spec, src = layout.read_spec(elastic), SourceModel.open(elastic)
    rt.check(ArtifactOptions(fmt="gguf", imatrix_tokens=o.imatrix_tokens), src, spec, elastic, writing=True)
    tables = [load_table(elastic, k) for k in keys]
    first = _auto_targets(elastic, spec, src, req.budgets[0], tables, rep)  # infeasible: before any output
    stem = elastic.resolve().name.removesuffix("-elastic")
    many = len(req.budgets) > 1
    if many:
        base = (o.output or Path.cwd() / f"{stem}-submodels").resolve()
        outs = [base / f"{_slug(b.text)}{rt.suffix}" for b in req.budgets]
    else:
        outs = [(o.output or Path.cwd() / f"{stem}-{_slug(req.budgets[0].text)}{rt.suffix}").resolve()]
    _check_outputs(outs, many=many, force=o.force, files=True)
    from ..train.data import calibration_text

    seqs = calibration_text(elastic, *AUTO_EVAL, "heldout")
    res = ExtractResult(str(elastic))
    for b, out in zip(req.budgets, outs):
        cands = first if b is req.budgets[0] else _auto_targets(elastic, spec, src, b, tables, rep)
        scored: list[tuple[float, SubModel, Path]] = []
        scratch = []
        try:
            with atomic_file(out, o.force) as tmp:
                jobs = []
                for table, t in cands:
                    art = ArtifactOptions(fmt="gguf", gguf_type=table.regime.dtype, imatrix=o.imatrix,
                                          imatrix_tokens=o.imatrix_tokens)  # fmt: skip
                    jobs.append(_job(elastic, src, spec, t, table, art))
                notes = compensate_jobs(elastic, src, spec, jobs, o, rep)
                for i, ((table, t), job, note) in enumerate(zip(cands, jobs, notes)):
                    f = sibling(out, f"cand{i}-{os.getpid()}")
                    scratch.append(f)
                    with rep.task(f"candidate {table.regime.dtype}: {t.label}"):
                        w = rt.write(job, f, True, rep)
                        for msg in w.warnings:
                            rep.warn(f"{out.name} ({table.regime.dtype} candidate): {msg}")
                        sm = _record(t, out, w, table)
                        sm.compensation, sm.compensation_note = job.provenance.get("compensation"), note
                        measure_latency(elastic, table, sm, rep, f)
                        loss = math.log(llamacpp.perplexity(f, seqs))
                    scored.append((loss, sm, f))
                scored.sort(key=lambda x: x[0])
                loss, best, f = scored[0]
                os.replace(f, tmp)
        finally:
            for f in scratch:
                f.unlink(missing_ok=True)
        best.candidates = [
            {
                "gguf_type": sm.gguf_type,
                "regime": sm.regime,
                "config": sm.config,
                "method": sm.method,
                "predicted_latency_ms": sm.predicted_latency_ms,
                "measured_latency_ms": sm.measured_latency_ms,
                "measured_at_table_speed_ms": sm.measured_at_table_speed_ms,
                "file_bytes": sm.file_bytes,
                "bits_per_weight": sm.bits_per_weight,
                "heldout_loss": x,
                "chosen": sm is best,
            }
            for x, sm, _ in scored
        ]
        res.models.append(replace(best, output=str(out)))
    res.seconds = round(time.time() - t0, 2)
    return res


def _auto_targets(
    elastic: Path, spec: ElasticSpec, src: SourceModel, budget, tables: list[LatencyTable], rep: Reporter
) -> list[tuple[LatencyTable, Target]]:
    """(table, its configuration for `budget`) for each llama.cpp table the budget is feasible in."""
    from ..errors import InfeasibleError

    out, below = [], []
    for table in tables:
        router = load_router(elastic, "static", table.regime.key)
        try:
            t = resolve_targets(
                elastic, spec, src.config, Request(budgets=[budget]), table, router, Reporter()
            )
        except InfeasibleError:
            below.append(f"{table.regime.dtype} {table.smallest_ms():.3f} ms")
            continue
        out.append((table, t[0]))
    if not out:
        raise InfeasibleError(
            f"budget {budget.text} is below the smallest sub-network of every llama.cpp table ({', '.join(below)})"
        )
    for b in below:
        rep.info(f"{budget.text}: not feasible at {b} (its smallest sub-network)")
    return out


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
    return param_counter(spec, config)(spec.full()) * 4 * 3 < ram_bytes() * 0.5


def compensate_jobs(
    elastic: Path, src: SourceModel, spec: ElasticSpec, jobs: list[WriteJob], o: ExtractOptions, rep: Reporter
) -> list[str | None]:
    """Refit every job's narrowed output projections (elastic.compensate) from one pass of the
    conversion's calibration text through the full model: the refit tensors go into `job.overrides`, what
    was done into its provenance; returns, per job, why it was not compensated (None: it was, or it
    narrows nothing)."""
    from ..elastic import compensate
    from ..elastic.runtime import load_elastic
    from ..train.data import calibration_sequences

    if o.compensate is False:
        return ["--no-compensate"] * len(jobs)
    wanted = set().union(*(compensate.narrowed(spec, j.cfg) for j in jobs))
    if not wanted:
        return [None] * len(jobs)
    moments_bytes = compensate.moments_bytes(spec, wanted)
    model_bytes = param_counter(spec, src.config)(spec.full()) * 4
    note = None
    if not any((elastic / f).is_file() for f in TOKENIZER_FILES):
        note = "skipped: the checkpoint has no tokenizer to read its calibration text with"
    elif model_bytes + moments_bytes > ram_bytes() * 0.5:
        note = (
            f"skipped: the fp32 model and its calibration moments ({(model_bytes + moments_bytes) / 2**30:.1f} GiB) "
            "do not fit comfortably in RAM (--compensate forces it)"
        )
    if note is not None and o.compensate is None:
        rep.warn(f"compensation {note}")
        return [note] * len(jobs)
    seqs = calibration_sequences(elastic, o.compensate_tokens)
    el = load_elastic(elastic)
    t0 = time.time()
    with rep.task(
        f"compensation: {len(wanted)} narrowed projections, {seqs.numel()} calibration tokens",
        total=len(seqs),
    ) as task:
        bank = compensate.calibrated_bank(
            el.model, el.arch, spec, seqs, wanted, src.stored_dtypes(), task.advance, src.weights_identity()
        )
    cal = (layout.read_manifest(elastic).get("recipe") or {}).get("calibration") or {}
    for j in jobs:
        j.overrides = bank.overrides(j.cfg)
        if j.overrides:
            j.provenance["compensation"] = {
                "method": "damped least-squares refit of the narrowed down_proj / o_proj columns on the full "
                "model's calibration activations",
                "tensors": len(j.overrides),
                "calibration_data": cal.get("data") or "stdlib",
                "tokens": int(seqs.numel()),
                "damping": compensate.DAMPING,
                "seconds": round(time.time() - t0, 2),
            }
    return [None] * len(jobs)


def _job(
    elastic: Path,
    src: SourceModel,
    spec: ElasticSpec,
    t: Target,
    table: LatencyTable | None,
    art: ArtifactOptions,
) -> WriteJob:
    stem = elastic.resolve().name.removesuffix("-elastic")
    provenance = {
        "source": str(elastic.resolve()),
        "config": config_to_json(t.cfg),
        "method": t.method,
        "budget": t.budget.text if t.budget else None,
        "budget_ms": t.budget_ms,
        "predicted_latency_ms": table.predict(t.cfg) if table is not None else None,
        "regime": table.regime.key if table else None,
    }
    return WriteJob(elastic, src, spec, t.cfg, f"{stem} {t.label}", provenance, art)


def _record(t: Target, out: Path, w: Written, table: LatencyTable | None) -> SubModel:
    sm = SubModel(
        str(out),
        w.kind,
        w.kind == "flex",
        config_to_json(t.cfg),
        w.params,
        t.method,
        t.budget.text if t.budget else None,
        t.budget_ms,
        table.predict(t.cfg) if table is not None else None,
        regime=table.regime.key if table else None,
    )
    for k, v in w.fields.items():
        setattr(sm, k, v)
    return sm


def _write(
    rt: Runtime,
    job: WriteJob,
    t: Target,
    out: Path,
    table: LatencyTable | None,
    force: bool,
    verify: bool,
    rep: Reporter,
) -> SubModel:
    """One sub-model written by its runtime into a temporary sibling, verified, timed, then committed."""
    what = f" ({job.options.gguf_type})" if rt.suffix else ""
    with (
        (atomic_file if rt.suffix else atomic_dir)(out, force) as tmp,
        rep.task(f"extracting {t.label} -> {out.name}{what}"),
    ):
        w = rt.write(job, tmp, verify, rep)
        for msg in w.warnings:
            rep.warn(f"{out.name}: {msg}")
        sm = _record(t, out, w, table)
        if verify and sm.verified_in is not None:
            measure_latency(job.elastic, table, sm, rep, tmp)
    return sm


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
    if sm.format not in runtimes.get(o.runtime).formats:
        sm.latency_note = f"a {sm.format} model is not timed in the {o.runtime} regime {table.regime.key}"
        return
    if sm.gguf_type is not None and sm.gguf_type != table.regime.dtype:
        sm.latency_note = (
            f"a {sm.gguf_type} file is not timed in the {table.regime.dtype} regime {table.regime.key}"
        )
        return
    with rep.task(f"timing in {table.regime.key}"), torch.inference_mode():
        sess = open_session(elastic, o)
        try:
            with sess.backend.open_artifact(artifact) as fn:
                a = time_alongside(sess, table, fn)
        finally:
            sess.close()
    sm.measured_latency_ms, sm.reference_ms = a.measured_ms, a.reference_ms
    sm.reference_drift, sm.measured_at_table_speed_ms = a.reference_drift, a.at_table_speed_ms
