"""`flex extract`: slice a standalone sub-model out of an elastic checkpoint, streamed out-of-core.

Budget -> configuration: the static router when one is trained for the table's regime, otherwise a
greedy search over the latency table (or the parameter count) that removes, step by step, the width
that loses the least importance mass per millisecond (or parameter) saved. Uniform configurations
become the stock architecture; per-layer ones the `flexcli_*` architecture of hf_modeling.py.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .budget import Budget, parse_budgets
from .checkpoint import (
    ShardPlan,
    SourceModel,
    StreamingWriter,
    atomic_dir,
    check_output,
    copy_files,
    write_json,
)
from .elastic import read_manifest
from .errors import RuntimeFailure, UsageError
from .latency import LatencyTable, load_table
from .progress import Reporter
from .slicing import unit_index
from .spec import Config, ElasticSpec, config_from_json, config_to_json


def param_count(spec: ElasticSpec, cfg: Config) -> int:
    """Parameters of the sliced model (embeddings, norms and LM head included; biases ignored)."""
    d = spec.dims
    n = d.vocab_size * d.hidden_size * (1 if d.tied else 2) + d.hidden_size
    for m, h in cfg:
        kv = spec.kv_heads(h)
        n += 3 * d.hidden_size * m + 2 * d.hidden_size * h * d.head_dim + 2 * d.hidden_size * kv * d.head_dim
        n += 2 * d.hidden_size
    return n


def importance_shares(path: Path, spec: ElasticSpec) -> list[dict[str, torch.Tensor]]:
    """Per layer, cumulative share of importance kept by each prefix (in permuted order)."""
    from safetensors.torch import load_file

    f = path / "flex_importance.safetensors"
    t = load_file(f) if f.exists() else {}
    out = []
    for i in range(spec.dims.num_layers):
        row = {}
        for unit, n in (("neuron", spec.dims.intermediate_size), ("qhead", spec.dims.num_heads)):
            s = t.get(f"layers.{i}.{unit}_score")
            s = torch.ones(n, dtype=torch.float64) if s is None else s[t[f"layers.{i}.{unit}_perm"]]
            row[unit] = torch.cumsum(s, 0) / s.sum()
        out.append(row)
    return out


def _kept(shares, spec: ElasticSpec, i: int, m: int, h: int) -> float:
    q, _ = spec.head_index(h)
    head_share = shares[i]["qhead"].diff(prepend=torch.zeros(1, dtype=torch.float64))[q].sum()
    return float(shares[i]["neuron"][m - 1] + head_share)


def greedy_search(spec: ElasticSpec, cost, target: float, shares) -> Config:
    """From the full model, take the step (one layer's MLP or heads one choice down) that loses the least
    importance per unit of cost saved, until cost(cfg) <= target."""
    cfg = spec.full()
    while cost(cfg) > target:
        best, best_score = None, math.inf
        for i, (m, h) in enumerate(cfg):
            lc = spec.layers[i]
            steps = []
            if lc.mlp.index(m) + 1 < len(lc.mlp):
                steps.append((lc.mlp[lc.mlp.index(m) + 1], h))
            if lc.heads.index(h) + 1 < len(lc.heads):
                steps.append((m, lc.heads[lc.heads.index(h) + 1]))
            for s in steps:
                new = list(cfg)
                new[i] = s
                saved = cost(cfg) - cost(new)
                if saved <= 0:
                    continue
                loss = _kept(shares, spec, i, m, h) - _kept(shares, spec, i, *s)
                if loss / saved < best_score:
                    best, best_score = new, loss / saved
        if best is None:
            break
        cfg = best
    return cfg


@dataclass
class Target:
    label: str
    cfg: Config
    method: str
    budget: Budget | None = None
    budget_ms: float | None = None


def resolve_targets(path: Path, spec: ElasticSpec, budget: str | None, config_file: Path | None,
                    uniform: str | None, regime: str | None, rep: Reporter) -> tuple[list[Target], LatencyTable | None]:
    """The configurations to extract, and the latency table used (if any)."""
    chosen = [x for x in (budget, config_file, uniform) if x]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --budget, --config or --uniform")
    table = None
    try:
        table = load_table(path, regime)
    except UsageError:
        if regime:
            raise
    if config_file:
        try:
            raw = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--config {config_file}: cannot read a JSON configuration ({e})") from None
        cfg = config_from_json(raw["config"] if isinstance(raw, dict) else raw)
        spec.check(cfg)
        return [Target(Path(config_file).stem, cfg, "--config")], table
    if uniform:
        m = re.fullmatch(r"\s*mlp\s*=\s*([0-9.]+)\s*,\s*heads\s*=\s*([0-9.]+)\s*", uniform)
        if not m or not all(0 < float(x) <= 1 for x in m.groups()):
            raise UsageError(f"--uniform {uniform!r}: use mlp=FRACTION,heads=FRACTION, e.g. mlp=0.5,heads=0.75")
        cfg = spec.uniform(float(m.group(1)), float(m.group(2)))
        return [Target(f"mlp{m.group(1)}-heads{m.group(2)}", cfg, "--uniform")], table
    targets = []
    shares = importance_shares(path, spec)
    for b in parse_budgets(budget):
        if b.kind == "params":
            full, low = param_count(spec, spec.full()), param_count(spec, spec.smallest())
            if b.value < low:
                from .errors import InfeasibleError

                raise InfeasibleError(f"budget {b.text} is below the smallest sub-network ({low / 1e6:.2f}M parameters)")
            if b.value >= full:
                rep.warn(f"budget {b.text} is at or above the full model ({full / 1e6:.2f}M parameters): extracting it")
            cfg = greedy_search(spec, lambda c: param_count(spec, c), b.value, shares)
            targets.append(Target(b.text, cfg, "importance search over parameter count", b))
            continue
        if table is None:
            raise UsageError(f"budget {b.text} needs a latency table in {path}; run `flex profile {path}` first "
                             "(or pass a parameter budget such as 3.5B, --uniform or --config)")
        ms = b.to_ms(table.full_ms())
        if ms >= table.full_ms():
            rep.warn(f"budget {b.text} is at or above the full model ({table.full_ms():.3f} ms): extracting it")
            targets.append(Target(b.text, spec.full(), "full model", b, ms))
            continue
        table.check_budget(ms)
        cfg, method = None, ""
        from .router_train import static_config
        from .train_router import load_static_router

        loaded = load_static_router(path)
        if loaded is not None and loaded[1]["regime"] == table.regime.key:
            cand = static_config(loaded[0], spec, loaded[1]["targets_ms"], ms)
            if table.predict(cand) <= ms * 1.05:
                cfg, method = cand, "static router"
            else:
                rep.warn(f"static router's configuration for {b.text} is over budget "
                         f"({table.predict(cand):.3f} ms); using the latency-table search")
        if cfg is None:
            cfg = greedy_search(spec, table.predict, ms, shares)
            method = "importance search over the latency table"
        targets.append(Target(b.text, cfg, method, b, ms))
    return targets, table


def stock_config_problem(config: dict[str, Any]) -> str | None:
    """Why the family's stock transformers config class refuses `config` (e.g. LlamaConfig wants
    hidden_size to be a multiple of the head count even with an explicit head_dim), or None."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**config)
    except Exception as e:  # transformers raises ValueError or its strict-dataclass validation error
        cause = e.__cause__ or e
        return str(cause).strip().splitlines()[-1].strip()
    return None


