"""`flex pretrain`: a real (small) base model made here: a byte-level BPE tokenizer and a Llama trained
from scratch on a text corpus, by default the Python standard library's source tree.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..elastic.evaluate import mean_loss
from ..errors import UsageError
from ..io import layout
from ..io.atomic import atomic_dir, check_output
from ..io.source import load_tokenizer
from ..io.submodel import modeling_source
from ..progress import Reporter
from ..recipe import TrainSection
from ..train.data import STDLIB, iter_documents, train_and_heldout
from ..train.loop import TrainConfig, train_lm

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab)
SIZES = {
    "tiny": (64, 2, 4, 2, 176, 512),
    "small": (256, 4, 8, 8, 704, 4096),
    "base": (384, 6, 12, 12, 1024, 8192),
}
SPECIAL = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(corpus: str | Path, vocab_size: int, max_chars: int = 8_000_000):
    """Byte-level BPE trained on the first `max_chars` of the corpus' training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        n = 0
        for doc in iter_documents(corpus, "train"):
            yield doc
            n += len(doc)
            if n >= max_chars:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL[0],
        bos_token=SPECIAL[0],
        unk_token=None,
        pad_token=SPECIAL[1],
        model_max_length=1 << 30,
    )


def make_llama(size: str, vocab_size: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, _ = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max(seq_len, 1024),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@dataclass
class PretrainResult:
    output: str
    params: int
    train_tokens: int
    seconds: float
    tokens_per_s: float
    heldout_loss: float
    heldout_ppl: float
    corpus: str


def model_like(like: Path, seed: int):
    """(tokenizer, randomly initialised model) with the architecture and tokenizer of the model in `like`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(like) / "config.json").is_file():
        raise UsageError(f"{like} has no config.json; give a Hugging Face model directory", option="like")
    from .. import register_auto_classes

    register_auto_classes()  # flex-format sub-models (per-layer widths) too
    cfg = AutoConfig.from_pretrained(like, local_files_only=True, trust_remote_code=False)
    tok = load_tokenizer(like)
    torch.manual_seed(seed)
    return tok, AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


@dataclass(kw_only=True)
class PretrainOptions:
    corpus: str = STDLIB  # 'stdlib' (the Python standard library), a file, directory or JSONL
    size: str = "small"  # tiny | small (~4M params) | base (~14M); ignored with `like`
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    like: Path | None = None  # take architecture and tokenizer from this model directory (fresh weights)
    force: bool = False

    def check(self) -> None:
        if self.like is None and self.size not in SIZES:
            raise UsageError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}", option="size")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(
                f"precision must be auto, fp32 or bf16, got {self.precision!r}", option="precision"
            )
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise UsageError("steps and batch size must be positive and the sequence length at least 8")


def _write(out: Path, model, tok, info: dict, force: bool) -> None:
    """The model directory: weights, tokenizer, flex_pretrain.json (and the modeling file for per-layer widths)."""
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        family = model.config.model_type.removeprefix("flexcli_")
        if family != model.config.model_type:  # per-layer widths: ship flexcli's own modeling file
            (tmp / layout.MODELING).write_text(modeling_source(family))
        layout.write_json(tmp / layout.PRETRAIN, info)


def pretrain(
    out: Path, options: PretrainOptions | None = None, reporter: Reporter | None = None
) -> PretrainResult:
    """Train tokenizer and model, evaluate on the held-out split, write a HF model directory OUT.

    With `like`, the architecture and tokenizer come from that model directory (weights are freshly
    initialised): the same architecture trained from scratch, e.g. as a baseline for a sub-model."""
    rep = reporter or Reporter()
    o = options or PretrainOptions()
    o.check()
    out = out.resolve()
    check_output(out, o.force)
    torch.manual_seed(o.seed)
    if o.like is not None:
        tok, model = model_like(o.like, o.seed)
    else:
        with rep.task("training tokenizer"):
            tok = train_tokenizer(o.corpus, SIZES[o.size][5])
    with rep.task("tokenizing corpus"):
        tokens, heldout = train_and_heldout(
            tok, o.corpus, min(o.steps * o.batch_size * o.seq_len, 20_000_000), 64, o.seq_len
        )
    if tokens.numel() <= o.seq_len + 1:
        raise UsageError(
            f"corpus {o.corpus} has {tokens.numel()} tokens, too few for sequences of {o.seq_len}"
        )
    if o.like is None:
        model = make_llama(o.size, len(tok), o.seq_len, o.seed)
    section = TrainSection(
        steps=o.steps,
        batch_size=o.batch_size,
        seq_len=o.seq_len,
        lr=o.lr,
        warmup=max(1, o.steps // 20),
        precision=o.precision,
    )
    cfg = TrainConfig.from_section(section, o.seed)
    t0 = time.time()
    res = train_lm(model, tokens, cfg, rep)
    loss = mean_loss(model, heldout)
    info = {"corpus": str(o.corpus), "train": asdict(cfg), "like": o.like and str(o.like), "train_tokens": res.tokens,
            "heldout_loss": loss}  # fmt: skip
    _write(out, model, tok, info, o.force)
    params = sum(p.numel() for p in model.parameters())
    return PretrainResult(
        str(out),
        params,
        res.tokens,
        round(time.time() - t0, 1),
        res.tokens_per_s,
        round(loss, 4),
        round(math.exp(loss), 3),
        str(o.corpus),
    )
