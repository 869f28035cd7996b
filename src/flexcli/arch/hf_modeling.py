"""Heterogeneous (per-layer width) causal LMs for stock transformers.

flexcli writes this file, unchanged except for BASE_MODEL_TYPE, into every extracted sub-model whose
layers differ in MLP width or head count, as ``modeling_flexcli.py``. It only imports torch and
transformers and does nothing but build the family's own transformers model and swap each decoder
layer's MLP and attention modules for the same transformers classes built with that layer's sizes
(config.json ``flex_layers``). No weights are touched here; loading is transformers' own.

In a process that imported flexcli, ``register()`` makes these classes known to the Auto classes, so
``from_pretrained`` needs no ``trust_remote_code``.
"""

import copy

import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

BASE_MODEL_TYPE = "llama"
FAMILIES = ("llama", "mistral", "qwen2")


def layer_config(config, i):
    """A copy of `config` with layer i's sizes (head_dim pinned, since head counts differ)."""
    spec = config.flex_layers[i]
    c = copy.deepcopy(config)
    c.intermediate_size = spec["intermediate_size"]
    c.num_attention_heads = spec["num_attention_heads"]
    c.num_key_value_heads = spec["num_key_value_heads"]
    c.head_dim = config.head_dim
    return c


def make_classes(base):
    """(config class, causal-LM class) for heterogeneous models of transformers family `base`."""
    base_config = CONFIG_MAPPING[base]
    base_model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base])

    class FlexConfig(base_config):
        model_type = "flexcli_" + base

        def validate(self):
            """The family's own checks, except hidden_size % heads: head_dim is explicit here (transformers'
            LlamaConfig insists on divisibility; pruned head counts such as 24 of 32 break it)."""
            for check in getattr(base_config, "__class_validators__", []):
                if check.__name__ != "validate_architecture":
                    check(self)

    class FlexForCausalLM(base_model):
        config_class = FlexConfig

        def __init__(self, config):
            super().__init__(config)
            for i, layer in enumerate(self.model.layers):
                lc = layer_config(config, i)
                layer.mlp = type(layer.mlp)(lc)
                layer.self_attn = type(layer.self_attn)(lc, layer_idx=i)
            self.post_init()

    FlexConfig.__name__ = FlexConfig.__qualname__ = "Flex" + base_config.__name__
    FlexForCausalLM.__name__ = FlexForCausalLM.__qualname__ = "Flex" + base_model.__name__
    return FlexConfig, FlexForCausalLM


FlexConfig, FlexForCausalLM = make_classes(BASE_MODEL_TYPE)
globals()[FlexConfig.__name__] = FlexConfig  # the names config.json's auto_map refers to,
globals()[FlexForCausalLM.__name__] = FlexForCausalLM  # e.g. FlexLlamaConfig / FlexLlamaForCausalLM


def register():
    """Register the heterogeneous classes of every supported family with AutoConfig / AutoModelForCausalLM."""
    for base in FAMILIES:
        cfg, model = make_classes(base)
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, model, exist_ok=True)
