"""Stage 3, calibrate: the user's script opened on the adapter in SVD form, and the figures measured before
anything is pruned (loss, evaluate() metrics, the loss without the adapter)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

from sublora_cli.core.svd import Spectrum
from sublora_cli.formats import Adapter
from sublora_cli.model import distributed
from sublora_cli.model.calibrated import Calibrated, check_batches_alike, open_calibration
from sublora_cli.pipeline.timings import Progress, Timings


class CalibrationSettings(Protocol):
    """The settings every calibrated command shares (how the calibration script's model is run)."""

    calib: Path | None
    device: str
    dtype: str
    max_batches: int
    holdout: str | float  # model/holdout.py: auto or a fraction of batches()


@contextmanager
def calibration(
    settings: CalibrationSettings,
    adapter: Adapter,
    spectra: list[Spectrum],
    timings: Timings,
    progress: Progress | None,
) -> Iterator[Calibrated]:
    """The calibration script's model with the adapter in SVD form, closed (its hooks removed) however we leave."""
    with timings.stage("calibrate"):
        calibrated = open_calibration(
            settings.calib, adapter, spectra, settings.device, settings.dtype, settings.max_batches, progress,
            settings.holdout,
        )  # fmt: skip
    try:
        yield calibrated
    finally:
        calibrated.close()


def measure_before(calibrated: Calibrated, timings: Timings, evaluate: bool = True) -> tuple[float, dict | None]:
    with timings.stage("eval"):
        return calibrated.loss(), calibrated.metrics() if evaluate else None


def heldout_before(calibrated: Calibrated, timings: Timings) -> float | None:
    """The held-out loss of the adapter as it is (None without held-out batches)."""
    with timings.stage("eval"):
        return calibrated.heldout_loss()


def without_adapter(calibrated: Calibrated, timings: Timings) -> float:
    """The calibration loss with every σ = 0 (the base model alone): what deleting the adapter would give."""
    with timings.stage("eval"):
        return calibrated.loss(torch.zeros(calibrated.sigma_model.size, dtype=torch.bool))


def train_batches(calibrated: Calibrated, max_batches: int, progress: Progress | None) -> list:
    """What the rounds train on: train_batches() when the script defines it, else the calibration batches."""
    with distributed.agreeing():  # under torchrun: a failure on one process fails them all, at once
        batches = calibrated.script.call_train_batches(max_batches, progress)
    if batches is None:
        return calibrated.batches
    check_batches_alike("train_batches", batches)
    return batches

