"""Alternating SubLoRA, the paper's Algorithm 4: `--rounds` rounds of training without the rank constraint
(training/loop.py) followed by a prune to the budget (curvature recomputed, selection, refit: the pipeline's
`decide` stage), so the kept components re-learn what the pruned ones carried.

Each round starts from the previous round's written adapter, with the pruned components re-initialised; the
last round's prune is the result the pipeline writes, or with held-out data the round whose written adapter has
the lowest held-out loss (early stopping: more rounds fit the training batches further, not the task). The
`rounds` list of the report and training.png come from here: the training loss of every step, and per round the
measured calibration loss after training, after selection and as written (after the refit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sublora_cli.core.svd import Spectrum
from sublora_cli.errors import SubloraError
from sublora_cli.formats import Adapter
from sublora_cli.pipeline.decide import Decision, Plan, Run, decide, with_metrics
from sublora_cli.pipeline.heldout import lowest_heldout
from sublora_cli.pipeline.output import pyplot
from sublora_cli.pipeline.spectra import adapter_spectra
from sublora_cli.pipeline.timings import Info, duration
from sublora_cli.training.loop import TrainSettings, after_prune, as_adapter, initial_state, master_dtype, train


@dataclass(frozen=True)
class RoundRecord:
    """One round as the report's `rounds` list shows it; every loss is the measured mean calibration loss."""

    round: int
    steps: int
    training_loss_first: float  # mean training loss over the round's first tenth (whole passes over the batches)
    training_loss_last: float  # and over its last tenth: below the first when the round converges
    loss_after_training: float  # the trained adapter in its storage dtype, before the prune
    loss_after_selection: float  # the kept components with σ as trained
    loss_after: float  # as written after the prune (after the refit when it was accepted)
    predicted_increase: float | None  # the selection's model, from the trained adapter
    refit_accepted: bool | None  # None: no refit ran
    heldout_after: float | None  # the held-out loss as written (None without held-out batches)
    written: bool  # this round's prune is the one written: the last, or with held-out data the lowest on it
    rank: int  # total rank kept
    ranks: dict[str, int]  # kept rank per module
    seconds: float  # the whole round: training, curvature, selection, refit, measurements
    training_seconds: float


@dataclass(frozen=True)
class Alternated:
    """The outcome of the rounds: the written round's trained adapter and SVD form, its prune, and the history."""

    adapter: Adapter
    spectra: list[Spectrum]
    decision: Decision
    rounds: list[RoundRecord]
    losses: list[float]  # the training loss of every step, all rounds in order
    batches: int  # how many training batches a pass over the data takes
    training_free: float  # the loss, as written, of a prune of the input adapter to the same budget: the reference

    def report(self) -> list[dict]:
        return [asdict(r) for r in self.rounds]


def alternate(
    plan: Plan,
    run: Run,
    adapter: Adapter,
    spectra: list[Spectrum],
    settings: TrainSettings,
    rounds: int,
    batches: Sequence,
) -> Alternated:
    """`rounds` rounds of train → SVD form → decide (prune to the budget as `plan` says); the pruned components of
    a round are re-initialised for the next one (seeded by `settings.seed`, so runs repeat). `run.info` is told,
    early, how long the training will take (a huge --rounds or --train-steps typed by mistake shows at once) and,
    after the first round, how long all rounds will."""
    calibrated, timings, progress, info = run.calibrated, run.timings, run.progress, run.info
    model = calibrated.sigma_model
    generator = torch.Generator().manual_seed(settings.seed)
    state = initial_state(adapter, spectra, settings.train, master_dtype(model), model.device)
    records: list[RoundRecord] = []
    losses: list[float] = []
    plain = decide(plan, run, adapter, spectra, False).written  # what the rounds must beat
    outcomes: list[tuple[Adapter, list[Spectrum], Decision]] = []
    for k in range(1, rounds + 1):
        start = time.perf_counter()
        with timings.stage("train"):
            pace = _announce_training(rounds, settings.steps, info) if k == 1 else None
            state, round_losses = train(
                model, state, batches, settings, f"round {k}/{rounds}: training", progress, pace
            )
            trained = as_adapter(adapter, state)
            trained_spectra = adapter_spectra(trained)
            _check_representable(trained_spectra, model.dtype, k, settings)
            model.rebase(trained_spectra)
        training_seconds = time.perf_counter() - start
        with timings.stage("eval"):
            after_training = calibrated.loss()
        decision = decide(plan, run, trained, trained_spectra, evaluate=False)
        outcomes.append((trained, trained_spectra, decision))
        written = decision.written
        ranks = {p.module.name: p.rank_after for p in written.pruned}
        records.append(
            RoundRecord(
                round=k,
                steps=len(round_losses),
                training_loss_first=_mean(round_losses[: _tenth(len(round_losses), len(batches))]),
                training_loss_last=_mean(round_losses[-_tenth(len(round_losses), len(batches)) :]),
                loss_after_training=after_training,
                loss_after_selection=written.loss_after_selection,
                loss_after=written.loss_after,
                predicted_increase=decision.selection.predicted_increase,
                refit_accepted=written.refit.accepted if written.refit is not None else None,
                heldout_after=written.heldout_after,
                written=False,
                rank=sum(ranks.values()),
                ranks=ranks,
                seconds=time.perf_counter() - start,
                training_seconds=training_seconds,
            )
        )
        losses.extend(round_losses)
        if k == 1 and rounds > 1 and info is not None:
            info(f"round 1 took {duration(records[0].seconds)}: all {rounds:,} rounds about "
                 f"{duration(rounds * records[0].seconds)}")  # fmt: skip
        if k < rounds:
            state = after_prune(state, written.pruned, generator)
    chosen = lowest_heldout([r.heldout_after for r in records]) if calibrated.heldout else rounds - 1
    records[chosen] = replace(records[chosen], written=True)
    trained, trained_spectra, decision = outcomes[chosen]
    decision = replace(decision, written=with_metrics(run, trained, decision.written))
    return Alternated(trained, trained_spectra, decision, records, losses, len(batches), plain.loss_after)


