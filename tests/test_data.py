"""The built-in corpora: stdlib (code) and pydoc (English prose), disjoint."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from flexcli.train.data import PYDOC, iter_documents, stdlib_files


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
