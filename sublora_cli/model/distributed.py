"""Data-parallel runs under torchrun: the process group, which batches this rank computes, the all-reduce of the
batch loop's totals, and how the ranks agree on failure and on the exit code.

`torchrun --nproc-per-node N -m sublora_cli prune ...` starts N copies of the tool. Each loads the adapter, the
model and every batch, computes the loss/gradient/curvature sums over its share of the batches (batch i goes to
rank i mod N) and the batch loop adds the shares with one all-reduce per quantity (batchloop.py). Every rank
then holds the same totals, so the (deterministic) selection gives the same kept set everywhere and the loss
after pruning is again a sharded loop; only rank 0 prints and writes.

A collective waits for every rank, so a rank that fails alone would leave the others waiting. The guards:
* every stage that may fail on one rank alone runs `agreeing`: at its end the ranks exchange their outcome
  (`first_failure`) and if any failed every rank raises that rank's message (reported once, by rank 0; all exit
  1). The batch loop, opening the calibration (the script's import, load_model(), batches()) and train_batches()
  do; the batches each rank loaded are then compared (`check_same`), since a script that shards by rank itself
  would give every rank a different loss;
* at exit the ranks exchange their exit codes and messages the same way (`agreed_exit`), so a failure elsewhere
  (rank 0's write, a quality gate) also ends every rank with the same code; a rank that learnt of a failure from
  a stage's exchange skips this one (the failed rank is already past it);
* every collective times out after SUBLORA_DIST_TIMEOUT seconds (default 600), and a peer that died or timed out
  is reported as such (`_collective`), not as the backend's bare error.

The process group starts only when torchrun set WORLD_SIZE > 1; a plain `sublora` run never imports a backend.
Backends: gloo for tensors on the CPU and, when CUDA is available, nccl for tensors on the GPU (one group serves
both, "cpu:gloo,cuda:nccl"), each rank on cuda:LOCAL_RANK.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from sublora_cli.errors import SubloraError

DEFAULT_TIMEOUT_S = 600.0


def launched() -> bool:
    """True when torchrun (or any launcher setting WORLD_SIZE) started more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise SubloraError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes.") from None


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints and writes (rank 0, or the only process)."""
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without one), known before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def check_environment() -> None:
    """Check what the launcher's environment configures before the process group is created (every rank checks;
    the caller lets rank 0 say it)."""
    if launched():
        timeout_seconds()


def timeout_seconds() -> float:
    value = os.environ.get("SUBLORA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise SubloraError(f"SUBLORA_DIST_TIMEOUT={value!r}: must be a number of seconds.") from None
    if not 0 < seconds < math.inf:
        raise SubloraError(f"SUBLORA_DIST_TIMEOUT={value!r}: must be a positive, finite number of seconds.")
    return seconds


def backend_name() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group() -> Iterator[None]:
    """The torchrun process group for the duration, when launched by torchrun; nothing otherwise."""
    if not launched() or active():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend_name(), timeout=timedelta(seconds=timeout_seconds()))
    try:
        yield
    finally:
        dist.destroy_process_group()


def describe() -> dict:
    """The report's `distributed` field."""
    return {"world_size": world_size(), "backend": dist.get_backend() if active() else None}


def shard(indexed: Iterator[tuple[int, object]]) -> Iterator[tuple[int, object]]:
    """This rank's (index, batch) pairs: batch i goes to rank i mod world size (all of them in one process)."""
    if not active():
        return indexed
    me, size = rank(), world_size()
    return ((i, batch) for i, batch in indexed if i % size == me)


def all_reduce_sum(total: torch.Tensor | float | int) -> torch.Tensor | float | int:
    """The sum of `total` over the ranks (the total itself in one process); a Python number stays one."""
    if not active():
        return total
    if isinstance(total, torch.Tensor):
        _collective(dist.all_reduce, total)
        return total
    dtype = torch.float64 if isinstance(total, float) else torch.int64
    carrier = torch.tensor(total, dtype=dtype, device=_number_device())
    _collective(dist.all_reduce, carrier)
    return carrier.item()


