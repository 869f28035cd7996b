"""flexcli: turn a Hugging Face LLM into a nested elastic model (Flextron) and export sub-models."""

__version__ = "0.1.0"
