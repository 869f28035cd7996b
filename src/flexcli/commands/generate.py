"""`flex generate`: text from an elastic checkpoint at a budget, nothing extracted.

Static: the static router's configuration for the budget (as `flex extract` would slice it, without
compensation) runs in the elastic runtime. Adaptive: the input-adaptive router picks every token's MLP
width per layer at every decode step (one token, M = 1) from the hidden state entering the layer; head
counts are chosen once per sequence at prefill and kept, so the KV cache stays consistent. The router
runs inside the timed step, so its cost is in the measured ms/token. Greedy decoding.

Against a decode table (`flex profile --phase decode`), the predicted ms/token is the latency model that
router training targets: static, the table's latency of the configuration; adaptive, the table's latency
of each step's choices averaged over the steps, plus the router's own cost per step (measured by
`flex train-router` on this device). bench/bench_adaptive.py checks both against the measured steps.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch.spec import config_to_json
from ..elastic.adaptive import DynamicRuntime
from ..elastic.runtime import ElasticModel, load_elastic
from ..errors import UsageError
from ..io.source import SourceModel, load_tokenizer
from ..latency.table import load_table
from ..latency.timing import cache_kw
from ..plan.budget import Budget
from ..plan.search import Request, latency_budgets_ms, optional_table, resolve_targets
from ..progress import Reporter
from ..router.models import encode_budget
from ..router.store import load_router, router_cost_ms


@dataclass(kw_only=True)
class GenerateOptions:
    prompt: str
    budget: Budget | None = None  # None: the full model
    adaptive: bool = False
    max_new_tokens: int = 64
    regime: str | None = None
    on_text: Callable[[str], None] | None = None  # streamed pieces of the continuation


@dataclass
class GenerateResult:
    elastic: str
    prompt: str
    text: str
    tokens: int  # generated
    budget: str | None
    budget_ms: float | None  # against the table's regime
    regime: str | None
    method: str  # full model | static router | ... | input-adaptive router
    # static: per layer; adaptive: the head counts fixed at prefill and each layer's mean MLP width
    config: list[dict[str, int]] | None
    prefill_ms: float
    ms_per_token: float  # median decode step, router included
    mean_ms_per_token: float
    # the table's latency of `config` (static), or of each step's choices averaged over the steps plus
    # the router's own cost per step when the table is a decode one (adaptive: the latency model)
    predicted_ms: float | None
    router_ms: float | None = None  # adaptive: the router's cost per decode step, measured by train-router
    # the table's phase (prefill | decode): only a decode table's prediction is one decode step's
    phase: str | None = None
    mlp_width_share: dict[str, float] = field(default_factory=dict)  # adaptive: share of (token, layer)
    token_ids: list[int] = field(default_factory=list)  # generated


def generate(path: Path, o: GenerateOptions, reporter: Reporter | None = None) -> GenerateResult:
    rep = reporter or Reporter()
    if o.max_new_tokens < 1:
        raise UsageError("at least one new token is needed", option="max_new_tokens")
    if o.adaptive and o.budget is None:
        raise UsageError("--adaptive needs a --budget (the router's latency target)", option="adaptive")
    if not o.prompt:
        raise UsageError("the prompt is empty", option="prompt")
    src = SourceModel.open(path)  # validates headers before loading
    tok = load_tokenizer(path)
    with rep.task("loading elastic model"):
        el = load_elastic(path)
    el.model.eval()
    ids = tok(o.prompt, return_tensors="pt").input_ids  # (1, P)
    table = optional_table(path, o.regime)
    res = GenerateResult(
        str(path), o.prompt, "", 0, None, None, None, "full model", None, 0.0, 0.0, 0.0, None
    )
    if o.budget is None:
        return _decode(el, tok, ids, o, res, None)
    res.budget = o.budget.text
    if not o.adaptive:
        router = load_router(path, "static", table.regime.key if table else None)
        (target,) = resolve_targets(
            path, el.spec, src.config, Request(budgets=[o.budget]), table, router, rep
        )  # type: ignore[arg-type]
        res.method, res.config = target.method, config_to_json(target.cfg)
        if table is not None:
            res.regime, res.phase, res.predicted_ms = (
                table.regime.key,
                table.regime.phase,
                table.predict(target.cfg),
            )
            if o.budget.kind != "params":
                res.budget_ms = latency_budgets_ms([o.budget], table)[0][1]
        with el.configured(target.cfg):
            return _decode(el, tok, ids, o, res, None)
    table = load_table(path, o.regime)
    found = load_router(path, "dynamic", table.regime.key)
    if found is None:
        raise UsageError(
            f"no input-adaptive router trained for regime {table.regime.key}; run flex train-router",
            option="adaptive",
        )
    router, doc = found
    ((_, ms),) = latency_budgets_ms([o.budget], table)
    res.method, res.regime, res.budget_ms = "input-adaptive router", table.regime.key, ms
    res.phase = table.regime.phase
    res.router_ms = router_cost_ms(doc)  # measured for PyTorch decode tables only
    rt = DynamicRuntime(el, router)
    rt.budget = encode_budget(ms, doc["targets_ms"])[None]
    try:
        return _decode(el, tok, ids, o, res, rt, table)
    finally:
        rt.close()


@torch.inference_mode()
def _decode(el: ElasticModel, tok, ids: torch.Tensor, o: GenerateOptions, res: GenerateResult,
            rt: DynamicRuntime | None, table=None) -> GenerateResult:  # fmt: skip
    """Greedy prefill + decode with a KV cache, every step timed; streams text through `o.on_text`."""
    from transformers import DynamicCache

    model = el.model
    kw = {cache_kw(model): DynamicCache(config=model.config)}  # the argument's name moved in transformers 5
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **kw)
    res.prefill_ms = (time.perf_counter() - t0) * 1e3
    if rt is not None:  # heads per layer fixed at prefill; the per-token MLP choices start with decode
        rt.fixed_heads = [kh for _, kh in rt.choices]
        rt.lookahead_decode()  # a lookahead router: one hook per step, the layers unwrapped
        rt.choices = []
    new, steps, shown = [], [], ""
    nxt = int(out.logits[0, -1].argmax())
    for _ in range(o.max_new_tokens):
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        text = tok.decode(new, skip_special_tokens=True)
        # whole characters only: a token ending inside a UTF-8 sequence decodes to U+FFFD and waits
        if o.on_text is not None and not text.endswith("\ufffd") and text.startswith(shown) and text != shown:
            o.on_text(text[len(shown) :])
            shown = text
        if len(new) == o.max_new_tokens:
            break
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **kw)
        steps.append((time.perf_counter() - t0) * 1e3)
        nxt = int(out.logits[0, -1].argmax())
    res.text, res.tokens, res.token_ids = tok.decode(new, skip_special_tokens=True), len(new), new
    if o.on_text is not None and res.text.startswith(shown) and res.text != shown:
        o.on_text(res.text[len(shown) :])
    if steps:
        res.ms_per_token, res.mean_ms_per_token = statistics.median(steps), sum(steps) / len(steps)
    if rt is not None:
        _adaptive_summary(el, rt, res, table)
    return res


def _adaptive_summary(el: ElasticModel, rt: DynamicRuntime, res: GenerateResult, table) -> None:
    """Head counts fixed at prefill, the mean MLP width per layer over the decode steps, the share of
    (token, layer) choices at each width, and the table's latency of those choices on average."""
    spec = el.spec
    mlp = spec.layers[0].mlp
    heads = [spec.layers[i].heads[int(kh[0])] for i, kh in enumerate(rt.fixed_heads or [])]
    L = spec.dims.num_layers
    per_layer: list[list[int]] = [[] for _ in range(L)]
    for n, (km, _) in enumerate(rt.choices):  # one entry per layer per decode step
        per_layer[n % L].append(int(km[0, 0]))
    count: Counter[int] = Counter(k for ks in per_layer for k in ks)
    total = sum(count.values())
    res.mlp_width_share = (
        {str(mlp[k]): round(c / total, 4) for k, c in sorted(count.items())} if total else {}
    )
    if not total:
        return
    res.config = [
        {"mlp": round(sum(mlp[k] for k in ks) / len(ks)), "heads": h} for ks, h in zip(per_layer, heads)
    ]
    steps = len(per_layer[0])
    pred = [
        table.predict([(mlp[per_layer[i][s]], heads[i]) for i in range(L)]) for s in range(steps)
    ]  # the table's regime (a decode step, or e.g. a 128-token prefill), per decode step's choices
    res.predicted_ms = sum(pred) / len(pred) + (res.router_ms or 0.0)
