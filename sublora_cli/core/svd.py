"""SVD form of a LoRA update without forming the dense out×in matrix.

ΔW = s·B·A with B: out×r, A: r×in. QR of B and of Aᵀ reduces the problem to the SVD of the small
r×r core s·R_B·R_Aᵀ, so the cost is O((out+in)·r²) instead of O(out·in·min(out, in)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spectrum:
    """ΔW = U diag(sigma) Vᵀ with sigma sorted in descending order (U: out×r, V: in×r)."""

    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    def dense(self, kept: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """The out×in matrix of the kept components (all when kept is None); for tests and checks."""
        if kept is None:
            return (self.U * self.sigma) @ self.V.T
        idx = torch.as_tensor(kept, dtype=torch.long)
        return (self.U[:, idx] * self.sigma[idx]) @ self.V[:, idx].T


def factor_svd(B: torch.Tensor, A: torch.Tensor, scale: float) -> Spectrum:
    """SVD of scale·B·A from the factors alone, computed in float64 and returned in float64.

    The returned spectrum has as many components as the adapter's rank r; components beyond the
    true rank of B·A (r > min(out, in), zero or repeated columns) come back with sigma = 0.
    """
    B64 = B.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    r = B64.shape[1]
    if A64.shape[0] != r:
        raise ValueError(f"factor ranks disagree: B has {r} columns, A has {A64.shape[0]} rows")
    QB, RB = torch.linalg.qr(B64)  # QB: out×k, k = min(out, r)
    QA, RA = torch.linalg.qr(A64.T)  # QA: in×m, m = min(in, r)
    core = scale * (RB @ RA.T)  # k×m
    Uc, sigma, Vhc = torch.linalg.svd(core, full_matrices=False)
    U = QB @ Uc
    V = QA @ Vhc.T
    n = sigma.numel()
    if n < r:  # r > min(out, in): the extra directions carry nothing
        pad = r - n
        sigma = torch.cat([sigma, sigma.new_zeros(pad)])
        U = torch.cat([U, U.new_zeros(U.shape[0], pad)], dim=1)
        V = torch.cat([V, V.new_zeros(V.shape[0], pad)], dim=1)
    return Spectrum(U=U, sigma=sigma, V=V)


def balanced_factors(spectrum: Spectrum, kept: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors B', A' of rank len(kept) with scale·B'·A' = U_S diag(sigma_S) V_Sᵀ, both of equal norm.

    Balanced factors (each sqrt(sigma/|scale|) per component) keep the two sides on the same scale,
    which is what training would converge to and what keeps half precision from under/overflowing. A negative
    scale (a negative lora_alpha or kohya `.alpha`: a valid update) is kept, its sign carried by B'.
    """
    idx = torch.as_tensor(kept, dtype=torch.long)
    root = torch.sqrt(spectrum.sigma[idx] / abs(scale))
    B = spectrum.U[:, idx] * (root * math.copysign(1.0, scale))
    A = (spectrum.V[:, idx] * root).T
    return B, A


@dataclass(frozen=True)
class SpectrumStats:
    """Figures `sublora inspect` shows for one module's spectrum."""

    frobenius: float  # ‖ΔW‖_F = ‖sigma‖₂
    energy_components: dict[str, int]  # smallest k whose top-k sigma² reaches 50/90/99 % of the energy
    effective_rank: float  # exp(entropy of sigma / Σ sigma) (Roy & Vetterli 2007)
    stable_rank: float  # ‖ΔW‖_F² / ‖ΔW‖₂²


ENERGY_LEVELS = (0.5, 0.9, 0.99)


def spectrum_stats(sigma: torch.Tensor) -> SpectrumStats:
    s = sigma.detach().to(torch.float64)
    energy = s.square()
    total = float(energy.sum())
    if total == 0.0:
        return SpectrumStats(0.0, {f"{int(p * 100)}%": 0 for p in ENERGY_LEVELS}, 0.0, 0.0)
    cumulative = torch.cumsum(energy, 0) / total
    reach = {
        f"{int(p * 100)}%": int(torch.searchsorted(cumulative, torch.tensor(p - 1e-12, dtype=torch.float64))) + 1
        for p in ENERGY_LEVELS
    }
    p = s / s.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    return SpectrumStats(
        frobenius=math.sqrt(total),
        energy_components=reach,
        effective_rank=math.exp(entropy),
        stable_rank=total / float(energy.max()),
    )