def hf_config_for(base: dict[str, Any], spec: ElasticSpec, cfg: Config, fmt: str) -> tuple[dict[str, Any], str]:
    """config.json for the sub-model and its format: 'stock' when every layer has the same sizes."""
    uniform = len(set(cfg)) == 1
    if fmt == "stock" and not uniform:
        raise UsageError("--format stock needs a uniform configuration (the same widths in every layer); "
                         "use --format flex or auto")
    out = dict(base)
    m0, h0 = cfg[0]
    out["head_dim"] = spec.dims.head_dim
    out.pop("auto_map", None)
    out.pop("flex_layers", None)
    if uniform and fmt != "flex":
        stock = {**out, "intermediate_size": m0, "num_attention_heads": h0, "num_key_value_heads": spec.kv_heads(h0)}
        problem = stock_config_problem(stock)
        if problem is None:
            return stock, "stock"
        if fmt == "stock":
            raise UsageError(f"--format stock: transformers rejects this configuration ({problem}); "
                             "use --format flex or auto")
    out.update(intermediate_size=max(m for m, _ in cfg), num_attention_heads=max(h for _, h in cfg),
               num_key_value_heads=max(spec.kv_heads(h) for _, h in cfg))
    out["flex_layers"] = [{"intermediate_size": m, "num_attention_heads": h, "num_key_value_heads": spec.kv_heads(h)}
                          for m, h in cfg]
    family = base["model_type"]
    arch_name = base["architectures"][0]
    out["model_type"] = f"flexcli_{family}"
    out["architectures"] = [f"Flex{arch_name}"]
    out["auto_map"] = {"AutoConfig": f"modeling_flexcli.Flex{type_name(family)}",
                       "AutoModelForCausalLM": f"modeling_flexcli.Flex{arch_name}"}
    return out, "flex"


