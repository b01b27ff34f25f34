"""Atomic output directories: a crash never leaves a half-written adapter, and the input is never touched."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sublora_cli.errors import SubloraError
from sublora_cli.model import distributed


def check_output_dir(out_dir: Path, input_path: Path, overwrite: bool) -> None:
    """Refuse unusable output paths before any work is done.

    --out is replaced as a whole, so it must neither be nor contain the input or the working directory
    (compared after resolving `..` and symlinks), and its parent must be writable: finding out after the
    computation would waste it.
    """
    out, src, cwd = out_dir.resolve(), input_path.resolve(), Path.cwd().resolve()
    if out == src or src in out.parents:
        raise SubloraError(f"--out {out_dir} is the input adapter or inside it; sublora never modifies its input.")
    if out in src.parents:
        raise SubloraError(
            f"--out {out_dir} contains the input adapter {input_path}; sublora replaces --out as a whole, "
            "which would delete the input. Choose a directory outside it."
        )
    if out == cwd or out in cwd.parents:
        raise SubloraError(
            f"--out {out_dir} is the working directory or one of its ancestors; sublora replaces --out as a "
            "whole. Choose a new or dedicated directory."
        )
    if out.exists() and not out.is_dir():
        raise SubloraError(f"--out {out_dir} exists and is a file.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SubloraError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it.")
    _check_creatable(out_dir, out)


def _check_creatable(out_dir: Path, out: Path) -> None:
    """The directory that will receive --out (or the nearest existing one above it) must be a writable directory."""
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SubloraError(f"--out {out_dir} cannot be created: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SubloraError(f"--out {out_dir} cannot be created: no write permission in {existing}.")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal still counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete `.<out>.tmp-PID` / `.<out>.old-PID` directories that a killed run left beside out_dir.

    Only those whose PID no longer runs: a live one may be another sublora writing the same --out.
    """
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:tmp|old)-(\d+)")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces out_dir in (nearly) one rename.

    The path written is the resolved one, the same that check_output_dir checked. Under torchrun every rank holds
    the same result and only rank 0 writes: the others get a scratch folder that is thrown away, so no pipeline can
    forget the rule.
    """
    if not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix="sublora-rank-") as scratch:
            yield Path(scratch)
        return
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed (plots are the
    optional `plots` extra; without it the plot is skipped with a warning)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
