"""`flex validate`: check a source, elastic or extracted checkpoint without trusting any of it.

Every problem is collected (file, tensor, expected, found) instead of stopping at the first one:
safetensors headers, index vs files, duplicate or missing tensors, shapes and dtypes vs config.json,
NaN/Inf (streamed one tensor at a time), and flexcli's own metadata (spec, permutations, routers,
latency tables) against the weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .arch import Dims, detect
from .checkpoint import read_safetensors_header
from .errors import FlexError, UsageError


@dataclass
class Problem:
    file: str
    message: str
    tensor: str | None = None
    expected: Any = None
    found: Any = None


@dataclass
class ValidateResult:
    path: str
    kind: str  # source | elastic | extracted
    valid: bool
    tensors: int
    problems: list[Problem] = field(default_factory=list)


def expected_shapes(config: dict[str, Any]) -> dict[str, list[int]]:
    """Tensor name -> shape for a Llama-family causal LM (per-layer sizes from `flex_layers` if present)."""
    d = Dims.from_config({**config, "intermediate_size": config.get("intermediate_size", 0)})
    h, hd = d.hidden_size, d.head_dim
    layers = config.get("flex_layers") or [{"intermediate_size": d.intermediate_size, "num_attention_heads": d.num_heads,
                                            "num_key_value_heads": d.num_kv_heads}] * d.num_layers
    bias_qkv = config.get("model_type", "").endswith("qwen2") or bool(config.get("attention_bias"))
    out = {"model.embed_tokens.weight": [d.vocab_size, h], "model.norm.weight": [h]}
    if not d.tied:
        out["lm_head.weight"] = [d.vocab_size, h]
    for i, lc in enumerate(layers):
        f, q, kv = lc["intermediate_size"], lc["num_attention_heads"] * hd, lc["num_key_value_heads"] * hd
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                    p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h], p + "mlp.down_proj.weight": [h, f],
                    p + "self_attn.q_proj.weight": [q, h], p + "self_attn.k_proj.weight": [kv, h],
                    p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, q]})
        if bias_qkv:
            out.update({p + "self_attn.q_proj.bias": [q], p + "self_attn.k_proj.bias": [kv],
                        p + "self_attn.v_proj.bias": [kv]})
    return out


def validate(path: Path, check_data: bool = True) -> ValidateResult:
    """Validate the checkpoint directory `path`; problems are returned, not raised."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} does not exist or is not a directory")
    kind = "elastic" if (path / "flex_elastic.json").exists() else "extracted" if (path / "flex_extract.json").exists() \
        else "source"
    res = ValidateResult(str(path), kind, True, 0)
    bad = res.problems.append
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        bad(Problem("config.json", f"missing or invalid: {e}"))
        res.valid = False
        return res
    cfg_for_arch = {**config, "architectures": [a.removeprefix("Flex") for a in config.get("architectures") or []]}
    try:
        detect(cfg_for_arch)
        want = expected_shapes(config)
    except FlexError as e:
        bad(Problem("config.json", str(e)))
        want = None
    headers = _headers(path, bad)
    seen: dict[str, str] = {}
    for fname, header in headers.items():
        for name, info in header.items():
            if name in seen:
                bad(Problem(fname, "duplicate tensor (also in another file)", name, seen[name], fname))
            seen[name] = fname
            res.tensors += 1
            if want is not None:
                if name not in want:
                    bad(Problem(fname, "unexpected tensor for this config", name))
                elif list(info["shape"]) != want[name]:
                    bad(Problem(fname, "shape does not match config.json", name, want[name], info["shape"]))
    if want is not None:
        for name in sorted(set(want) - set(seen)):
            bad(Problem("(weights)", "missing tensor", name, want[name], None))
    if check_data and headers and not res.problems:
        _scan_values(path, headers, bad)
    if kind == "elastic":
        _check_elastic(path, config, headers, bad)
    res.valid = not res.problems
    return res


