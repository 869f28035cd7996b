"""llama.cpp as a runtime, through its Python bindings (llama-cpp-python, an optional dependency).

- write: one GGUF file (io.gguf_export streams it; f32 / f16 / bf16 as they are, every quantized type
  through llama.cpp's own quantizer from the exporter's 16-bit file, with the sub-model's importance
  matrix; runtimes.quant). Verification runs the file in llama.cpp on held-out text: a plain file's
  top-1 token must agree with the elastic model's (99%); a quantized one is compared with the 16-bit
  file of the same sub-model (top-1 agreement and perplexity ratio reported), which is itself checked
  against the elastic model first.
- timing: each configuration is written as `flex extract --format gguf` would write it (same writer,
  same types) into a scratch directory and loaded with the regime's threads. A call is one
  `llama_decode`: prefill is SEQ tokens from an empty cache; decode is one token after KV_LEN cached
  tokens, with the cache cut back after every step so it never grows (as latency.timing does for
  PyTorch). llama.cpp cannot run the fixed part alone, so it is derived from depth: a one-layer model at
  full width (T1) and the full model (TL) give fixed = (L*T1 - TL) / (L - 1).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch.spec import Config, ElasticSpec
from ..device import device_name
from ..errors import RuntimeFailure, UsageError
from ..io import layout
from ..io.source import SourceModel
from ..latency.table import Regime
from ..progress import Reporter
from . import quant
from .base import ArtifactOptions, Fn, WriteJob, Written

INSTALL_HINT = "make install-llamacpp (or pip install 'flexcli[llamacpp]')"
MIN_AGREEMENT = 0.99  # top-1 agreement llama.cpp must reach with the sub-model for f32 / f16 files
VERIFY_SHAPE = (4, 64)  # held-out sequences x tokens run through llama.cpp when verifying


def missing() -> str | None:
    """Why llama.cpp cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    except OSError as e:  # the shared library failed to load
        return f"llama-cpp-python is installed but its library does not load ({e})"
    return None


def require(what: str = "") -> None:
    if (why := missing()) is not None:
        raise UsageError(f"{what}: {why}" if what else why)


def version() -> str:
    import llama_cpp

    return f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"


