"""GQA head pruning on a real model: which heads to drop (rule) ranked by which score.

Rules, keeping k of H query heads per layer (G KV groups of H/G query heads):
  query       k/G query heads in every group (every KV head kept; flexcli's `gqa: query`)
  group       k/(H/G) whole groups with their KV heads (the KV cache shrinks; `gqa: group`)
  unbalanced  the best k heads wherever they are (groups of unequal size: not a stock GQA layout)
Scores: `norm` (output L2 norm), `taylor` (|a . dL/da|), `random` (seeded). Heads are removed by zeroing
their slice of the o_proj input in every layer, which for `query` and `group` is exactly what the
elastic model and a sliced sub-model compute. Calibration: stdlib train split; evaluation: held-out
stdlib code and pydoc prose (neither seen in calibration).

  python bench/bench_heads.py --source SmolLM2.gguf --out docs/results/heads.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import ppl

from flexcli.elastic.importance import compute_importance, random_scores
from flexcli.io.source import open_source
from flexcli.train.data import PYDOC, STDLIB, load_sequences

RULES = ("query", "group", "unbalanced")


def kept_heads(score: torch.Tensor, k: int, kv: int, rule: str) -> list[int]:
    """Query heads (group-major ids) kept under `rule` for one layer's (H,) scores."""
    h = score.numel()
    g = h // kv
    if rule == "unbalanced":
        return sorted(torch.argsort(score, descending=True)[:k].tolist())
    per_group = score.view(kv, g)
    if rule == "query":
        return sorted(
            q * g + i
            for q in range(kv)
            for i in torch.argsort(per_group[q], descending=True)[: k // kv].tolist()
        )
    groups = torch.argsort(per_group.sum(1), descending=True)[: k // g].tolist()
    return sorted(q * g + i for q in groups for i in range(g))


class HeadMask:
    """Zero the o_proj input of every head not kept (forward pre-hooks on each layer's o_proj)."""

    def __init__(self, model, arch, dims):
        self.layers = model.get_submodule(arch.layers)
        self.tap, self.dims = arch.tap("qhead"), dims
        self.masks: list[torch.Tensor] | None = None
        self.hooks = [
            layer.get_submodule(self.tap).register_forward_pre_hook(self._hook(i))
            for i, layer in enumerate(self.layers)
        ]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def _hook(self, i):
        def hook(_mod, args):
            if self.masks is None:
                return None
            x = args[0].unflatten(-1, (self.dims.num_heads, self.dims.head_dim))
            return (x * self.masks[i][:, None].to(x.dtype)).flatten(-2)

        return hook


def head_rows(
    model, arch, dims, calib: torch.Tensor, corpora: dict[str, torch.Tensor], seed: int = 0
) -> list[dict]:
    """Held-out perplexity per (rule, score, kept heads) on each corpus, plus the full model."""
    scores = {}
    for name in ("norm", "taylor"):
        t = time.time()
        s = compute_importance(model, arch, dims, calib, 4, head_score=name)
        scores[name] = [x["qhead"] for x in s]
        print(f"scores {name}: {time.time() - t:.1f}s", file=sys.stderr)
    scores["random"] = [x["qhead"] for x in random_scores(dims, seed)]
    mask = HeadMask(model, arch, dims)

    rows = [{"rule": "full", "score": "-", "heads": dims.num_heads, **ppl(model, corpora)}]
    g = dims.group_size
    widths = [k for k in range(dims.num_heads - 1, 0, -1) if k % g == 0 and k % dims.num_kv_heads == 0]
    try:
        for k in widths:
            for rule in RULES:
                for score_name, sc in scores.items():
                    if rule == "unbalanced" and score_name == "random":
                        continue  # a random unbalanced choice is no different in kind from a random group choice
                    mask.masks = []
                    for layer_scores in sc:
                        m = torch.zeros(dims.num_heads)
                        m[kept_heads(layer_scores, k, dims.num_kv_heads, rule)] = 1
                        mask.masks.append(m)
                    rows.append({"rule": rule, "score": score_name, "heads": k, **ppl(model, corpora)})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        mask.remove()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="GGUF file or HF directory")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.time()
    src = open_source(a.source, gguf_dtype="float32")
    tok = src.tokenizer()
    model = src.load_model(torch.device("cpu"), "float32")
    calib = load_sequences(tok, STDLIB, a.calib_windows, a.seq_len, "train")
    corpora = {
        "stdlib_heldout": load_sequences(tok, STDLIB, a.eval_windows, a.seq_len, "heldout"),
        "pydoc": load_sequences(tok, PYDOC, a.eval_windows, a.seq_len),
    }
    doc = {
        "source": str(a.source),
        "calibration": f"stdlib train split, {a.calib_windows} x {a.seq_len} tokens",
        "evaluation": f"{a.eval_windows} x {a.seq_len} tokens per corpus",
        "rows": head_rows(model, src.arch, src.dims, calib, corpora),
        "seconds": round(time.time() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
