"""`flex eval`: held-out perplexity of a checkpoint, or of an elastic checkpoint at budgets/configurations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import STDLIB, load_sequences
from .errors import UsageError
from .evaluate import mean_loss
from .progress import Reporter


@dataclass
class EvalResult:
    model: str
    data: str
    tokens: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def evaluate(path: Path, data: str, budget: str | None, config: Path | None, uniform: str | None,
             regime: str | None, samples: int, seq_len: int, reporter: Reporter | None = None) -> EvalResult:
    """Perplexity on `samples` sequences of `seq_len` tokens (the stdlib's held-out split for 'stdlib')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import register_auto_classes
    from .checkpoint import SourceModel

    rep = reporter or Reporter()
    if not Path(path).is_dir():
        raise UsageError(f"model path {path} does not exist")
    register_auto_classes()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    seqs = load_sequences(tok, data, samples, seq_len, "heldout" if data == STDLIB else "train")
    res = EvalResult(str(path), data, int(seqs.numel()))
    elastic = (Path(path) / "flex_elastic.json").is_file()
    if not elastic:
        if budget or config or uniform:
            raise UsageError(f"{path} is not an elastic checkpoint; --budget/--config/--uniform need one")
        with rep.task("evaluating"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
            loss = mean_loss(model, seqs)
        res.rows.append({"name": Path(path).name, "params": sum(p.numel() for p in model.parameters()),
                         "predicted_latency_ms": None, "loss": loss, "ppl": math.exp(loss), "config": None})
        return res
    from .elastic import load_elastic
    from .extract import param_count, resolve_targets
    from .spec import config_to_json

    SourceModel.open(path)  # validates headers before loading
    el = load_elastic(path)
    targets, table = ([], None)
    if budget or config or uniform:
        targets, table = resolve_targets(Path(path), el.spec, budget, config, uniform, regime, rep)
    rows = [("full", el.spec.full(), None)] + [(t.label, t.cfg, t.method) for t in targets]
    with rep.task("evaluating", total=len(rows)) as task:
        for name, cfg, method in rows:
            with el.configured(cfg):
                loss = mean_loss(el.model, seqs)
            res.rows.append({"name": name, "params": param_count(el.spec, cfg), "method": method,
                             "predicted_latency_ms": table.predict(cfg) if table else None, "loss": loss,
                             "ppl": math.exp(loss), "config": config_to_json(cfg)})
            task.advance(1)
    return res