def default_threads() -> int:
    """llama.cpp's own default: the physical cores, approximated by the CPUs this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


class Model:
    """One GGUF loaded in llama.cpp with a context of `n_ctx` tokens. `logits` (verification) keeps every
    position's logits, the KV cache in f32 rather than llama.cpp's default f16 and attention off the
    flash path (which rounds through f16), so a comparison measures the file, not the runtime's precision
    choices; timing runs as a server does (f16 cache, flash attention)."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, logits: bool = False):
        require()
        from llama_cpp import GGML_TYPE_F32, Llama

        n = threads or default_threads()
        try:
            with _quiet():
                self.llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=n_ctx,
                    n_ubatch=n_ctx,
                    n_threads=n,
                    n_threads_batch=n,
                    logits_all=logits,
                    # timing: flash attention, as llama-server's default (auto) runs the CPU backend;
                    # verification: the plain attention path, which computes in f32
                    flash_attn=not logits,
                    verbose=False,
                    **({"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if logits else {}),
                )
        except (ValueError, RuntimeError) as e:
            raise RuntimeFailure(f"llama.cpp cannot load {path}: {e}") from None
        self.threads = n

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of one sequence, from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def step_fn(self, phase: str, ids: list[int], ctx: list[int]) -> Callable[[], Any]:
        """The timed call: prefill `ids` from an empty cache, or decode `ids` after the cached `ctx`."""
        llm = self.llm
        if phase == "prefill":

            def prefill():
                llm.n_tokens = 0  # eval() drops cache positions from n_tokens on
                llm.eval(ids)

            return prefill
        llm.reset()
        llm.eval(ctx)
        kv = len(ctx)

        def decode():
            llm.n_tokens = kv
            llm.eval(ids)

        return decode

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checkpoint_dtypes(src: SourceModel) -> set[str]:
    return {dt for _, dt, _ in src.tensor_specs()}


def _plan(src: SourceModel, spec: ElasticSpec, cfg: Config, weights: str, keep=None):
    from ..elastic.slicing import planned_specs
    from ..io.gguf_export import plan_gguf

    specs = [s for s in planned_specs(src, spec, _whole(spec, cfg)) if keep is None or keep(s[0])]
    return plan_gguf(spec.family, src.config, spec, cfg, specs, weights)


def _whole(spec: ElasticSpec, cfg: Config) -> Config:
    """`cfg` padded with full-width layers: a prefix of the layers is sliced as a whole model."""
    return list(cfg) + [spec.full()[0]] * (spec.dims.num_layers - len(cfg))


def write_file(
    path: Path,
    job: WriteJob,
    t: quant.GGUFType,
    imatrix: str,
    threads: int | None = None,
    keep: Callable[[str], bool] | None = None,
) -> tuple[int, quant.QuantReport, Path | None, Any]:
    """Write `job`'s sub-model at type `t` into `path`: (parameters, what the file stores, the 16-bit file
    it was quantized from (left for the caller to verify against, then delete) or None, the plan).
    `imatrix`: "sub-model" (computed), "uniform" (all ones: the quantizer's type choices with an imatrix,
    for timing) or "none". `keep` filters tensor names (a prefix of the layers)."""
    from ..elastic.slicing import stream_sliced
    from ..io.gguf_export import write_gguf

    src, spec, cfg = job.src, job.spec, job.cfg
    first = t.weights if not t.quantized else quant.intermediate(_checkpoint_dtypes(src))
    plan = _plan(src, spec, cfg, first, keep)
    mid = path if not t.quantized else path.with_name(path.name + f".{first}")
    sliced = stream_sliced(src, spec, _whole(spec, cfg), job.overrides)
    stream = ((k, x) for k, x in sliced if keep is None or keep(k))
    # MLP neurons reordered within the file for the 32-value block types (quant.mixed_order)
    mix = t.quantized and imatrix == "sub-model" and t.block == quant.MIX_BLOCK
    if mix:
        stream = _mixed_neurons(stream, src.arch)
    params = write_gguf(
        mid, plan, stream, src.config, spec, cfg, first, job.elastic, job.label, job.provenance
    )
    if not t.quantized:
        return params, quant.file_report(path), None, plan
    try:
        require(f"--gguf-type {t.text} is written by llama.cpp's quantizer")
        tied = bool(src.config.get("tie_word_embeddings"))
        im = None
        if imatrix == "sub-model":
            from .imatrix import sub_model_imatrix

            im = sub_model_imatrix(
                job.elastic, cfg, plan.tensors, tied, job.options.imatrix_tokens, job.overrides
            )
            im = _mixed_imatrix(im, plan.tensors, src.arch) if mix else im
        elif imatrix == "uniform":
            from .imatrix import gguf_names

            rows = {hf: shape[-1] for hf, _, shape, _ in plan.tensors}
            rows["lm_head.weight"] = spec.dims.hidden_size  # a tied head is absent from the plan
            im = {g: np.ones(rows[hf], np.float32) for hf, g in gguf_names(plan.tensors, tied).items()}
        report = quant.quantize(mid, path, t, im, threads)
    except BaseException:
        mid.unlink(missing_ok=True)
        raise
    return params, report, mid, plan


def _mixed_neurons(stream, arch):
    """Every MLP-neuron tensor of each layer reordered along its neuron axis by quant.mixed_order (the
    same order for gate, up and down: the file computes what the sliced model computes)."""
    for name, x in stream:
        hit = arch.locate(name)
        if hit is not None and hit[1] == "neuron":
            x = x.index_select(hit[2].dim, quant.mixed_order(x.shape[hit[2].dim])).contiguous()
        yield name, x


def _mixed_imatrix(im: dict[str, np.ndarray], plan_tensors, arch) -> dict[str, np.ndarray]:
    """The importance matrix of a file written through _mixed_neurons: the entries whose input is the
    MLP neurons (ffn_down) in the file's order."""
    out = dict(im)
    for hf, g, _, _ in plan_tensors:
        hit = arch.locate(hf)
        if g in out and hit is not None and hit[1] == "neuron" and hit[2].dim == 1:
            out[g] = out[g][quant.mixed_order(len(out[g])).numpy()]
    return out


def _shape_note(report: quant.QuantReport, spec: ElasticSpec) -> dict[str, Any]:
    """Fallbacks split by cause: rows whose length is a width flexcli narrowed (ffn_down: the MLP width,
    attn_output: heads x head_dim), or a length the full model has too (its hidden size, its own MLP
    width): those fall back on the model itself, whatever the widths."""
    d = spec.dims
    full = {"ffn_down": d.intermediate_size, "attn_output": d.num_heads * d.head_dim}

    def narrowed(f: quant.Fallback) -> bool:
        return any(w in f.tensor and f.ncols != n for w, n in full.items())

    width = [f for f in report.fallbacks if narrowed(f)]
    return {
        "fallbacks": len(report.fallbacks),
        "fallbacks_from_widths": len(width),
        "fallbacks_from_model_shape": len(report.fallbacks) - len(width),
        "fallback_tensors": [f"{f.tensor} ({f.ncols} cols): {f.wanted} -> {f.got}" for f in report.fallbacks],
    }


class LlamaCppRuntime:
    name = "llama.cpp"
    formats = ("gguf",)
    suffix = ".gguf"

    def missing(self) -> str | None:
        return missing()

    def check(
        self, o: ArtifactOptions, src: SourceModel, spec: ElasticSpec, elastic: Path, writing: bool
    ) -> None:
        from ..io.gguf_export import check_tokenizer

        t = quant.parse_type(o.gguf_type)
        if t.quantized and writing:
            require(f"--gguf-type {t.text} is written by llama.cpp's quantizer")
        if o.imatrix_tokens < 1:
            raise UsageError(f"must be positive, got {o.imatrix_tokens}", option="imatrix_tokens")
        check_tokenizer(elastic, spec.dims.vocab_size)

    def plan(self, job: WriteJob) -> Written:
        t = quant.parse_type(job.options.gguf_type)
        # a quantized file's bytes are the quantizer's choice: planned at the exporter's 16-bit type
        plan = _plan(job.src, job.spec, job.cfg, t.weights if not t.quantized else "f16")
        n = sum(math.prod(s) for _, _, s, _ in plan.tensors)
        fields = {"gguf_arch": plan.arch, "gguf_type": t.text, "planned_files": [], "planned_bytes": None}
        if not t.quantized:
            fields["planned_bytes"] = plan.nbytes
        fields.update(block_check(job.spec, job.cfg, t))
        return Written("gguf", n, fields)

    def write(self, job: WriteJob, tmp: Path, verify: bool, rep: Reporter) -> Written:
        t = quant.parse_type(job.options.gguf_type)
        use_im = "sub-model" if t.quantized and job.options.imatrix else "none"
        if use_im == "sub-model":
            rep.info(f"importance matrix: {job.options.imatrix_tokens} calibration tokens on the sub-model")
        params, report, mid, plan = write_file(tmp, job, t, use_im)
        try:
            out = Written("gguf", params, {"gguf_arch": plan.arch, "gguf_type": t.text})
            out.fields.update(
                bits_per_weight=report.bits_per_weight,
                stored_types=report.types,
                file_bytes=report.file_bytes,
                imatrix=use_im == "sub-model",
                **(_shape_note(report, job.spec) if t.quantized else {}),
            )
            if report.fallbacks:
                out.warnings.append(
                    f"{len(report.fallbacks)} tensors fell back to another type (rows not whole quantization "
                    f"blocks): {', '.join(out.fields['fallback_tensors'][:3])}"
                    + (" ..." if len(report.fallbacks) > 3 else "")
                )
            if verify:  # before the commit, as for the other formats
                if (why := missing()) is not None:
                    out.fields["verify_note"] = why
                else:
                    out.fields.update(verify_gguf(job, tmp, mid, t, rep))
                    out.fields["verified_in"] = version()
        finally:
            if mid is not None:
                mid.unlink(missing_ok=True)
        return out

    def backend(self, path: Path, o) -> LlamaCppBackend:
        return LlamaCppBackend(path, o)

    def options_for(self, table):
        from ..latency.profile import ProfileOptions, regime_kw

        if missing() is not None:
            return None
        r = table.regime
        threads = int(table.header.get("threads") or 0) or None
        o = ProfileOptions(runtime="llama.cpp", gguf_type=r.dtype, threads=threads, **regime_kw(r))
        want = f"{device_name(torch.device('cpu'))} {threads or default_threads()}t"
        return o if want == r.device_name else None


def block_check(spec: ElasticSpec, cfg: Config, t: quant.GGUFType) -> dict[str, Any]:
    """Planned rows that are not whole quantization blocks of `t`'s weights (they fall back to another
    type): ffn_down / attn_output rows at narrowed widths, and whether the model's own hidden size is."""
    if not t.quantized:
        return {}
    b, d = t.block, spec.dims
    narrowed = sum(
        (m != d.intermediate_size and m % b != 0) + (h != d.num_heads and h * d.head_dim % b != 0)
        for m, h in cfg
    )
    return {"block": b, "width_rows_not_whole": narrowed, "hidden_not_whole": d.hidden_size % b != 0}


def verify_gguf(
    job: WriteJob, gguf: Path, mid: Path | None, t: quant.GGUFType, rep: Reporter
) -> dict[str, Any]:
    """Run the file in llama.cpp on held-out stdlib text against the elastic model at the job's
    configuration (its compensated weights written in).

    Plain types: top-1 agreement and max relative logit error; f32 / f16 below MIN_AGREEMENT fail. A
    quantized file: its 16-bit source `mid` is checked that way first, then the quantized file is
    reported against it (top-1 agreement, perplexity ratio): quantization error is the point of the
    type, not a failure."""
    from transformers import AutoTokenizer

    from ..train.data import load_sequences

    with rep.task("verifying in llama.cpp"), torch.no_grad():
        tok = AutoTokenizer.from_pretrained(job.elastic, local_files_only=True)
        seqs = load_sequences(tok, "stdlib", *VERIFY_SHAPE, "heldout")  # (4, 128)
        el = job.reference()
        want = el(input_ids=seqs).logits.float().numpy()  # (4, 128, vocab)
        del el
        ref = gguf if mid is None else mid
        got = _logits(ref, seqs)
        top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
        err = float(np.abs(got - want).max() / np.abs(want).max())
        plain = t.weights if mid is None else mid.suffix.lstrip(".")
        if plain in ("f32", "f16") and top1 < MIN_AGREEMENT:
            raise RuntimeFailure(
                f"verification failed: llama.cpp's top-1 token agrees with the sub-model on {top1:.1%} of "
                f"{got.shape[0] * got.shape[1]} held-out positions (need {MIN_AGREEMENT:.0%}; max relative "
                f"logit error {err:.2e}); nothing was written"
            )
        out: dict[str, Any] = {"top1_agreement": top1, "verified_max_rel_err": err}
        if mid is not None:
            q = _logits(gguf, seqs)
            base_ppl, q_ppl = _ppl(got, seqs), _ppl(q, seqs)
            out = {
                "top1_agreement": float((q.argmax(-1) == got.argmax(-1)).mean()),
                "verified_max_rel_err": None,
                "f16_top1_agreement": top1,  # the 16-bit file against the elastic model
                "f16_max_rel_err": err,
                "ppl_f16": base_ppl,
                "ppl_quantized": q_ppl,
                "ppl_ratio": q_ppl / base_ppl,
            }
    return out


def _logits(gguf: Path, seqs: torch.Tensor) -> np.ndarray:
    with Model(gguf, n_ctx=seqs.shape[1], threads=None, logits=True) as m:
        return np.stack([m.logits(s.tolist()) for s in seqs])


def _ppl(logits: np.ndarray, seqs: torch.Tensor) -> float:
    """Perplexity of next-token prediction from (n, T, vocab) logits of (n, T) sequences."""
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    y = seqs[:, 1:].numpy()
    nll = -np.take_along_axis(logp, y[..., None], -1).mean()
    return float(math.exp(nll))


def perplexity(gguf: Path, seqs: torch.Tensor) -> float:
    """Held-out perplexity of a GGUF file from llama.cpp's own logits on (n, T) token sequences."""
    return _ppl(_logits(gguf, seqs), seqs)


def greedy(gguf: Path, tok, prompt: str, n: int = 16, threads: int | None = None) -> str:
    """Greedy continuation of `prompt` in llama.cpp: its own logits, the checkpoint's tokenizer (so the
    text is comparable with transformers' generate on the same prompt)."""
    ids = tok(prompt).input_ids
    start = len(ids)
    with Model(gguf, n_ctx=max(64, start + n), threads=threads, logits=True) as m:
        for _ in range(n):
            nxt = int(m.logits(ids)[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    return tok.decode(ids[start:], skip_special_tokens=True)


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python, on this CPU with `threads` threads."""

    name = "llama.cpp"

    def __init__(self, path: Path, o) -> None:
        from ..io.gguf_export import check_tokenizer

        require()
        if o.device != "cpu":
            raise UsageError("the llama.cpp runtime is profiled on this CPU (--device cpu)", option="device")
        if o.batch != 1:
            raise UsageError("the llama.cpp runtime is profiled at batch 1", option="batch")
        if o.cuda_graphs:
            raise UsageError("CUDA graphs are a PyTorch option", option="cuda_graphs")
        self.type = quant.parse_type(o.gguf_type)
        self.path, self.o = path, o
        self.spec: ElasticSpec = layout.read_spec(path)
        self.src = SourceModel.open(path)
        check_tokenizer(path, self.spec.dims.vocab_size)
        self.threads = o.threads or default_threads()
        kv = (o.kv_len if o.kv_len is not None else o.seq_len) if o.phase == "decode" else 0
        self.regime = Regime(
            "cpu",
            f"{device_name(torch.device('cpu'))} {self.threads}t",
            self.type.text,
            1,
            o.seq_len if o.phase == "prefill" else 1,
            o.phase,
            kv,
            runtime="llama.cpp",
        )
        g = torch.Generator().manual_seed(o.seed)
        vocab = self.spec.dims.vocab_size
        self.ids = torch.randint(0, vocab, (self.regime.seq_len,), generator=g).tolist()
        self.ctx = torch.randint(0, vocab, (max(kv, 1),), generator=g).tolist()
        self.n_ctx = max(kv, 0) + self.regime.seq_len + 1
        self.scratch = Path(tempfile.mkdtemp(prefix="flex-llamacpp-"))
        self.files: dict[tuple, Path] = {}
        self.sync = lambda: None
        self.header = {"llama_cpp": version(), "threads": self.threads, "gguf_type": self.type.text}

    def gguf(self, cfg: Config) -> Path:
        """The GGUF of `cfg` (a prefix of the layers when `cfg` is shorter), written once per run; a
        quantized type with the quantizer's type choices of an importance-matrix file (extract's default)."""
        key = tuple(cfg)
        if key not in self.files:
            f = self.scratch / f"{len(self.files)}.gguf"
            job = WriteJob(self.path, self.src, self.spec, list(cfg), "timing", {}, ArtifactOptions())
            _, _, mid, _ = write_file(f, job, self.type, "uniform", self.threads, self._keep(len(cfg)))
            if mid is not None:
                mid.unlink(missing_ok=True)
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
        return self.open_artifact(self.gguf(list(cfg)))

    @contextmanager
    def open_artifact(self, path: Path) -> Iterator[Fn]:
        """A GGUF written elsewhere (an extracted sub-model), timed in this regime."""
        with Model(path, self.n_ctx, self.threads) as m:
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


@contextmanager
def _quiet():
    """llama.cpp logs the whole model on load to fd 2; keep it out of the user's stderr unless it fails."""
    import contextlib
    import io
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            if tail:
                os.write(2, tail.encode())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
