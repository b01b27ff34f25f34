"""Errors the CLI turns into exit codes (docs/design.md §4): one class per code, so no stage prints or exits."""

import difflib
from collections.abc import Iterable


class SubloraError(Exception):
    """Bad input or a failure the user can act on: exit code 1, message shown without a traceback."""

    exit_code = 1


class UsageError(SubloraError):
    """A command line that cannot be run as given, found after parsing (e.g. a missing setting): exit code 2."""

    exit_code = 2


class QualityGateFailed(SubloraError):
    """A quality guard such as --max-loss-increase failed after the output was written: exit code 3."""

    exit_code = 3


def closest_names(name: str, candidates: Iterable[str]) -> str:
    """' Closest names: a, b.' for an error about a name that is not there (empty when nothing is close)."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.4)
    return f" Closest names: {', '.join(close)}." if close else ""
