"""`python -m sublora_cli` and the `sublora` command. Signals are caught before the slow imports (torch), so a
Ctrl-C in the first seconds ends with one line and exit 130 too (interrupts.py)."""

import os
import signal
import sys

from sublora_cli import interrupts


def main() -> None:
    interrupts.install()
    try:
        from sublora_cli.cli.app import main as run
    except BaseException:  # an interrupted import may surface as anything (an ImportError of a half-loaded module)
        if interrupts.received() is None:
            raise
        _stop(interrupts.received())
    if interrupts.received() is not None:  # a library swallowed the interrupt and finished importing
        _stop(interrupts.received())
    run()


def _stop(signum: int) -> None:
    """One line and 128 + the signal's number; os._exit skips the exit hooks of half-imported modules."""
    sys.stderr.write(f"error: interrupted ({signal.Signals(signum).name}) while starting; nothing was written.\n")
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    main()
