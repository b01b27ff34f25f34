"""Atomic output directories: a crash never leaves a half-written adapter, and the input is never touched."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from sublora_cli import interrupts
from sublora_cli.errors import SubloraError
from sublora_cli.model import distributed


def check_output_dir(
    out_dir: Path, input_path: Path, overwrite: bool, reads: dict[str, Path | None] | None = None
) -> None:
    """Refuse unusable output paths before any work is done.

    --out is replaced as a whole, so it must neither be nor contain the input, another file the run reads
    (`reads`: the calibration script, the --config file; by description) or the working directory, nor lie inside
    the input (compared after resolving `..` and symlinks, and for a path that is a symlink also as the link
    itself). --out itself must not be a symlink: replacing it would replace the contents of the directory it
    points to, which the user may not have meant; the target can be given instead. Its parent must be writable:
    finding out after the computation would waste it.
    """
    out, cwd = _resolved(out_dir, "--out"), Path.cwd().resolve()
    src = _resolved(input_path, "the input adapter")
    if out == src or src in out.parents:
        raise SubloraError(f"--out {out_dir} is the input adapter or inside it; sublora never modifies its input.")
    for what, path in {"the input adapter": input_path, **(reads or {})}.items():
        if path is not None and any(out == p or out in p.parents for p in _spellings(path, what)):
            raise SubloraError(
                f"--out {out_dir} is or contains {what} {path}; sublora replaces --out as a whole, which would "
                "delete it. Choose a directory outside it."
            )
    if out == cwd or out in cwd.parents:
        raise SubloraError(
            f"--out {out_dir} is the working directory or one of its ancestors; sublora replaces --out as a "
            "whole. Choose a new or dedicated directory."
        )
    if out_dir.is_symlink():
        raise SubloraError(
            f"--out {out_dir} is a symbolic link (to {os.readlink(out_dir)}); sublora replaces --out as a whole and "
            f"does not follow a link to replace what it points to. Give the target directory itself (--out {out}) "
            "or another path."
        )
    if out.exists() and not out.is_dir():
        raise SubloraError(f"--out {out_dir} exists and is a file.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SubloraError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it.")
    _check_creatable(out_dir, out)


def _resolved(path: Path, what: str) -> Path:
    """`path` with `..` and symlinks resolved; a symlink loop is an input error naming the path."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError("Symlink loop from …")
        raise SubloraError(
            f"{what} {path} cannot be resolved ({e}): is it a symbolic link that points to itself? Give another path."
        ) from None


def _spellings(path: Path, what: str) -> set[Path]:
    """The places deleting --out could remove `path` from: where it resolves to and, when it is a symlink, the
    link itself (in its resolved directory)."""
    return {_resolved(path, what), _resolved(path.parent, what) / path.name}


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


class _Locks:
    held: dict[Path, int] = {}  # resolved --out → the open lock file's descriptor
    written: list[Path] = []  # every --out this process replaced completely


def _lock_path(out: Path) -> Path:
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"sublora-{digest}.lock"


def lock_output_dir(out_dir: Path) -> None:
    """Claim --out for this process until it has been written (`atomic_output_dir`) or `release_locks` runs.

    A second run into the same --out while one is working is refused at once (not queued: the first run's output
    would make the second's `--out is not empty` check wrong). The lock is an flock on a file in the temporary
    directory named after the resolved path, so the kernel releases it when a process dies however it dies, and
    nothing is created beside --out.
    """
    out = out_dir.resolve()
    if out in _Locks.held:
        return
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SubloraError(
                f"--out {out_dir} is being written by another sublora run (process {holder}); wait for it to finish "
                "or choose another --out."
            ) from None
        if _same_file(fd, path):  # not a file the previous holder unlinked while we waited to lock it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _Locks.held[out] = fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _unlock(out: Path) -> None:
    fd = _Locks.held.pop(out, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(out))
        os.close(fd)


def release_locks() -> None:
    """Release every --out this process still holds (a run that failed before writing)."""
    for out in list(_Locks.held):
        _unlock(out)


def completed_writes() -> list[Path]:
    """The --out directories replaced completely since `forget_writes` (what an interrupt message says was written)."""
    return list(_Locks.written)


def forget_writes() -> None:
    """Start a new command's record of completed writes (one process may run several, e.g. in tests)."""
    _Locks.written.clear()


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces out_dir in two renames, run with signals
    deferred so that neither Ctrl-C nor SIGTERM lands between them.

    The path written is the resolved one, the same that check_output_dir checked. Whatever stops the write (an
    error, a full disk, a signal) removes the temporary and leaves a previous --out as it was; a failure of the
    file system becomes an input error that says so. Under torchrun every rank holds the same result and only
    rank 0 writes: the others get a scratch folder that is thrown away, so no pipeline can forget the rule.
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
        try:
            yield tmp
        except (OSError, SafetensorError) as e:
            raise SubloraError(f"Writing --out {out_dir} failed: {_reason(e)}. {_untouched(out_dir)}") from e
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        with interrupts.deferred():
            _replace(out_dir, tmp, old)
            _Locks.written.append(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(out_dir)


def _replace(out_dir: Path, tmp: Path, old: Path) -> None:
    """out_dir ← tmp; the previous out_dir is moved aside first and deleted after, or put back if the second
    rename fails."""
    try:
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists():
                os.replace(old, out_dir)
            raise
    except OSError as e:
        raise SubloraError(f"Replacing --out {out_dir} failed: {_reason(e)}. {_untouched(out_dir)}") from e
    shutil.rmtree(old, ignore_errors=True)


def _reason(error: Exception) -> str:
    """An OSError's reason without the temporary path it names; a safetensors error as it reads."""
    if isinstance(error, OSError) and error.strerror:
        if error.errno == errno.ENOSPC:
            return "the disk is full (No space left on device)"
        return error.strerror
    return str(error)


def _untouched(out_dir: Path) -> str:
    if out_dir.exists():
        return f"The previous output in {out_dir} is intact; nothing else was changed."
    return "Nothing was written."


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
