"""Exceptions that map to flexcli's documented exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3


class FlexError(Exception):
    """Base error: a one-line message for the user and an exit code."""

    exit_code = EXIT_RUNTIME


class UsageError(FlexError):
    """Bad usage or bad input: missing file, corrupt checkpoint, invalid recipe (exit 2)."""

    exit_code = EXIT_USAGE


class InfeasibleError(FlexError):
    """A well-formed request that cannot be met, e.g. a budget below the smallest sub-network (exit 3)."""

    exit_code = EXIT_INFEASIBLE


class RuntimeFailure(FlexError):
    """Something failed while doing valid work: network, disk, device (exit 1)."""

    exit_code = EXIT_RUNTIME
