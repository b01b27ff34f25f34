"""Stages 6–7, refit and measure: a kept set turned into the modules as they will be written (σ refit when that
lowers the measured loss), measured on the factors exactly as stored, and the report's loss block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sublora_cli.core.methods import CURVATURES
from sublora_cli.core.refit import RefitResult, psd_part, refit, written_spectrum
from sublora_cli.core.svd import Spectrum
from sublora_cli.formats import Adapter, PrunedModule
from sublora_cli.model.calibrated import Calibrated
from sublora_cli.model.curvature import Curvature
from sublora_cli.pipeline.choose import pruned_modules
from sublora_cli.pipeline.spectra import stored_spectra
from sublora_cli.pipeline.timings import Timings


def refit_modules(
    adapter: Adapter, spectra: list[Spectrum], sigma: torch.Tensor, kept_mask: torch.Tensor
) -> list[PrunedModule]:
    """The kept components of every module with the σ values of `sigma` (refit), in the form the writer stores
    (`written_spectrum`); every module is marked refit, so even one that keeps everything is rewritten."""
    result = []
    offset = 0
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        part = slice(offset, offset + module.rank)
        offset += module.rank
        kept = torch.nonzero(kept_mask[part]).flatten().tolist()
        result.append(PrunedModule(module, kept, written_spectrum(spectrum, sigma[part], kept), refit=True))
    return result


def measure_written(
    calibrated: Calibrated, adapter: Adapter, pruned: list[PrunedModule], evaluate: bool = True
) -> tuple[float, dict[str, float] | None]:
    """Loss and metrics of the adapter as it will be written (the kept factors rounded to the storage dtype), so
    that `prune` and `sweep` report the same figures for the same kept set."""
    written = stored_spectra(adapter, pruned)
    return calibrated.loss_of(written), calibrated.metrics_of(written) if evaluate else None


@dataclass(frozen=True)
class Written:
    """A kept set as it is written: its modules, the measured loss with the kept σ as trained
    (`loss_after_selection`) and as written (`loss_after`: after the refit when one was accepted), the written
    adapter's metrics, and the refit's record (None when the refit did not run)."""

    pruned: list[PrunedModule]
    loss_after_selection: float
    loss_after: float
    metrics: dict[str, float] | None
    refit: RefitResult | None


Finish = Callable[[torch.Tensor], Written]  # kept mask → the adapter as written, measured


def refit_inputs(curvature: Curvature) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, PSD curvature) the refit steps with. The Fisher is PSD and, as in selection, comes without g
    (next to F the true g is on the wrong scale: curvature.selection_inputs); the exact Hessian (or its
    diagonal) is clipped to its PSD part once here, so a sweep's many refits share one eigendecomposition."""
    if CURVATURES[curvature.kind].drops_gradient:
        return torch.zeros_like(curvature.gradient), curvature.hessian
    matrix = curvature.hessian if curvature.hessian is not None else torch.diag(curvature.hessian_diag)
    return curvature.gradient, psd_part(matrix)


def written_outcome(
    calibrated: Calibrated,
    adapter: Adapter,
    spectra: list[Spectrum],
    curvature: Curvature | None,
    refit_kept: bool,
    evaluate: bool = True,
) -> Finish:
    """Measure a kept set as written, first refitting its σ when `refit_kept`, a curvature is there and something
    was pruned (the refit compensates a cut; it is not further training). Every loss the refit compares is
    `measure_written`'s, the loss of the file, so `loss_after` is what users load."""
    sigma = torch.cat([s.sigma for s in spectra])
    inputs = refit_inputs(curvature) if refit_kept and curvature is not None else None

    def loss_with(candidate: torch.Tensor, kept: torch.Tensor) -> float:
        return measure_written(calibrated, adapter, refit_modules(adapter, spectra, candidate, kept), False)[0]

    def finish(kept: torch.Tensor) -> Written:
        pruned = pruned_modules(adapter, spectra, kept)
        selected = measure_written(calibrated, adapter, pruned, evaluate=False)[0]
        result = None
        if inputs is not None and not bool(kept.all()):  # nothing pruned: the adapter is written unchanged
            gradient, matrix = inputs
            movable = kept & (sigma != 0)  # a kept σ = 0 stays 0: its directions are arbitrary
            result = refit(sigma, movable, gradient, matrix, lambda c: loss_with(c, kept), selected, psd=True)
            if result.accepted:
                pruned = refit_modules(adapter, spectra, result.sigma, kept)
        metrics = calibrated.metrics_of(stored_spectra(adapter, pruned)) if evaluate else None
        after = result.loss_after_refit if result is not None else selected
        return Written(pruned, selected, after, metrics, result)

    return finish


def selected_loss(calibrated: Calibrated, adapter: Adapter, spectra: list[Spectrum]) -> Callable[[torch.Tensor], float]:
    """The measured loss of a kept set as written, σ as trained: what `--budget auto` bisects on (a refit after
    the search only lowers it, so the chosen budget stays within the tolerance)."""
    return lambda kept: measure_written(calibrated, adapter, pruned_modules(adapter, spectra, kept), False)[0]


def time_refit(timings: Timings, result: RefitResult | None) -> None:
    """Move the refit's own time (its measured candidates) from the measuring stage to a `refit` stage."""
    if result is not None:
        timings["eval"] -= result.seconds
        timings["refit"] = timings.get("refit", 0.0) + result.seconds


def refit_record(result: RefitResult | None) -> dict | None:
    """The report's `refit` block (None when the refit did not run); its wall time is `timings.refit`, so that
    two runs' reports differ only in their timings."""
    if result is None:
        return None
    return {
        "accepted": result.accepted,
        "damping": result.damping,
        "step": result.step,
        "predicted_change": result.predicted_change,
        "measured_change": result.measured_change,
        "evaluations": result.evaluations,
    }


def loss_summary(before: float, after: float, predicted: float | None, curvature: Curvature | None) -> dict:
    """Loss before/after with the measured and predicted increases (relative to |before|, 0 → inf-safe); the
    prediction is labelled with the curvature its model used (None when the method has no model of the loss)."""
    increase = after - before
    relative = increase / abs(before) if before != 0 else (0.0 if increase == 0 else float("inf"))
    return {
        "before": before,
        "after": after,
        "predicted_increase": predicted,
        "predicted_with": curvature.kind if predicted is not None and curvature is not None else None,
        "increase": increase,
        "relative_increase": relative,
    }


def worse_than_nothing(loss: dict) -> list[str]:
    """A warning when the pruned adapter's measured loss is above the base model's without any adapter."""
    if loss["without_adapter"] is None or not loss["after"] > loss["without_adapter"]:
        return []
    return [
        f"the pruned adapter is worse than no adapter at all: loss {loss['after']:.6g} after pruning, "
        f"{loss['without_adapter']:.6g} with the adapter removed (every σ = 0). Raise --budget."
    ]