def _collective(operation: Callable, *args: object) -> None:
    """Run one collective; a peer that died or stopped answering becomes an input-level error that says so (the
    backend's own words, "Connection closed by peer" or a timeout, kept at the end)."""
    try:
        operation(*args)
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            what = f"did not answer within SUBLORA_DIST_TIMEOUT ({timeout_seconds():g} s)"
        else:
            what = "died or closed its connection"
        raise SubloraError(
            f"Another process of the torchrun job {what}, so this one stops too (exit 1); that process's own output "
            f"says why (killed, out of memory). Backend: {e}"
        ) from e


def _number_device() -> torch.device:
    """Where a Python number travels: the CPU unless the only backend is nccl (GPU tensors only)."""
    return torch.device("cpu") if "gloo" in dist.get_backend() else torch.device("cuda")


class _Exchange:
    peer_exited = False  # a rank sent its exit to a stage's exchange: it takes no part in `agreed_exit`


def first_failure(message: str | None) -> str | None:
    """Exchange this rank's failure (None: it succeeded) with every rank; the lowest failing rank's message, or
    None when all succeeded. Every rank must call it at the same point."""
    if not active():
        return message
    outcomes: list[object] = [None] * world_size()
    _collective(dist.all_gather_object, outcomes, message)
    _Exchange.peer_exited = _Exchange.peer_exited or any(isinstance(o, tuple) for o in outcomes)
    return next((m for m in map(_failure_message, outcomes) if m is not None), None)


@contextmanager
def agreeing() -> Iterator[None]:
    """Run a stage that may fail on one rank alone (a batch, load_model(), train_batches()): at its end the ranks
    exchange their outcome, and if any failed every rank raises that rank's message, instead of the others
    waiting in their next collective for a rank that left. Every rank must enter it at the same point."""
    try:
        yield
    except Exception as error:
        first_failure(str(error) or type(error).__name__)
        raise
    failure = first_failure(None)
    if failure is not None:
        raise SubloraError(failure)


def check_same(what: str, summary: object, advice: str) -> None:
    """Refuse to go on unless every rank computed the same `summary` of something they must share (the batches
    each rank loaded); the error lists what each rank had. Every rank must call it at the same point."""
    if not active():
        return
    summaries: list[object] = [None] * world_size()
    _collective(dist.all_gather_object, summaries, summary)
    if any(other != summaries[0] for other in summaries):
        each = "; ".join(f"rank {r}: {s}" for r, s in enumerate(summaries))
        raise SubloraError(f"The torchrun processes disagree on {what} ({each}). {advice}")


def agreed_exit(code: int, message: str | None) -> tuple[int, str | None]:
    """The exit code (the highest) and message (the lowest failing rank's) every rank ends with.

    A rank that already left (it failed where the others were not listening) makes the exchange fail or time
    out; then this rank keeps its own code, or 1 if it had succeeded, since the run as a whole did not.
    """
    if not active():
        return code, message
    if _Exchange.peer_exited:  # that rank is past this exchange, waiting in `finish`
        return code or 1, message
    outcomes: list[object] = [None] * world_size()
    try:
        dist.all_gather_object(outcomes, (code, message))
    except Exception:  # noqa: BLE001 - a broken group is an outcome here, not an error to report twice
        return code or 1, message or "another rank of the torchrun job failed without reporting why"
    codes = [o[0] if isinstance(o, tuple) else (0 if o is None else 1) for o in outcomes]
    failed = next((m for m in map(_failure_message, outcomes) if m is not None), None)
    return max(code, *codes), message if message is not None else failed


def _failure_message(outcome: object) -> str | None:
    """The failure in one rank's contribution to an exchange. A rank that failed outside the batch loop sends
    its exit (code, message) while the others exchange batch-loop outcomes (a message or None) at the same
    point: either form is read here, so the failure is seen whichever exchange receives it."""
    if isinstance(outcome, tuple):
        code, message = outcome
        return None if code == 0 else message or f"a rank exited with code {code}"
    return outcome if isinstance(outcome, str) else None


def finish() -> None:
    """Wait until rank 0 has printed the outcome before any rank exits (torchrun ends the whole job when one
    rank exits with an error, which could cut rank 0 off mid-message); a broken group has nothing to wait for."""
    if not active():
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - the group is already broken: every rank is leaving anyway
        pass


__all__ = [
    "agreed_exit",
    "agreeing",
    "check_same",
    "all_reduce_sum",
    "describe",
    "finish",
    "first_failure",
    "is_main",
    "launched",
    "process_group",
    "rank",
    "shard",
    "world_size",
]
