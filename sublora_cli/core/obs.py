"""`obs`: a selection that knows the kept σ will be refit (backward elimination, Optimal Brain Surgeon on σ).

Model, with A = H̃ + λI (H̃ the PSD part of the curvature, λ relative to its mean diagonal, so A is PD):
m(x) = gᵀ(x − σ) + ½ (x − σ)ᵀ A (x − σ), x the σ vector as written. Pruning P fixes x_P = 0 and the refit
chooses x_S; the best value is the compensated increase

    q̃(P) = min_{x_S} m(x) = −g_Pᵀσ_P + ½ σ_PᵀA_PPσ_P − ½ r_Sᵀ A_SS⁻¹ r_S,    r_S = g_S − A_SP σ_P.

Derivation of one elimination step. Let x* be the minimiser over x_S for the current kept set S (x*_P = 0).
On S, m is a quadratic with Hessian A_SS whose gradient vanishes at x*, so m(x) = m(x*) + ½ (x − x*)_Sᵀ
A_SS (x − x*)_S exactly — the gradient term g is absorbed into x*. Removing p adds the constraint x_p = 0;
by a Lagrange multiplier on e_pᵀ(x − x*) = −x*_p the cheapest move is (x − x*)_S = −(x*_p / B_pp) B e_p with
B = A_SS⁻¹, and it raises m by

    cost(p) = (x*_p)² / (2 B_pp).

At a stationary point (g = 0) and before any removal x* = σ, the classical σ_p² / (2 [H⁻¹]_pp); in general x*_p
is the current *compensated* value, which already includes the gradient's pull (at the full set
x* = σ − A⁻¹g, where m = −½ gᵀA⁻¹g: q̃ of the empty cut). After removing p, B loses row and column p by the
rank-1 downdate B ← B − B e_p e_pᵀ B / B_pp (the Schur complement of the inverse), and x* moves by the step
above, so each elimination costs O(|S|²) instead of a new O(|S|³) solve.

Stopping rule: remove while the kept set exceeds the budget (a count today; a cost budget changes only
`_exceeds`), or while a module is above its upper bound. A component is removable only while its module is
above its lower bound, and once the modules above their upper bound need every remaining removal, only they
are. Components with σ = 0 are removed before any other (a refit would give weight to arbitrary directions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sublora_cli.core.refit import psd_part, relative_scale

if TYPE_CHECKING:  # select.py runs obs as a search: a runtime import would be a cycle
    from sublora_cli.core.rank_bounds import RankBounds

DAMPING = 1e-4  # λ / mean diag(H̃); 1e-6 and 1e-2 did worse on the PINN samples (bench/refit.py)
COMPACT_BELOW = 64  # do not shrink the working inverse below this size


@dataclass(frozen=True)
class ObsSelection:
    """kept: (R,) bool; removed: indices in the order they were eliminated; predicted_increase: q̃ of the pruned
    set on A (relative to the trained loss, refit included); compensated: the minimiser x* (0 on the pruned
    set), the refit the model promises; seconds: wall time, the PSD projection included."""

    kept: torch.Tensor
    removed: list[int]
    predicted_increase: float
    compensated: torch.Tensor
    seconds: float


def damped(curvature: torch.Tensor, damping: float) -> torch.Tensor:
    """A = H̃ + λ·scale·I, scale the mean diagonal of H̃ (PSD input)."""
    scale = relative_scale(curvature)
    return curvature + (damping * scale) * torch.eye(curvature.shape[0], dtype=curvature.dtype, device=curvature.device)


def compensated_increase(
    sigma: torch.Tensor, kept: torch.Tensor, gradient: torch.Tensor, matrix: torch.Tensor
) -> float:
    """q̃(P) for P = ~kept by a direct solve: the model's increase with the optimal refit of the kept set."""
    pruned = torch.where(kept, torch.zeros_like(sigma), sigma)
    residual = gradient[kept] - matrix[kept] @ pruned
    refit_gain = residual @ torch.linalg.solve(matrix[kept][:, kept], residual) if bool(kept.any()) else 0.0
    return float(-(gradient @ pruned) + 0.5 * pruned @ (matrix @ pruned) - 0.5 * refit_gain)


