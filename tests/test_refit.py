"""The refit of the kept σ on synthetic losses: the closed-form OBS step on an exact quadratic with PD H, never
a worse measured loss (indefinite H, a measure that punishes the raw step, non-finite losses), the evaluation
cap, and the canonical form a negative refit σ is written in."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sublora_cli.core.refit import DAMPINGS, MAX_EVALUATIONS, psd_part, refit, written_spectrum
from sublora_cli.core.svd import Spectrum, balanced_factors

torch.set_num_threads(1)
FEW = settings(max_examples=40, deadline=None)


def problem(seed: int, n: int, shift: float):
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    hessian = (m + m.T) / 2 + shift * torch.eye(n, dtype=torch.float64)
    gradient = 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    sigma = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    kept = torch.rand(n, generator=generator) < 0.6
    return sigma, gradient, hessian, kept


def quadratic(sigma, gradient, hessian, quartic: float = 0.0):
    """The loss the model describes exactly (plus, optionally, a quartic wall the model does not see)."""

    def measure(candidate: torch.Tensor) -> float:
        d = candidate - sigma
        return float(1.0 + gradient @ d + 0.5 * d @ hessian @ d + quartic * d.pow(4).sum())

    return measure


def masked(sigma, kept):
    return torch.where(kept, sigma, torch.zeros_like(sigma))


def obs_step(sigma, kept, gradient, hessian, damping: float = 0.0):
    """δ_S = −(H_SS + λ·mean diag·I)⁻¹ (g_S − H_SP σ_P), solved directly."""
    pruned = sigma - masked(sigma, kept)
    block = hessian[kept][:, kept]
    block = block + damping * float(block.diagonal().mean()) * torch.eye(int(kept.sum()), dtype=torch.float64)
    return -torch.linalg.solve(block, gradient[kept] - hessian[kept] @ pruned)


@pytest.mark.parametrize("seed", range(6))
def test_pd_quadratic_accepts_the_closed_form_step(seed):
    sigma, gradient, hessian, kept = problem(seed, 8, shift=0.0)
    hessian = hessian @ hessian.T + 0.1 * torch.eye(8, dtype=torch.float64)
    kept[:2] = True
    measure = quadratic(sigma, gradient, hessian)
    before = measure(masked(sigma, kept))

    exact = refit(sigma, kept, gradient, hessian, measure, before, dampings=(0.0,))
    assert exact.accepted and exact.step == 1.0 and exact.evaluations == 1
    expected = masked(sigma, kept)
    expected[kept] += obs_step(sigma, kept, gradient, hessian)
    assert torch.allclose(exact.sigma, expected, rtol=1e-9, atol=1e-12)
    assert exact.measured_change == pytest.approx(exact.predicted_change, rel=1e-8)

    default = refit(sigma, kept, gradient, hessian, measure, before)
    assert default.accepted and default.damping == DAMPINGS[0] and default.step == 1.0
    damped = masked(sigma, kept)
    damped[kept] += obs_step(sigma, kept, gradient, hessian, DAMPINGS[0])
    assert torch.allclose(default.sigma, damped, rtol=1e-9, atol=1e-12)
    assert default.loss_after_refit == pytest.approx(exact.loss_after_refit, rel=1e-5)
    assert default.loss_after_refit == pytest.approx(measure(default.sigma), rel=1e-12)


@FEW
@given(st.integers(0, 2**32 - 1), st.integers(2, 10), st.floats(-2.0, 1.0), st.floats(0.0, 50.0))
def test_never_worse_than_after_selection(seed, n, shift, quartic):
    sigma, gradient, hessian, kept = problem(seed, n, shift)
    measure = quadratic(sigma, gradient, hessian, quartic)
    before = measure(masked(sigma, kept))
    result = refit(sigma, kept, gradient, hessian, measure, before)
    assert result.evaluations <= MAX_EVALUATIONS
    assert result.loss_after_refit <= before
    assert measure(result.sigma) == pytest.approx(result.loss_after_refit, rel=1e-12)
    assert not result.sigma[~kept].any()
    if not result.accepted:
        assert torch.equal(result.sigma, masked(sigma, kept))


def test_indefinite_h_the_raw_step_is_punished_the_refit_is_not():
    """The raw OBS step on an indefinite H goes uphill along the negative-curvature direction: the model
    predicts a decrease while the loss grows. The refit steps on the clipped H and keeps only what it measures."""
    hessian = torch.tensor([[1.0, 0.0, 0.3], [0.0, -0.5, 0.4], [0.3, 0.4, 2.0]], dtype=torch.float64)
    gradient = torch.tensor([1.0, 0.5, -0.1], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64)
    kept = torch.tensor([True, True, False])
    measure = quadratic(sigma, gradient, psd_part(hessian), quartic=5.0)  # the loss curves up where H bends down
    before = measure(masked(sigma, kept))
    raw = masked(sigma, kept)
    raw[kept] += obs_step(sigma, kept, gradient, hessian)
    step = (raw - masked(sigma, kept))[kept]
    residual = gradient[kept] - hessian[kept] @ (sigma - masked(sigma, kept))
    assert float(step @ residual + 0.5 * step @ hessian[kept][:, kept] @ step) < 0  # the raw model's promise
    assert measure(raw) > before
    result = refit(sigma, kept, gradient, hessian, measure, before)
    assert result.accepted and result.loss_after_refit < before
    assert result.predicted_change < 0 and result.measured_change < 0


def test_non_finite_losses_are_never_accepted():
    sigma, gradient, hessian, kept = problem(0, 6, shift=3.0)
    result = refit(sigma, kept, gradient, hessian, lambda _s: math.nan, 1.0)
    assert not result.accepted and result.loss_after_refit == 1.0
    assert result.evaluations == MAX_EVALUATIONS
    assert torch.equal(result.sigma, masked(sigma, kept))


@pytest.mark.parametrize("cap", [0, 1, 2, 5])
def test_evaluations_stay_within_the_cap(cap):
    sigma, gradient, hessian, kept = problem(4, 7, shift=-1.0)
    calls = []

    def measure(candidate):
        calls.append(candidate)
        return 2.0  # never better: every step size of every damping is tried until the cap

    result = refit(sigma, kept, gradient, hessian, measure, 1.0, max_evaluations=cap)
    assert result.evaluations == len(calls) == cap
    assert not result.accepted


def test_nothing_kept_means_nothing_to_refit():
    sigma, gradient, hessian, _ = problem(1, 5, shift=1.0)
    result = refit(sigma, torch.zeros(5, dtype=torch.bool), gradient, hessian, lambda _s: 0.0, 1.0)
    assert result.evaluations == 0 and not result.accepted and not result.sigma.any()
    assert result.damping is None and result.measured_change is None


def test_psd_part_clips_negative_eigenvalues_only():
    hessian = torch.tensor([[2.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    tilde = psd_part(hessian)
    values, vectors = torch.linalg.eigh(hessian)
    assert torch.allclose(torch.linalg.eigvalsh(tilde), torch.tensor([0.0, float(values[1])], dtype=torch.float64))
    assert torch.allclose(tilde @ vectors[:, 1], values[1] * vectors[:, 1])


def test_negative_refit_sigma_is_written_with_a_flipped_u_column():
    generator = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 4, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(5, 4, generator=generator, dtype=torch.float64))[0]
    spectrum = Spectrum(U=U, sigma=torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64), V=V)
    refit_sigma = torch.tensor([2.5, 0.0, -1.5, 0.7], dtype=torch.float64)  # component 1 pruned, 2 negative
    kept = [0, 2, 3]
    written = written_spectrum(spectrum, refit_sigma, kept)
    assert written.sigma.tolist() == [2.5, 1.5, 0.7]
    expected = (U[:, kept] * refit_sigma[kept]) @ V[:, kept].T
    assert torch.allclose(written.dense(), expected)
    assert torch.allclose(written.U.T @ written.U, torch.eye(3, dtype=torch.float64))
    B, A = balanced_factors(written, list(range(3)), scale=2.0)
    assert torch.allclose(2.0 * B @ A, expected)
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1))


def test_fisher_passed_as_psd_with_a_dropped_gradient():
    """The Fisher is PSD already (psd=True skips the eigendecomposition) and the caller drops g: the refit is
    then pure compensation, and still guarded by the measured loss."""
    sigma, _, hessian, kept = problem(2, 8, shift=0.0)
    kept[:3] = True
    fisher = hessian @ hessian.T
    zero = torch.zeros_like(sigma)
    measure = quadratic(sigma, zero, fisher)
    before = measure(masked(sigma, kept))
    fast = refit(sigma, kept, zero, fisher, measure, before, psd=True)
    clipped = refit(sigma, kept, zero, fisher, measure, before)
    assert fast.accepted and fast.loss_after_refit < before
    assert torch.allclose(fast.sigma, clipped.sigma, rtol=1e-6, atol=1e-9)
