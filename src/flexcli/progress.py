"""Progress reporting: library code calls a Reporter; the CLI decides how (and whether) to show it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger("flexcli")


class Task(Protocol):
    def advance(self, n: float = 1, **fields: object) -> None: ...


class Reporter:
    """No-op reporter (the default for library calls). Subclasses render to a terminal."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        log.info("%s ...", description)
        yield _NullTask()

    def info(self, msg: str) -> None:
        log.info(msg)

    def warn(self, msg: str) -> None:
        log.warning(msg)


class _NullTask:
    def advance(self, n: float = 1, **fields: object) -> None:
        pass
