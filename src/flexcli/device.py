"""Devices: resolving --device, naming the hardware a latency table was measured on, fast-bf16 detection,
the machine's memory."""

from __future__ import annotations

import platform

import torch

from .errors import UsageError


def ram_bytes() -> int:
    """This machine's physical memory."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda[:N]'; a one-line error when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{name} requested but no CUDA device is available; use cpu", option="device")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{torch.get_num_threads()}"


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (elsewhere CPU bf16 matmuls fall back to slow paths)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto | fp32 | bf16) on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
