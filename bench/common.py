"""Shared by the benchmark scripts: the repository root and running `flex ... --json` as users do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
