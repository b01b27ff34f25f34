"""`sublora eval`: the stages read → SVD form → calibrate, and the figures measured before anything is pruned."""

from __future__ import annotations

from pathlib import Path

from sublora_cli.commands.options import EvalOptions
from sublora_cli.pipeline.calibrate import calibration, measure_before
from sublora_cli.pipeline.read import load_adapter
from sublora_cli.pipeline.spectra import adapter_spectra
from sublora_cli.pipeline.timings import Progress, Timings


def evaluate_adapter(adapter_path: Path, options: EvalOptions, progress: Progress | None = None) -> dict:
    """`sublora eval`: the calibration loss and evaluate() metrics of an adapter as it is."""
    timings = Timings()
    adapter = load_adapter(adapter_path, timings)
    with calibration(options, adapter, adapter_spectra(adapter), timings, progress) as calibrated:
        loss, metrics = measure_before(calibrated, timings)
        return {
            "adapter": str(adapter_path),
            "calib": str(options.calib),
            "total_rank": adapter.total_rank,
            "batches": len(calibrated.batches),
            "loss": loss,
            "metrics": metrics,
        }