def downdate_(inverse: torch.Tensor, p: int) -> None:
    """In place: B ← B − B e_p e_pᵀ B / B_pp, then row and column p set to exactly 0. If B is A_SS⁻¹ embedded
    with zeros outside S, the result is A_{S∖p}⁻¹ embedded the same way."""
    column = inverse[:, p].clone()
    inverse.addr_(column, column, alpha=-1.0 / float(column[p]))
    inverse[p, :] = 0.0
    inverse[:, p] = 0.0


def _exceeds(kept_count: int, budget: int) -> bool:
    """The stopping rule's budget test: with per-component costs this becomes Σ cost over the kept > capacity."""
    return kept_count > budget


def _removable(counts, lower, upper, group, kept, steps_left: int) -> torch.Tensor:
    """Kept components whose removal keeps the bounds satisfiable."""
    above_lower = counts > lower
    above_upper = counts > upper
    excess = int((counts - upper).clamp(min=0).sum())
    modules = above_lower & above_upper if excess >= steps_left else above_lower
    return kept & modules[group]


def obs_select(
    sigma: torch.Tensor,
    budget: int,
    bounds: RankBounds,
    gradient: torch.Tensor,
    curvature: torch.Tensor,
    *,
    psd: bool = False,
    damping: float = DAMPING,
) -> ObsSelection:
    """Backward elimination from the full set down to `budget` components within `bounds`, removing at each
    step the component whose removal, with the optimal refit of all others, raises the model least.

    curvature: exact Hessian or Fisher (its PSD part is taken unless `psd`); gradient: as the caller models
    the loss (zeros with the Fisher). O(R³) for the start (eigendecomposition, one Cholesky inverse), then
    O(|S|²) per removal; the working inverse is compacted whenever half of it is pruned.
    """
    start = time.perf_counter()
    n = sigma.numel()
    if bounds.group.numel() != n:
        raise ValueError(f"bounds cover {bounds.group.numel()} components but sigma has {n}")
    if budget < 0:
        raise ValueError(f"budget {budget}: must be 0 or more")
    if bool((bounds.lower > bounds.upper).any()):
        raise ValueError("a module's minimum rank exceeds its maximum rank")
    floor = int(bounds.lower.sum())
    if floor > budget:
        raise ValueError(f"the per-module minimum ranks need {floor} components, over the budget of {budget}")
    tilde = curvature if psd else psd_part(curvature)
    if relative_scale(tilde) <= 0:
        raise ValueError("the curvature has no positive eigenvalue: obs has no model to compensate with")
    matrix = damped(tilde, damping)
    factor = torch.linalg.cholesky(matrix)
    inverse = torch.cholesky_inverse(factor)
    compensated = sigma - inverse @ gradient
    increase = float(-0.5 * gradient @ (sigma - compensated))
    group = bounds.group.to(sigma.device)
    lower, upper = bounds.lower.to(sigma.device), bounds.upper.to(sigma.device)
    counts = torch.bincount(group, minlength=lower.numel())
    kept = torch.ones(n, dtype=torch.bool, device=sigma.device)
    dead = sigma == 0  # ΔW gains nothing from them and their directions are arbitrary: removed first
    active = torch.arange(n, device=sigma.device)  # global index of each row of `inverse`
    removed: list[int] = []
    size = n
    while _exceeds(size, budget) or bool((counts > upper).any()):
        candidates = _removable(counts, lower, upper, group, kept, max(size - budget, 0))[active]
        diagonal = inverse.diagonal()
        cost = compensated[active].square() / (2 * diagonal)
        priority = cost.masked_fill(dead[active], -torch.inf).masked_fill(~candidates, torch.inf)
        local = int(torch.argmin(priority))
        p = int(active[local])
        increase += float(cost[local])
        column = inverse[:, local]
        compensated[active] -= (compensated[p] / column[local]) * column
        compensated[p] = 0.0
        downdate_(inverse, local)
        kept[p] = False
        counts[group[p]] -= 1
        removed.append(p)
        size -= 1
        if size <= active.numel() // 2 and active.numel() > COMPACT_BELOW:
            still = kept[active]
            inverse = inverse[still][:, still].contiguous()
            active = active[still]
    return ObsSelection(
        kept=kept,
        removed=removed,
        predicted_increase=increase,
        compensated=compensated,
        seconds=time.perf_counter() - start,
    )
