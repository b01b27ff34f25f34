"""The one loop over calibration batches: the exact/diagonal Hessian, the Fisher and the mean loss all run here.

A caller gives the loop its running sums (zeros of the right shape and dtype: the curvature's float64 tensors,
the loss's Python float, counts as ints) and a per-batch `step` that adds one batch's contribution to them
through `Sums`. When every batch is done, each total passes once through `across_processes`, the single point
where per-batch results meet; only then do callers divide by the (reduced) counts. Sums are added in batch order,
in place, so the results are those of a plain sequential loop, bit for bit.

Data-parallel (torchrun; distributed.py owns the process group) changes two things, both here:
* sharding — `this_process` yields only this rank's batches (batch i on rank i mod world size); indices stay
  global, so error messages name the user's batch;
* training (training/loop.py) steps through the same rule: step s takes position s·W + rank of the endless cycle
  over the batches (`step_batches`), so across the ranks a step covers W consecutive positions, each on the
  rank that `this_process` gives it, and `mean_across_processes` averages the step's loss and gradients;
* the all-reduce — `across_processes` sums each total over the ranks (a Python number travels as a
  float64/int64 tensor). It is called for every quantity in the order the caller created them, the same on
  every rank, as collective calls must be.
Counts (batches, samples) are totals like any other, so the means come out over all ranks' batches, and the
"no batches" checks after the reduce see the global count (a rank with an empty shard is fine). Before the
reduce the ranks exchange their outcome: a batch that failed on one rank makes every rank raise its message
instead of waiting in the all-reduce for a rank that will never arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from sublora_cli.model import distributed

Total = torch.Tensor | float | int
Progress = Callable[[str, int, int], None]
Reduce = Callable[[str, Total], Total]


def this_process(batches: Iterable) -> Iterator[tuple[int, object]]:
    """The (index, batch) pairs this process computes: all of them while there is one process."""
    return distributed.shard(enumerate(batches))


def across_processes(name: str, total: Total) -> Total:
    """One quantity's total over all processes: the identity while there is one process."""
    return distributed.all_reduce_sum(total)


def step_batches(batches: Sequence, steps: int) -> Iterator[tuple[int, int, object]]:
    """(step, batch index, batch) of this process for `steps` training steps: position s·W + rank of the cycle
    over the batches, the position that `this_process` would give this rank."""
    world, rank = distributed.world_size(), distributed.rank()
    for step in range(steps):
        index = (step * world + rank) % len(batches)
        yield step, index, batches[index]


def mean_across_processes(value: float, tensors: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """A training step's loss and gradients averaged over the processes (one batch each): the identity alone."""
    world = distributed.world_size()
    if world == 1:
        return value, tensors
    return float(distributed.all_reduce_sum(value)) / world, [distributed.all_reduce_sum(t) / world for t in tensors]


class Sums:
    """Running totals by name, added to in place (a tensor total keeps its dtype, device and storage)."""

    def __init__(self, **zeros: Total):
        self.totals: dict[str, Total] = dict(zeros)

    def add(self, name: str, value: Total, at: slice | None = None) -> None:
        """totals[name] += value (only the rows `at` of a tensor total, when given)."""
        total = self.totals[name]
        if isinstance(total, torch.Tensor):
            if at is None:
                total += value
            else:
                total[at] += value
        else:
            self.totals[name] = total + value

    def add_gram(self, name: str, rows: torch.Tensor) -> None:
        """totals[name] += rowsᵀ rows, in place (no second R×R matrix)."""
        self.totals[name].addmm_(rows.T, rows)


class Meter:
    """Progress in units of work: `work_per_batch` per batch; a step may report finer steps with `advance`."""

    def __init__(self, progress: Progress | None, stage: str, total: int):
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0

    def advance(self, units: int) -> None:
        self.done += units
        self.report()

    def reach(self, done: int) -> None:
        """Advance to `done` units unless the step already reported that far."""
        if self.done < done:
            self.advance(done - self.done)

    def report(self) -> None:
        if self.progress:
            self.progress(self.stage, self.done, self.total)


Step = Callable[[int, object, Sums, Meter], None]


def over_batches(
    batches: Iterable,
    step: Step,
    sums: Sums,
    *,
    progress: Progress | None = None,
    stage: str = "curvature",
    work_per_batch: int = 1,
    reduce: Reduce | None = None,
) -> dict[str, Total]:
    """Run step(index, batch, sums, meter) on every batch of this process, then return every total passed once
    through `reduce` (default: `across_processes`, looked up at call time).

    If any process's batches failed, every process raises (this one its own error, the others its message).
    Progress (when asked for) counts this process's batches × work_per_batch from 0 and reaches the end of each
    batch's share after its step, whether or not the step reported finer progress through the meter.
    """
    reduce = reduce or across_processes
    mine = list(this_process(batches))
    meter = Meter(progress, stage, len(mine) * work_per_batch)
    meter.report()
    with distributed.agreeing():
        for position, (index, batch) in enumerate(mine):
            step(index, batch, sums, meter)
            meter.reach((position + 1) * work_per_batch)
    return {name: reduce(name, total) for name, total in sums.totals.items()}


__all__ = [
    "Meter",
    "Sums",
    "across_processes",
    "mean_across_processes",
    "over_batches",
    "step_batches",
    "this_process",
]
