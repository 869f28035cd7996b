"""Exceptions that map to flexcli's documented exit codes."""

from __future__ import annotations

import re
from collections.abc import Callable

_FLAG = re.compile(r"\{flag:(\w+)(=[^}]*)?\}")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3


class FlexError(Exception):
    """Base error: a one-line message in the library's terms and an exit code.

    `option` names the field of the options object the message is about (e.g. "phase"); the CLI
    prefixes the message with the flag that sets it (--phase). A message names another option as
    ``{flag:force=True}``: the library reads "force=True", the command line "--force".
    """

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, option: str | None = None):
        self.template, self.option = message, option
        super().__init__(self.render(lambda name, value: f"{name}{value}"))

    def render(self, flag: Callable[[str, str], str]) -> str:
        """The message with each option reference written by `flag(name, "=value" or "")`."""
        return _FLAG.sub(lambda m: flag(m.group(1), m.group(2) or ""), self.template)


class UsageError(FlexError):
    """Bad usage or bad input: missing file, corrupt checkpoint, invalid recipe (exit 2)."""

    exit_code = EXIT_USAGE


class InfeasibleError(FlexError):
    """A well-formed request that cannot be met, e.g. a budget below the smallest sub-network (exit 3)."""

    exit_code = EXIT_INFEASIBLE


class RuntimeFailure(FlexError):
    """Something failed while doing valid work: network, disk, device (exit 1)."""

    exit_code = EXIT_RUNTIME