def _announce_training(rounds: int, steps: int, info: Info | None) -> Callable[[float], None] | None:
    """What `train` calls with its pace: the training time of all rounds, said before it is spent."""
    if info is None:
        return None

    def pace(seconds_per_step: float) -> None:
        info(
            f"training: {rounds:,} round(s) × {steps:,} steps, about {duration(rounds * steps * seconds_per_step)} "
            f"({seconds_per_step * 1000:.3g} ms a step), plus a prune after each round"
        )

    return pace


def _check_representable(spectra: list[Spectrum], dtype: torch.dtype, k: int, settings: TrainSettings) -> None:
    """A trained adapter whose singular values overflow the model's dtype cannot be measured or used."""
    largest = max((float(s.sigma.max()) for s in spectra if s.rank), default=0.0)
    if not math.isfinite(largest) or not math.isfinite(float(torch.tensor(largest).to(dtype))):
        raise SubloraError(
            f"Training diverged in round {k}: the trained update's largest singular value ({largest:g}) overflows "
            f"{str(dtype).removeprefix('torch.')} (--optimizer {settings.optimizer}, --lr {settings.lr:g}). Lower "
            "--lr; nothing was written."
        )


def _tenth(steps: int, batches: int) -> int:
    """About a tenth of a round's steps, in whole passes over the batches (at least one, at most all steps), so
    that the first and last stretch average the same batches and compare like with like."""
    passes = max(1, steps // 10 // batches)
    return max(1, min(steps, passes * batches))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last `window` values at each step (an epoch's mean when `window` is the batch count)."""
    return [_mean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def plot_training(alternated: Alternated, loss_before: float, path: Path, title: str) -> bool:
    """training.png, the shape of the paper's Figure 4: the training loss of every step, a circle where each
    round's training ends (measured calibration loss) and a cross after its prune, against the input adapter's
    loss and the training-free prune's to the same budget (did the rounds beat it?); `title` names the budget.
    False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    steps = range(1, len(alternated.losses) + 1)
    ax.plot(steps, alternated.losses, lw=0.6, alpha=0.35, color="tab:blue", label="training loss (one batch)")
    window = max(1, min(alternated.batches, len(alternated.losses)))
    ax.plot(steps, _running_mean(alternated.losses, window), lw=1.4, color="tab:blue", label=f"mean of {window}")
    end = 0
    for r in alternated.rounds:
        end += r.steps
        ax.plot(end, r.loss_after_training, "o", color="tab:green", label="after training" if r.round == 1 else None)
        ax.plot(end, r.loss_after, "x", color="tab:red", ms=9, label="after pruning" if r.round == 1 else None)
        ax.axvline(end, color="grey", lw=0.5, alpha=0.5)
    ax.axhline(loss_before, ls="--", color="grey", label="input adapter")
    ax.axhline(alternated.training_free, ls=":", color="tab:red", label="training-free prune, same budget")
    references = [*alternated.losses, loss_before, alternated.training_free]
    if all(v > 0 for v in references):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)  # beside the axes: it never hides a curve
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
