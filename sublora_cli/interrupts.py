"""Ctrl-C and termination signals: at any moment one line and exit 128 + the signal's number (docs/design.md §4).

SIGINT, SIGTERM and SIGHUP raise `Interrupted`, a BaseException: no `except Exception` in the pipeline or in a
calibration script swallows it, and Typer does not turn it into a silent exit. Whatever a stage holds is released
by its own `finally` / `except BaseException` (the output's temporaries, the process group). The output's renames
run `deferred`, so a signal never lands between them. This module imports no torch: the entry point installs the
handlers before the slow imports, so a Ctrl-C in the first seconds is one line too. SIGKILL cannot be caught.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal asked the run to stop; the exit code is 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    received: list[int] = []  # every signal caught, in order
    deferring = False


def _on_signal(signum: int, _frame: object) -> None:
    _State.received.append(signum)
    if not _State.deferring:
        raise Interrupted(signum)


def received() -> int | None:
    """The first signal caught so far, or None."""
    return _State.received[0] if _State.received else None


@contextmanager
def handled() -> Iterator[None]:
    """Catch SIGINT/SIGTERM/SIGHUP as `Interrupted` for the duration (the previous handlers come back after, so an
    in-process caller such as the tests keeps its own). Outside the main thread signals cannot be handled: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def install() -> None:
    """Catch the signals for the rest of the process (the entry point, before the slow imports)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back a signal that arrives during the block; it is raised when the block has completed."""
    was, seen = _State.deferring, len(_State.received)
    _State.deferring = True
    try:
        yield
    finally:
        _State.deferring = was
    if not was and len(_State.received) > seen:
        raise Interrupted(_State.received[seen])
