"""What every stage shares: the per-stage clock of the report's `timings` and the two callbacks through which a
stage tells the user what it is doing (the CLI draws them; a library caller may pass None)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[str, int, int | None], None]  # (stage, done, total); total None: not known yet


Info = Callable[[str], None]  # one line of news for the user


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def duration(seconds: float) -> str:
    """A time estimate as a person reads it: 4.2 s, 12 min, 3.5 h, 2.1e+04 days."""
    if seconds < 60:
        return f"{max(seconds, 0.1):.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 86400 else f"{seconds / 86400:.3g} days"

