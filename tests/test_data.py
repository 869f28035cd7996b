"""The built-in corpora: stdlib (code), pydoc (English prose) and docstrings (prose of stdlib's split), disjoint."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from flexcli.train.data import DOCSTRINGS, PYDOC, STDLIB, docstrings, has_split, iter_documents, stdlib_files


def test_pydoc_is_prose_and_not_in_stdlib():
    docs = list(iter_documents(PYDOC))
    assert len(docs) > 50 and sum(map(len, docs)) > 200_000
    words = " ".join(docs[:20]).split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5  # mostly words, not code
    assert list(iter_documents(PYDOC, "heldout")) == docs  # an evaluation corpus: no split
    for split in ("train", "heldout"):
        assert not any("pydoc_data" in p.parts for p in stdlib_files(split))


def test_stdlib_order_is_a_fixed_sample_of_the_whole_library():
    files = stdlib_files("train")
    assert files == stdlib_files("train")  # deterministic
    root = Path(sysconfig.get_paths()["stdlib"])
    first = {p.relative_to(root).parts[0] for p in files[:200]}
    assert files != sorted(files) and len(first) > 20  # a prefix spans many packages, not just a*-b*
    held = set(stdlib_files("heldout"))
    assert held and not held & set(files)


def test_token_file_is_the_token_stream_on_disk(tmp_path, tokenizer_dir, calib_file):
    """Training text is tokenized once into a memory-mapped uint32 file: the same tokens as the in-memory
    stream, a file of exactly that size, and the held-out tail cut the same way."""
    import torch
    from transformers import AutoTokenizer

    from flexcli.train.data import token_file, token_stream, train_and_heldout

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    want = token_stream(tok, calib_file, 5000)
    got = token_file(tok, calib_file, 5000, tmp_path / "t.u32")
    assert torch.equal(got.long(), want) and (tmp_path / "t.u32").stat().st_size == 4 * want.numel()
    assert not list(tmp_path.glob(".t.u32.tmp-*"))
    a_tokens, a_held = train_and_heldout(tok, calib_file, 4000, 2, 64)
    b_tokens, b_held = train_and_heldout(tok, calib_file, 4000, 2, 64, cache=tmp_path)
    assert torch.equal(a_tokens, b_tokens.long()) and torch.equal(a_held, b_held)


def test_docstrings_are_the_prose_of_stdlibs_own_split():
    src = '"""Module doc."""\n\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n        return 1\n'
    assert docstrings(src) == "Module doc.\n\nClass doc.\n\nMethod doc."
    assert docstrings("def f(:\n") == "" and docstrings("x = 1\n") == ""
    train = list(iter_documents(DOCSTRINGS))
    assert len(train) > 300 and sum(map(len, train)) > 500_000
    words = " ".join(train[:50]).split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5  # mostly words
    # the held-out split's docstrings come from the held-out files only: the few also in train are
    # one-liners that different files share ("Main entry point")
    held = list(iter_documents(DOCSTRINGS, "heldout"))
    assert held and all(len(d) < 100 for d in set(held) & set(train))
    assert has_split(DOCSTRINGS) and has_split("stdlib+docstrings") and not has_split("stdlib+pydoc")


def test_a_mix_interleaves_its_corpora_document_by_document(tmp_path):
    import itertools

    (tmp_path / "a.txt").write_text("only document of a")
    mixed = list(itertools.islice(iter_documents(f"{STDLIB}+{DOCSTRINGS}"), 6))
    code = list(itertools.islice(iter_documents(STDLIB), 3))
    prose = list(itertools.islice(iter_documents(DOCSTRINGS), 3))
    assert mixed == [d for pair in zip(code, prose) for d in pair]
    # the shorter one ends, the longer one goes on
    got = list(itertools.islice(iter_documents(f"{tmp_path / 'a.txt'}+{PYDOC}"), 3))
    assert got[0] == "only document of a" and got[1:] == list(itertools.islice(iter_documents(PYDOC), 2))