def _headers(path: Path, bad) -> dict[str, dict[str, Any]]:
    index = path / "model.safetensors.index.json"
    files: list[str] = []
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            bad(Problem(index.name, "invalid index (no weight_map)"))
            return {}
        files = sorted(set(wmap.values()))
    elif (path / "model.safetensors").exists():
        files, wmap = ["model.safetensors"], None
    else:
        bad(Problem("(weights)", "no model.safetensors or model.safetensors.index.json"))
        return {}
    headers = {}
    for f in files:
        if not (path / f).exists():
            bad(Problem(index.name, "index names a missing shard", None, f, None))
            continue
        try:
            headers[f] = read_safetensors_header(path / f)
        except UsageError as e:
            bad(Problem(f, str(e).split(": ", 1)[-1]))
    if wmap is not None:
        for name, f in wmap.items():
            if f in headers and name not in headers[f]:
                bad(Problem(index.name, "index maps a tensor to a file that does not contain it", name, f, None))
        for f, h in headers.items():
            for name in h:
                if wmap.get(name) != f:
                    bad(Problem(f, "tensor not listed in the index", name))
    return headers


def _scan_values(path: Path, headers, bad) -> None:
    import torch
    from safetensors import safe_open

    for f in headers:
        with safe_open(str(path / f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad(Problem(f, "NaN or Inf values", name, "finite", "non-finite"))


def _check_elastic(path: Path, config, headers, bad) -> None:
    from .spec import ElasticSpec

    try:
        manifest = json.loads((path / "flex_elastic.json").read_text())
        spec = ElasticSpec.from_dict(manifest["spec"])
    except (OSError, json.JSONDecodeError, KeyError, FlexError) as e:
        bad(Problem("flex_elastic.json", f"invalid: {e}"))
        return
    dims = Dims.from_config(config)
    if spec.dims != dims:
        bad(Problem("flex_elastic.json", "spec dims differ from config.json", None, str(dims), str(spec.dims)))
    for i, lc in enumerate(spec.layers):
        if lc.mlp != sorted(lc.mlp, reverse=True) or lc.mlp[0] != dims.intermediate_size or min(lc.mlp) < 1:
            bad(Problem("flex_elastic.json", f"layer {i}: MLP choices must descend from {dims.intermediate_size}",
                        None, None, lc.mlp))
        step = dims.num_kv_heads if spec.gqa == "query" else dims.group_size
        if lc.heads[0] != dims.num_heads or any(h % step or h < 1 for h in lc.heads):
            bad(Problem("flex_elastic.json", f"layer {i}: head choices must be multiples of {step} up to {dims.num_heads}",
                        None, None, lc.heads))
    imp = path / "flex_importance.safetensors"
    if imp.exists():
        from safetensors.torch import load_file

        t = load_file(imp)
        for i in range(dims.num_layers):
            for unit, n in (("neuron", dims.intermediate_size), ("qhead", dims.num_heads), ("kvhead", dims.num_kv_heads)):
                p = t.get(f"layers.{i}.{unit}_perm")
                if p is None or sorted(p.tolist()) != list(range(n)):
                    bad(Problem(imp.name, "not a permutation", f"layers.{i}.{unit}_perm", f"0..{n - 1}", None))
    rj = path / "flex_routers.json"
    if rj.exists():
        doc = json.loads(rj.read_text())
        rt = path / "flex_routers.safetensors"
        if not rt.exists() or hashlib.sha256(rt.read_bytes()).hexdigest() != doc.get("sha256"):
            bad(Problem(rt.name, "router tensors missing or not the ones flex_routers.json describes"))
    lj = path / "flex_latency.json"
    if lj.exists():
        try:
            regimes = json.loads(lj.read_text())["regimes"]
        except (json.JSONDecodeError, KeyError):
            bad(Problem(lj.name, "invalid latency file"))
            return
        for key, tab in regimes.items():
            if tab.get("mlp") != [lc.mlp for lc in spec.layers] or tab.get("heads") != [lc.heads for lc in spec.layers]:
                bad(Problem(lj.name, "latency table choice lists differ from the elastic spec", key))


def to_dict(r: ValidateResult) -> dict[str, Any]:
    return asdict(r)
