"""Atomic output directories: a crash never leaves a half-written adapter, and the input is never touched."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sublora_cli.errors import SubloraError


def check_output_dir(out_dir: Path, input_path: Path, overwrite: bool) -> None:
    """Refuse unusable output paths before any work is done."""
    out, src = out_dir.resolve(), input_path.resolve()
    if out == src or src in out.parents:
        raise SubloraError(f"--out {out_dir} is the input adapter or inside it; sublora never modifies its input.")
    if out.exists() and not out.is_dir():
        raise SubloraError(f"--out {out_dir} exists and is a file.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SubloraError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it.")


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces out_dir in (nearly) one rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
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
