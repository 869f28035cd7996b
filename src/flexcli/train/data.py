"""Text corpora for calibration and training: files, directories, JSONL, and the built-in stdlib corpus.

Two built-in corpora are present on every machine with Python:

- ``stdlib``: the Python standard library's own source tree (code), without ``pydoc_data/``. Files are
  split deterministically into train / held-out by a hash of their relative path, so every machine
  sees the same split.
- ``pydoc``: English prose, the language-reference topics CPython ships for ``help()``
  (``Lib/pydoc_data/topics.py``), one document per topic. It is a second, different-domain corpus for
  evaluation; it has no split (every topic is in both), and it is not part of ``stdlib``.
- ``docstrings``: English prose for calibration, the docstrings (module, class, function) of ``stdlib``'s
  files of the same split, one document per file (in reverse order): it never touches the held-out
  files or pydoc.

``A+B`` mixes corpora document by document (A, B, A, B, ...; the rest of the longer one after the shorter
ends), so any prefix of the stream holds both.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

STDLIB = "stdlib"
PYDOC = "pydoc"
DOCSTRINGS = "docstrings"
BUILTIN = (STDLIB, PYDOC, DOCSTRINGS)
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".csv", ".tex", ".html", ".c", ".h", ""}


def stdlib_files(split: str = "train", heldout_pct: int = 5) -> list[Path]:
    """The stdlib's .py files (no site-packages), `split` 'train' or 'heldout', in a fixed pseudo-random
    order (by a hash of the relative path), so that any prefix of the stream is a sample of the whole
    library rather than its alphabetically first packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    keyed = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "pydoc_data/")) or "/site-packages/" in rel:
            continue
        h = hashlib.sha256(rel.encode()).hexdigest()
        if (int(h[:8], 16) % 100 < heldout_pct) == (split == "heldout"):
            keyed.append((h[8:], p))
    return [p for _, p in sorted(keyed)]


def _read_text_file(p: Path) -> str:
    raw = p.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UsageError(f"{p}: binary file, expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not UTF-8 text") from None


