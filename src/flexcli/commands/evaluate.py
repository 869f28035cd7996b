"""`flex eval`: held-out perplexity of a checkpoint, or of an elastic checkpoint at budgets/configurations."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import register_auto_classes
from ..arch.spec import config_to_json
from ..device import ram_bytes
from ..elastic import compensate
from ..elastic.evaluate import mean_loss
from ..elastic.runtime import load_elastic
from ..errors import UsageError
from ..io import layout
from ..io.gguf import GGUFSource, find_gguf
from ..io.source import SourceModel, load_tokenizer
from ..plan.search import Request, optional_table, param_counter, resolve_targets
from ..progress import Reporter
from ..router.store import load_router
from ..train.data import STDLIB, has_split, load_sequences


@dataclass(kw_only=True)
class EvalOptions:
    data: str = STDLIB  # text: file, directory, JSONL, or 'stdlib' (its held-out split)
    request: Request | None = None  # elastic checkpoints: budgets / configuration / uniform fractions
    regime: str | None = None
    samples: int = 64
    seq_len: int = 256
    # elastic checkpoints: each configuration as `flex extract` writes it, its narrowed projections refit
    # on `compensate_tokens` calibration tokens (elastic.compensate); False: the plain slice
    compensate: bool = True
    compensate_tokens: int = 16384


@dataclass
class EvalRow:
    name: str
    params: int
    predicted_latency_ms: float | None
    loss: float
    ppl: float
    config: list[dict[str, int]] | None
    method: str | None = None
    compensated: bool | None = None  # its narrowed projections were refit (elastic configurations)


@dataclass
class EvalResult:
    model: str
    data: str
    tokens: int
    rows: list[EvalRow] = field(default_factory=list)


def evaluate(path: Path, options: EvalOptions, reporter: Reporter | None = None) -> EvalResult:
    """Perplexity on `samples` sequences of `seq_len` tokens (the stdlib's held-out split for 'stdlib')."""
    from transformers import AutoModelForCausalLM

    rep = reporter or Reporter()
    o = options
    gguf = find_gguf(Path(path)) if Path(path).exists() else None
    if gguf is None and not Path(path).is_dir():
        raise UsageError(f"model path {path} does not exist")
    register_auto_classes()
    src = GGUFSource.open(gguf, "float32") if gguf is not None else None
    tok = src.tokenizer() if src is not None else load_tokenizer(Path(path))
    seqs = load_sequences(tok, o.data, o.samples, o.seq_len, "heldout" if has_split(o.data) else "train")
    res = EvalResult(str(path), o.data, int(seqs.numel()))
    if src is not None or not layout.is_elastic(path):
        if o.request is not None:
            raise UsageError(
                f"{path} is not an elastic checkpoint; budgets and configurations need one", option="budget"
            )
        with rep.task("evaluating"):
            if src is not None:  # a GGUF file, dequantized
                model = src.load_model(torch.device("cpu"), "float32").eval()
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch.float32, local_files_only=True
                ).eval()
            loss = mean_loss(model, seqs)
        res.rows.append(
            EvalRow(
                Path(path).name, sum(p.numel() for p in model.parameters()), None, loss, math.exp(loss), None
            )
        )
        return res
    res.rows = _elastic_rows(Path(path), o, seqs, rep)
    return res


def _elastic_rows(path: Path, o: EvalOptions, seqs: torch.Tensor, rep: Reporter) -> list[EvalRow]:
    """The full model, then each requested configuration, run by the elastic runtime."""
    src = SourceModel.open(path)  # validates headers before loading
    el = load_elastic(path)
    table, targets = None, []
    if o.request is not None:
        table = optional_table(path, o.regime)
        router = (
            load_router(path, "static", table.regime.key if table else None) if o.request.budgets else None
        )
        targets = resolve_targets(path, el.spec, src.config, o.request, table, router, rep)  # type: ignore[arg-type]
    count = param_counter(el.spec, src.config)
    bank = _bank(path, el, src, [t.cfg for t in targets], o, rep)
    rows = []
    with rep.task("evaluating", total=1 + len(targets)) as task:
        for name, cfg, method in [("full", el.spec.full(), None)] + [
            (t.label, t.cfg, t.method) for t in targets
        ]:
            with bank.applied(cfg) if bank else nullcontext(), el.configured(cfg):
                loss = mean_loss(el.model, seqs)
            rows.append(
                EvalRow(
                    name,
                    count(cfg),
                    table.predict(cfg) if table else None,
                    loss,
                    math.exp(loss),
                    config_to_json(cfg),
                    method,
                    bool(bank and compensate.narrowed(el.spec, cfg)) if method is not None else None,
                )
            )
            task.advance(1)
    return rows


def _bank(
    path: Path, el, src: SourceModel, cfgs: list, o: EvalOptions, rep: Reporter
) -> compensate.Bank | None:
    """The configurations' compensation, as `flex extract` computes it (None with --no-compensate or when
    they narrow nothing)."""
    from ..train.data import calibration_sequences

    wanted = set().union(*(compensate.narrowed(el.spec, c) for c in cfgs))
    if not o.compensate or not wanted:
        return None
    need = compensate.moments_bytes(el.spec, wanted)
    if need > ram_bytes() * 0.25:
        rep.warn(
            f"configurations evaluated as plain slices: compensation's moments ({need / 2**30:.1f} GiB) do not "
            "fit comfortably in RAM (rows say compensated: false)"
        )
        return None
    seqs = calibration_sequences(path, o.compensate_tokens)
    with rep.task(f"compensation: {seqs.numel()} calibration tokens", total=len(seqs)) as task:
        return compensate.calibrated_bank(
            el.model, el.arch, el.spec, seqs, wanted, src.stored_dtypes(), task.advance
        )
