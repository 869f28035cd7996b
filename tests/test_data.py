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


def test_a_mix_takes_equal_shares_of_text_document_by_document(tmp_path):
    """Each next document comes from the corpus that has given the least text so far, so a mix of long
    code files and short docstrings is half prose by size (alternating documents made it 95% code)."""
    import itertools

    mixed = list(itertools.islice(iter_documents(f"{STDLIB}+{DOCSTRINGS}"), 400))
    code = set(itertools.islice(iter_documents(STDLIB), 400))
    size = {k: sum(len(d) for d in mixed if (d in code) == (k == "code")) for k in ("code", "prose")}
    assert abs(size["code"] / (size["code"] + size["prose"]) - 0.5) < 0.05, size
    # every corpus in its own order; the first document is the first corpus's
    prose = list(itertools.islice(iter_documents(DOCSTRINGS), 400))
    assert mixed[0] == next(iter_documents(STDLIB))
    got_prose = [d for d in mixed if d not in code]
    assert got_prose == prose[: len(got_prose)]
    # the shorter one ends, the longer one goes on
    (tmp_path / "a.txt").write_text("only document of a")
    got = list(itertools.islice(iter_documents(f"{tmp_path / 'a.txt'}+{PYDOC}"), 3))
    assert got[0] == "only document of a" and got[1:] == list(itertools.islice(iter_documents(PYDOC), 2))
