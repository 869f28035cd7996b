"""Shared fixtures: a locally trained tokenizer and tiny Llama / Mistral / Qwen2 checkpoints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path_factory, monkeypatch):
    """Every test runs in its own empty directory: commands that record outputs in ./flex-project.json or
    default their output to the working directory never touch the repository."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from flexcli.commands.pretrain import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer("stdlib", 320, max_chars=200_000).save_pretrained(d)
    return d


def make_model(
    path: Path,
    tokenizer_dir: Path,
    family: str = "llama",
    heads: int = 4,
    kv: int = 2,
    tied: bool = False,
    hidden: int = 64,
    layers: int = 2,
    inter: int = 96,
    shard: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a random tiny model of `family` with transformers alone (save_pretrained), plus tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    cfg = cfg_cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():  # random norms and biases too, so nothing is trivially symmetric
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in n else 0.3 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path, tokenizer_dir) -> Path:
    return make_model(tmp_path / "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((src / f).read_text() for f in ("textwrap.py", "bisect.py", "heapq.py"))
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(text)
    return p


def flex_cmd() -> list[str]:
    """The installed console script (the real entry point, not an in-process call)."""
    exe = Path(sys.executable).parent / "flex"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flexcli"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def small_elastic(tmp_path, tokenizer_dir, calib_file, family="mistral", heads=8, kv=2, tied=False):
    """A converted 3-layer elastic checkpoint of `family` with a synthetic latency table."""
    from flexcli.arch.spec import ElasticSpec
    from flexcli.commands.convert import ConvertOptions, convert
    from flexcli.latency.table import LatencyTable, Regime, save_table

    src = make_model(
        tmp_path / "src", tokenizer_dir, family, heads, kv, tied=tied, hidden=64, layers=3, inter=128
    )
    el = Path(
        convert(
            str(src),
            ConvertOptions(
                calib=str(calib_file), calib_samples=2, seq_len=32, device="cpu", output=tmp_path / "el"
            ),
        ).output
    )
    spec = ElasticSpec.from_dict(json.loads((el / "flex_elastic.json").read_text())["spec"])
    mlp, heads_ = spec.layers[0].mlp, spec.layers[0].heads
    table = LatencyTable(
        Regime("cpu", "synthetic", "float32", 1, 16, "prefill", 0),
        {},
        0.2,
        [mlp] * 3,
        [heads_] * 3,
        [[[0.01 * m / 16 + 0.1 * h for h in heads_] for m in mlp]] * 3,
    )
    save_table(el, table)
    return el, spec, table


def reference_logits(el: Path, cfg) -> torch.Tensor:
    """The elastic model's logits at `cfg` on a fixed random (2, 24) batch."""
    from flexcli.elastic.runtime import load_elastic

    e = load_elastic(el)
    x = torch.randint(0, e.spec.dims.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), e.configured(cfg):
        return e(input_ids=x).logits
