"""The config.json and modeling file of an extracted sub-model.

A uniform configuration keeps the family's stock architecture (any runtime that loads the source loads
it). Per-layer widths become the `flexcli_<family>` architecture: config.json lists each layer's sizes
in `flex_layers` and names, through `auto_map`, the classes of the shipped `modeling_flexcli.py`
(arch/hf_modeling.py with the family filled in).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ..arch.spec import Config, ElasticSpec
from ..errors import UsageError
from . import layout


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


def hf_config_for(
    base: dict[str, Any], spec: ElasticSpec, cfg: Config, fmt: str
) -> tuple[dict[str, Any], str]:
    """config.json for the sub-model and its format: 'stock' when every layer has the same sizes."""
    uniform = len(set(cfg)) == 1
    if fmt == "stock" and not uniform:
        raise UsageError(
            "the stock format needs a uniform configuration (the same widths in every layer); "
            "use flex or auto",
            option="fmt",
        )
    out = dict(base)
    m0, h0 = cfg[0]
    out["head_dim"] = spec.dims.head_dim
    out.pop("auto_map", None)
    out.pop(layout.PER_LAYER, None)
    if uniform and fmt != "flex":
        stock = {
            **out,
            "intermediate_size": m0,
            "num_attention_heads": h0,
            "num_key_value_heads": spec.kv_heads(h0),
        }
        problem = stock_config_problem(stock)
        if problem is None:
            return stock, "stock"
        if fmt == "stock":
            raise UsageError(
                f"transformers rejects this configuration in the stock format ({problem}); use flex or auto",
                option="fmt",
            )
    out.update(
        intermediate_size=max(m for m, _ in cfg),
        num_attention_heads=max(h for _, h in cfg),
        num_key_value_heads=max(spec.kv_heads(h) for _, h in cfg),
    )
    out[layout.PER_LAYER] = [
        {"intermediate_size": m, "num_attention_heads": h, "num_key_value_heads": spec.kv_heads(h)}
        for m, h in cfg
    ]
    family = base["model_type"]
    arch_name = base["architectures"][0]
    out["model_type"] = f"flexcli_{family}"
    out["architectures"] = [f"Flex{arch_name}"]
    out["auto_map"] = {
        "AutoConfig": f"modeling_flexcli.Flex{type_name(family)}",
        "AutoModelForCausalLM": f"modeling_flexcli.Flex{arch_name}",
    }
    return out, "flex"


def type_name(family: str) -> str:
    """The transformers config class name of a family, e.g. LlamaConfig."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[family].__name__


def modeling_source(family: str) -> str:
    """modeling_flexcli.py for a sub-model of `family`."""
    text = resources.files("flexcli.arch").joinpath("hf_modeling.py").read_text()
    return text.replace('BASE_MODEL_TYPE = "llama"', f'BASE_MODEL_TYPE = "{family}"', 1)