def type_name(family: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[family].__name__


def modeling_source(family: str) -> str:
    text = resources.files("flexcli").joinpath("hf_modeling.py").read_text()
    return text.replace('BASE_MODEL_TYPE = "llama"', f'BASE_MODEL_TYPE = "{family}"', 1)


def plan(src: SourceModel, spec: ElasticSpec, cfg: Config, max_shard_bytes: int) -> ShardPlan:
    """Output shapes, shards and offsets from the safetensors headers alone (no tensor data is read)."""
    from safetensors import safe_open

    tensors = []
    for f in src.weight_files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape = list(sl.get_shape())
                hit = src.arch.locate(name)
                if hit is not None:
                    layer, unit, slot = hit
                    shape[slot.dim] = len(unit_index(spec, unit, *cfg[layer]))
                tensors.append((name, sl.get_dtype(), shape))
    return ShardPlan.make(tensors, max_shard_bytes)


def stream_sliced(src: SourceModel, spec: ElasticSpec, cfg: Config):
    """(name, tensor) of the sub-model, read lazily: prefix slices through safetensors' get_slice."""
    from safetensors import safe_open

    arch = src.arch
    for f in src.weight_files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                hit = arch.locate(name)
                if hit is None:
                    yield name, st.get_tensor(name)
                    continue
                layer, unit, slot = hit
                idx = unit_index(spec, unit, *cfg[layer])
                sl = st.get_slice(name)
                n = len(idx)
                contiguous = bool(torch.equal(idx, torch.arange(n)))
                if contiguous:
                    yield name, (sl[:n] if slot.dim == 0 else sl[:, :n]).contiguous()
                else:
                    yield name, st.get_tensor(name).index_select(slot.dim, idx).contiguous()


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
    measured_latency_ms: float | None = None
    verified_max_rel_err: float | None = None
    regime: str | None = None
    planned_bytes: int | None = None  # total size of the output weight files
    planned_files: list[str] | None = None


@dataclass
class ExtractResult:
    elastic: str
    models: list[SubModel] = field(default_factory=list)
    seconds: float = 0.0


def extract(path: Path, out: Path | None, budget: str | None = None, config_file: Path | None = None,
            uniform: str | None = None, regime: str | None = None, fmt: str = "auto",
            max_shard_bytes: int = 5 * 10**9, verify: bool | None = None, force: bool = False,
            reporter: Reporter | None = None, dry_run: bool = False) -> ExtractResult:
    """Write one sub-model per requested configuration (several budgets: one directory each inside OUT)."""
    rep = reporter or Reporter()
    t0 = time.time()
    if fmt not in ("auto", "stock", "flex"):
        raise UsageError(f"--format must be auto, stock or flex, got {fmt!r}")
    manifest = read_manifest(path)
    spec = ElasticSpec.from_dict(manifest["spec"])
    src = SourceModel.open(path)
    targets, table = resolve_targets(path, spec, budget, config_file, uniform, regime, rep)
    many = len(targets) > 1
    stem = path.resolve().name.removesuffix("-elastic")
    base_out = (out or Path.cwd() / f"{stem}-{'submodels' if len(targets) > 1 else _slug(targets[0].label)}").resolve()
    outs = [base_out / _slug(t.label) for t in targets] if many else [base_out]
    if dry_run:  # shapes, shards and sizes from the headers alone; nothing is read or written
        res = ExtractResult(str(path))
        for t, o in zip(targets, outs):
            p = plan(src, spec, t.cfg, max_shard_bytes)
            kind = hf_config_for(json.loads((path / "config.json").read_text()), spec, t.cfg, fmt)[1]
            n = sum(math.prod(v["shape"]) for h in p.headers for k, v in h.items() if k != "__metadata__")
            res.models.append(SubModel(str(o), kind, kind == "flex", config_to_json(t.cfg), n, t.method,
                                       t.budget.text if t.budget else None, t.budget_ms,
                                       table.predict(t.cfg) if table is not None else None,
                                       regime=table.regime.key if table else None, planned_bytes=p.total_bytes,
                                       planned_files=p.files))
        res.seconds = round(time.time() - t0, 3)
        return res
    if many and base_out.exists() and not base_out.is_dir():
        raise UsageError(f"output {base_out} exists and is not a directory")
    for o in outs:
        if o.parent.exists():
            check_output(o, force)
    if many:
        base_out.mkdir(parents=True, exist_ok=True)
    if verify is None:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        verify = param_count(spec, spec.full()) * 4 * 3 < ram * 0.5
    result = ExtractResult(str(path))
    base_cfg = json.loads((path / "config.json").read_text())
    for t, o in zip(targets, outs):
        hf_cfg, kind = hf_config_for(base_cfg, spec, t.cfg, fmt)
        with atomic_dir(o, force) as tmp, rep.task(f"extracting {t.label} -> {o.name}"):
            w = StreamingWriter(tmp, plan(src, spec, t.cfg, max_shard_bytes))
            n_params = 0
            for name, tensor in stream_sliced(src, spec, t.cfg):
                w.write(name, tensor)
                n_params += tensor.numel()
                del tensor
            w.close()
            write_json(tmp / "config.json", hf_cfg)
            copy_files([f for f in src.non_weight_files() if f.name != "config.json" and not f.name.startswith("flex_")],
                       tmp)
            if kind == "flex":
                (tmp / "modeling_flexcli.py").write_text(modeling_source(base_cfg["model_type"]))
            pred = table.predict(t.cfg) if table is not None else None
            write_json(tmp / "flex_extract.json", {
                "source": str(path.resolve()), "format": kind, "config": config_to_json(t.cfg), "method": t.method,
                "budget": t.budget.text if t.budget else None, "budget_ms": t.budget_ms,
                "predicted_latency_ms": pred, "regime": table.regime.key if table else None,
                "params": n_params})
            sm = SubModel(str(o), kind, kind == "flex", config_to_json(t.cfg), n_params, t.method,
                          t.budget.text if t.budget else None, t.budget_ms, pred,
                          regime=table.regime.key if table else None)
            if verify:  # before the commit: a sub-model that fails verification is never left behind
                sm.verified_max_rel_err, sm.measured_latency_ms = verify_submodel(path, tmp, spec, t.cfg, table, rep)
        result.models.append(sm)
    result.seconds = round(time.time() - t0, 2)
    return result


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", label.replace("%", "pct")) or "sub"


def verify_submodel(path: Path, sub: Path, spec: ElasticSpec, cfg: Config, table: LatencyTable | None,
                    rep: Reporter) -> tuple[float, float | None]:
    """Extracted model vs the elastic model at `cfg` on the same batch; then its latency in the table's regime."""
    from transformers import AutoModelForCausalLM

    from .elastic import load_elastic
    from .hf_modeling import register

    register()
    with rep.task("verifying against the elastic model"), torch.no_grad():
        el = load_elastic(path)
        model = AutoModelForCausalLM.from_pretrained(sub, dtype=torch.float32, local_files_only=True).eval()
        x = torch.randint(0, spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with el.configured(cfg):
            want = el(input_ids=x).logits
        got = model(input_ids=x).logits
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 1e-4:
            raise RuntimeFailure(f"verification failed: the extracted model's logits differ from the elastic "
                                 f"model's by {err:.2e} (nothing was written)")
        measured = None
        from .profile import ProfileOptions, Runner, device_name, time_fn

        if table is not None and table.regime.device == "cpu" and table.regime.dtype == "float32" and \
                table.regime.device_name == device_name(torch.device("cpu")):  # only where the table was measured

            r = table.regime
            o = ProfileOptions(batch=r.batch, seq_len=r.seq_len if r.phase == "prefill" else 1, phase=r.phase,
                               kv_len=r.kv_len or None)
            runner = Runner(model, o, torch.device("cpu"))
            with torch.inference_mode():  # as flex profile times
                measured = time_fn(runner.model_fn(model), runner.sync, o, 0.15).ms
    return err, measured
