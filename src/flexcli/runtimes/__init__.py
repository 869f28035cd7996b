"""The runtimes flexcli writes sub-models for and times them in (runtimes.base describes the protocol).

    torch      transformers safetensors directories (runtimes.pytorch)
    llama.cpp  GGUF files, run through llama-cpp-python (runtimes.llamacpp)

A new runtime is one module implementing runtimes.base.Runtime, registered in RUNTIMES.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import ArtifactOptions, Backend, Runtime, WriteJob, Written
from .llamacpp import LlamaCppRuntime
from .pytorch import TorchRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), LlamaCppRuntime())}

__all__ = ["RUNTIMES", "ArtifactOptions", "Backend", "Runtime", "WriteJob", "Written", "get", "for_format"]


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}", option="runtime")
    return RUNTIMES[name]


def for_format(fmt: str) -> Runtime:
    """The runtime that writes `flex extract --format fmt`."""
    for r in RUNTIMES.values():
        if fmt in r.formats:
            return r
    choices = ", ".join(f for r in RUNTIMES.values() for f in r.formats)
    raise UsageError(f"format must be one of {choices}, got {fmt!r}", option="fmt")
