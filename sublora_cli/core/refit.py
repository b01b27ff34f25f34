"""Compensation: after a cut, move the kept σ to absorb what the pruned ones carried (OBS on σ).

Pruning fixes δ_P = −σ_P. Under the model L(σ+δ) ≈ L + gᵀδ + ½δᵀHδ the best move of the kept set is

    δ_S = −(H_SS)⁻¹ (g_S − H_SP σ_P).

Two things make the raw formula unsafe, both measured on the shipped PINN samples:

* An indefinite H. Along an eigenvector with eigenvalue μ < 0 the model has no minimum, and the Newton step
  moves by −(gradient component)/μ, i.e. *uphill*, toward the model's saddle: the undamped step blew the loss
  up by 10⁵–10¹³ while the model predicted a decrease. So the step uses H̃, H with its negative eigenvalues
  clipped to 0 (the nearest PSD matrix in Frobenius norm): a negative-curvature direction is treated as flat,
  where the quadratic model is not trusted to say more than the slope. Taking |μ| instead (saddle-free Newton)
  would also go downhill, but would trust the size of a curvature the loss does not have near σ; clipping plus
  damping lets the measured loss decide the length along those directions.
* The model is local. Levenberg–Marquardt damping λ·I, λ relative to the mean diagonal of H̃_SS, bounds the
  step along flat directions (a gradient step of length 1/λ there) and shrinks it toward a gradient step; a
  short ladder of λ and a backtracking line search over step sizes are each checked on the *measured* loss.

The best measured candidate is accepted only if it beats the loss after selection, so the refit can never make
the measured loss worse. With the Fisher as curvature, pass the gradient the caller models with (zeros when it
drops g, as the selection does); the measured loss guards the step either way.

Refit σ may be negative: U diag(σ) Vᵀ is still the same update. The writer's balanced factors take √(σ/s), so a
negative value is written by flipping the sign of its U column and storing |σ| (`written_spectrum`): the
stored spectrum keeps σ ≥ 0 with orthonormal U, V, and the product is unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sublora_cli.core.svd import Spectrum

DAMPINGS: tuple[float, ...] = (1e-4, 1e-2, 1.0)  # λ / mean diag(H̃_SS), smallest (closest to Newton) first
STEPS: tuple[float, ...] = (1.0, 0.5, 0.25)
MAX_EVALUATIONS = 9


@dataclass(frozen=True)
class RefitResult:
    """The outcome of one refit. sigma is the full R-vector to write (pruned entries 0): the refit values when
    accepted, else σ masked to the kept set. Changes are relative to the loss after selection; predicted_change
    is the quadratic model's (on H̃) for the accepted candidate, or for the best measured one when none is
    accepted (None when no candidate was evaluated)."""

    sigma: torch.Tensor
    accepted: bool
    damping: float | None  # λ relative to mean diag(H̃_SS), of the candidate the changes refer to
    step: float | None
    predicted_change: float | None
    measured_change: float | None
    loss_before_refit: float
    loss_after_refit: float
    evaluations: int
    seconds: float


def psd_part(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest (Frobenius) positive semi-definite matrix: the symmetric part with its negative eigenvalues
    set to 0. One eigendecomposition, O(R³); compute it once and share it between selection and refit."""
    symmetric = 0.5 * (matrix + matrix.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    return (eigenvectors * eigenvalues.clamp(min=0)) @ eigenvectors.T


def relative_scale(matrix: torch.Tensor) -> float:
    """The scale damping is relative to: the mean diagonal of a PSD matrix (its mean eigenvalue)."""
    return float(matrix.diagonal().mean()) if matrix.numel() else 0.0


def refit_residual(sigma: torch.Tensor, kept: torch.Tensor, gradient: torch.Tensor, curvature: torch.Tensor):
    """r_S = g_S − H_SP σ_P: the model's gradient on the kept set at the point after selection."""
    pruned = torch.where(kept, torch.zeros_like(sigma), sigma)
    return gradient[kept] - (curvature[kept] @ pruned)


def refit_step(curvature_kept: torch.Tensor, residual: torch.Tensor, damping: float) -> torch.Tensor | None:
    """δ_S = −(H̃_SS + λ·scale·I)⁻¹ r_S by Cholesky; None if the damped matrix is not numerically PD."""
    scale = relative_scale(curvature_kept)
    damped = curvature_kept + (damping * scale) * torch.eye(
        residual.numel(), dtype=residual.dtype, device=residual.device
    )
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    return -torch.cholesky_solve(residual[:, None], factor)[:, 0]


def model_change(step: torch.Tensor, residual: torch.Tensor, curvature_kept: torch.Tensor) -> float:
    """The model's change of the loss from the point after selection when the kept σ move by `step`."""
    return float(step @ residual + 0.5 * step @ (curvature_kept @ step))


def refit(
    sigma: torch.Tensor,
    kept: torch.Tensor,
    gradient: torch.Tensor,
    curvature: torch.Tensor,
    measure: Callable[[torch.Tensor], float],
    loss_after_selection: float,
    *,
    psd: bool = False,
    dampings: Sequence[float] = DAMPINGS,
    steps: Sequence[float] = STEPS,
    max_evaluations: int = MAX_EVALUATIONS,
) -> RefitResult:
    """Refit the kept σ and keep the result only if the measured loss confirms it.

    sigma, gradient: (R,) float64 at the trained point; kept: (R,) bool; curvature: (R, R) exact Hessian or
    Fisher (clipped to its PSD part here unless `psd` says it already is); measure(σ) returns the measured
    calibration loss of a full σ vector (pruned entries 0) as it will be written; loss_after_selection is
    measure's value at σ masked to the kept set.

    For each damping (smallest first) the step sizes are tried longest first, backtracking until one beats the
    loss after selection (Armijo with zero slope); at most max_evaluations calls of measure in all.
    """
    start = time.perf_counter()
    kept = kept.to(device=sigma.device, dtype=torch.bool)
    selected = torch.where(kept, sigma, torch.zeros_like(sigma))
    best: dict | None = None  # the best measured candidate, accepted or not
    evaluations = 0
    if bool(kept.any()):
        tilde = curvature if psd else psd_part(curvature)
        curvature_kept = tilde[kept][:, kept]
        residual = refit_residual(sigma, kept, gradient, tilde)
        for damping in dampings:
            direction = refit_step(curvature_kept, residual, damping)
            for size in steps if direction is not None else ():
                if evaluations >= max_evaluations:
                    break
                candidate = selected.clone()
                candidate[kept] += size * direction
                loss = measure(candidate)
                evaluations += 1
                point = {
                    "loss": loss if math.isfinite(loss) else math.inf,
                    "sigma": candidate,
                    "damping": damping,
                    "step": size,
                    "predicted": model_change(size * direction, residual, curvature_kept),
                }
                if best is None or point["loss"] < best["loss"]:
                    best = point
                if point["loss"] < loss_after_selection:
                    break  # this damping's step is good enough; try the next damping
    accepted = best is not None and best["loss"] < loss_after_selection
    return RefitResult(
        sigma=best["sigma"] if accepted else selected,
        accepted=accepted,
        damping=best["damping"] if best else None,
        step=best["step"] if best else None,
        predicted_change=best["predicted"] if best else None,
        measured_change=best["loss"] - loss_after_selection if best else None,
        loss_before_refit=loss_after_selection,
        loss_after_refit=best["loss"] if accepted else loss_after_selection,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
    )


def written_spectrum(spectrum: Spectrum, sigma: torch.Tensor, kept: Sequence[int]) -> Spectrum:
    """The kept components of one module with refit values, in the canonical form the writer stores: σ ≥ 0 in
    descending order, a negative σ written as |σ| with its U column negated (same U diag(σ) Vᵀ, U and V stay
    orthonormal). Build the factors with balanced_factors(result, range(len(kept)), scale)."""
    index = torch.as_tensor(list(kept), dtype=torch.long)
    values = sigma[index].to(spectrum.sigma)
    signs = torch.where(values < 0, -1.0, 1.0).to(values)
    order = torch.argsort(values.abs(), descending=True, stable=True)
    return Spectrum(
        U=(spectrum.U[:, index] * signs)[:, order], sigma=values.abs()[order], V=spectrum.V[:, index][:, order]
    )