def _read_jsonl(p: Path) -> Iterator[str]:
    for n, line in enumerate(_read_text_file(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{p}:{n}: each JSONL line needs a string field 'text'") from None
        if not isinstance(text, str):
            raise UsageError(f"{p}:{n}: field 'text' is not a string")
        yield text


def pydoc_topics() -> list[str]:
    """The prose of CPython's help() topics, sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UsageError("corpus 'pydoc' needs pydoc_data, which this Python installation lacks") from None
    return [topics[k] for k in sorted(topics)]


def has_split(source: str | Path) -> bool:
    """Whether `source` is built from stdlib's file split ('stdlib', 'docstrings' and their mixes), so
    its 'heldout' split is text its 'train' split never contains."""
    return all(part in (STDLIB, DOCSTRINGS) for part in str(source).split("+"))


def _stdlib_sources(split: str, reverse: bool = False) -> Iterator[str]:
    files = stdlib_files(split)
    for p in reversed(files) if reverse else files:
        try:
            yield p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def docstrings(source: str) -> str:
    """The docstrings of one Python file (module, classes, functions, in source order), blank-line
    separated; "" when it has none or does not parse."""
    try:
        with warnings.catch_warnings():  # old files' invalid escapes warn; their docstrings are fine
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return "\n\n".join(d for d in found if d and d.strip())


def _interleave(streams: list[Iterator[str]]) -> Iterator[str]:
    """Documents of every stream in equal shares of text: the next one comes from the stream that has
    given the fewest characters so far (the first on a tie); a stream that ends leaves the others.
    Alternating document by document made 'stdlib+docstrings' 95% code by tokens (a file's code is
    thousands of tokens, its docstrings tens), so "code and prose" calibration was code."""
    given = [0] * len(streams)
    live = list(range(len(streams)))
    while live:
        i = min(live, key=lambda j: given[j])
        d = next(streams[i], None)
        if d is None:
            live.remove(i)
            continue
        given[i] += len(d)
        yield d


def iter_documents(source: str | Path, split: str = "train") -> Iterator[str]:
    """Yield documents from a text file, a JSONL file (`text` field), a directory, 'stdlib', 'pydoc',
    'docstrings', or several of these joined by '+' (mixed in equal shares of text, _interleave)."""
    parts = str(source).split("+")
    if len(parts) > 1 and all(parts):
        yield from _interleave([iter_documents(p, split) for p in parts])
        return
    if str(source) == PYDOC:
        yield from pydoc_topics()
        return
    if str(source) == STDLIB:
        yield from _stdlib_sources(split)
        return
    if str(source) == DOCSTRINGS:
        # the files in reverse order: 'stdlib+docstrings' then mixes different files, not a file's
        # code with its own docstrings
        yield from (d for d in map(docstrings, _stdlib_sources(split, reverse=True)) if d)
        return
    p = Path(source)
    if not p.exists():
        raise UsageError(f"text data {p} does not exist")
    files = (
        [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    )
    if not files:
        raise UsageError(f"{p}: no text files found")
    for f in files:
        yield from (_read_jsonl(f) if f.suffix == ".jsonl" else [_read_text_file(f)])


def document_ids(tokenizer, source: str | Path, split: str = "train") -> Iterator[list[int]]:
    """Each non-empty document's token ids, followed by EOS (when the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    for doc in iter_documents(source, split):
        if doc.strip():
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            yield ids + [eos] if eos is not None else ids


def token_stream(tokenizer, source: str | Path, max_tokens: int, split: str = "train") -> torch.Tensor:
    """Tokenize documents (EOS between them) until `max_tokens`; returns a 1-D LongTensor."""
    ids: list[int] = []
    for doc in document_ids(tokenizer, source, split):
        ids.extend(doc)
        if len(ids) >= max_tokens:
            break
    if not ids:
        raise UsageError(f"text data {source} is empty")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def pack(tokens: torch.Tensor, seq_len: int, n: int | None = None, source: str | Path = "") -> torch.Tensor:
    """Cut a token stream into (n, seq_len) sequences; error if shorter than one sequence."""
    total = tokens.numel() // seq_len
    if total == 0:
        raise UsageError(
            f"text data {source} has {tokens.numel()} tokens, shorter than one sequence of {seq_len}; "
            "pass more text or a smaller --seq-len"
        )
    total = total if n is None else min(n, total)
    return tokens[: total * seq_len].view(total, seq_len)


def load_sequences(tokenizer, source: str | Path, n: int, seq_len: int, split: str = "train") -> torch.Tensor:
    """(n, seq_len) packed sequences from `source` (fewer if the text runs out)."""
    return pack(token_stream(tokenizer, source, n * seq_len, split), seq_len, n, source)


def token_file(
    tokenizer, source: str | Path, max_tokens: int, path: Path, split: str = "train"
) -> torch.Tensor:
    """Tokenize documents (EOS between them) until `max_tokens` into `path` (uint32, written in chunks
    through a temporary sibling) and return the file memory-mapped as a 1-D tensor: a corpus of any size
    costs disk, not memory. An existing complete file is reused (a resumed run reads the same tokens)."""
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        n, buf = 0, []
        with open(tmp, "wb") as f:
            for doc in document_ids(tokenizer, source, split):
                buf.extend(doc)
                if len(buf) >= 1 << 20 or n + len(buf) >= max_tokens:
                    buf = buf[: max_tokens - n]
                    np.asarray(buf, dtype=np.uint32).tofile(f)
                    n, buf = n + len(buf), []
                    if n >= max_tokens:
                        break
            np.asarray(buf, dtype=np.uint32).tofile(f)
            n += len(buf)
        if n == 0:
            tmp.unlink()
            raise UsageError(f"text data {source} is empty")
        os.replace(tmp, path)
    return torch.from_numpy(np.memmap(path, dtype=np.uint32, mode="c"))


def train_and_heldout(
    tokenizer,
    source: str | Path,
    max_tokens: int,
    heldout_seqs: int,
    seq_len: int,
    cache: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1-D training token stream, (n, seq_len) held-out sequences). With `cache` (a directory) the
    stream is a memory-mapped token file there (see `token_file`); otherwise it is read into memory.

    For 'stdlib' (and 'docstrings' and their mix) the held-out text is the held-out file split; for
    anything else it is the last 5% of the tokens read (the training stream never contains it).
    """

    def stream(n: int, split: str = "train") -> torch.Tensor:
        if cache is None:
            return token_stream(tokenizer, source, n, split)
        return token_file(tokenizer, source, n, cache / f"tokens-{split}-{n}.u32", split)

    if has_split(source):
        return stream(max_tokens), load_sequences(tokenizer, source, heldout_seqs, seq_len, "heldout")
    tokens = stream(max_tokens + heldout_seqs * seq_len)
    cut = max(seq_len + 1, int(tokens.numel() * 0.95))
    heldout = tokens[cut:].long()
    return tokens[:cut], pack(heldout, seq_len, heldout_seqs, f"{source} (held-out last 5%)")


def calibration_text(elastic: Path, n: int, seq_len: int, split: str) -> torch.Tensor:
    """(n, seq_len) sequences of the checkpoint's own calibration text (its recipe's calibration.data,
    default stdlib), from `split` ("train" or "heldout")."""
    from transformers import AutoTokenizer

    from ..io import layout

    cal = (layout.read_manifest(elastic).get("recipe") or {}).get("calibration") or {}
    tok = AutoTokenizer.from_pretrained(elastic, local_files_only=True)
    return load_sequences(tok, cal.get("data") or "stdlib", n, seq_len, split)


def calibration_sequences(elastic: Path, tokens: int, max_seq: int = 512) -> torch.Tensor:
    """About `tokens` tokens of the calibration text's train split, at the recipe's sequence length
    (at most `max_seq`)."""
    from ..io import layout

    cal = (layout.read_manifest(elastic).get("recipe") or {}).get("calibration") or {}
    seq_len = min(int(cal.get("seq_len") or max_seq), max_seq)
    return calibration_text(elastic, max(1, tokens // seq_len), seq_len, "train")
