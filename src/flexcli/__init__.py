"""flexcli: turn a Hugging Face LLM into a nested elastic model (Flextron) and export sub-models."""

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Make extracted heterogeneous sub-models (model_type flexcli_*) loadable by AutoModelForCausalLM
    without trust_remote_code. Done on `import flexcli` when transformers is already imported."""
    from .arch.hf_modeling import register

    register()


def _maybe_register() -> None:
    import sys

    if "transformers" in sys.modules:
        try:
            register_auto_classes()
        except Exception:  # never break `import flexcli` over an optional convenience
            pass


_maybe_register()
