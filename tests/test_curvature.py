"""g and H over σ must be the true derivatives of the mean calibration loss (docs/curvature.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sublora_cli.core.svd import factor_svd
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import LoraModule
from sublora_cli.model.curvature import compute_curvature, estimate_cost
from sublora_cli.model.reparam import SigmaModel


def lora(name: str, out: int, inp: int, r: int, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g) * 0.5
    return LoraModule(name, "linear", A, B, float(r), 1.0, tuple(A.shape), tuple(B.shape))


def sigma_model(model, modules, loss_fn):
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]
    return SigmaModel(model, modules, spectra, loss_fn, dtype=torch.float64), spectra


def reference_hessian(sm, batches):
    def mean_loss(s):
        return sum(sm.loss(s, b) for b in batches) / len(batches)

    s = sm.sigma.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mean_loss(s), s)
    return g, torch.autograd.functional.hessian(mean_loss, sm.sigma.clone())


class TwoBranch(nn.Module):
    """y = W1 x + W2 x: linear in each adapted weight, so an MSE loss is exactly quadratic in σ."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_quadratic_loss_hessian_and_predicted_increase():
    torch.manual_seed(0)
    modules = [lora("a", 4, 6, 3, 1), lora("b", 4, 6, 4, 2)]
    sm, spectra = sigma_model(TwoBranch(), modules, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    batches = [(torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)) for _ in range(3)]
    curv = compute_curvature(sm, batches)

    # analytic: output = Φ(x) σ + const, column k of Φ(x) = u_k (v_kᵀ x); L = mean ‖·‖² ⇒ H = 2 E[ΦᵀΦ]/(n·out)
    H = torch.zeros(7, 7, dtype=torch.float64)
    for x, _ in batches:
        phi = torch.cat([(x @ s.V)[:, None, :] * s.U[None] for s in spectra], dim=2)  # (n, out, R)
        H += 2 * torch.einsum("nok,nol->kl", phi, phi) / (x.shape[0] * 4)
    H /= len(batches)
    torch.testing.assert_close(curv.hessian, H, rtol=0, atol=1e-8)
    assert curv.kind == "exact" and curv.gradient.dtype == torch.float64 and curv.n_batches == 3
    assert curv.loss == pytest.approx(sm.mean_loss(sm.sigma, batches), rel=1e-12)

    sigma = sm.sigma
    for pruned in ([0], [2, 5], [0, 1, 3, 6], list(range(7))):
        P = torch.tensor(pruned)
        q = -curv.gradient[P] @ sigma[P] + 0.5 * sigma[P] @ curv.hessian[P][:, P] @ sigma[P]
        mask = torch.ones(7, dtype=torch.float64)
        mask[P] = 0
        measured = sm.mean_loss(sigma * mask, batches) - curv.loss
        assert float(q) == pytest.approx(measured, rel=1e-9, abs=1e-12)


def test_tanh_mlp_matches_autograd_functional_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    sm, _ = sigma_model(
        model, [lora("0", 8, 3, 3, 1), lora("2", 8, 8, 4, 2)], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    )
    batches = [(torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)) for _ in range(2)]
    g, H = reference_hessian(sm, batches)
    exact = compute_curvature(sm, batches, "exact")
    torch.testing.assert_close(exact.gradient, g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact.hessian, (H + H.T) / 2, rtol=1e-9, atol=1e-11)
    looped = compute_curvature(sm, batches, "exact", chunk=1)  # one backward pass per row: same numbers
    torch.testing.assert_close(looped.hessian, exact.hessian, rtol=1e-12, atol=1e-14)
    for threads, chunk in ((1, 4), (3, 2)):  # rows on a pool of threads: same numbers, thread count restored
        before = torch.get_num_threads()
        pooled = compute_curvature(sm, batches, "exact", chunk=chunk, threads=threads)
        torch.testing.assert_close(pooled.hessian, exact.hessian, rtol=1e-12, atol=1e-14)
        assert torch.get_num_threads() == before and f"{threads} thread" in pooled.strategy
    diag = compute_curvature(sm, batches, "diag", chunk=3)
    assert diag.hessian is None
    torch.testing.assert_close(diag.hessian_diag, exact.hessian.diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(diag.gradient, exact.gradient, rtol=0, atol=0)
    assert not exact.is_zero


class Pinn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc1, self.fc_out = nn.Linear(2, 10), nn.Linear(10, 10), nn.Linear(10, 1)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc1(torch.tanh(self.fc_in(x)))))


def pinn_loss(model, batch):
    """Poisson residual -Δu - f plus boundary misfit: second input derivatives taken inside the loss."""
    x = batch["x"].clone().requires_grad_(True)
    u = model(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    lap = sum(torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
    return ((-lap - batch["f"]) ** 2).mean() + ((model(batch["xb"])[:, 0] - batch["ub"]) ** 2).mean()


def test_pinn_loss_with_inner_autograd_grad():
    torch.manual_seed(0)
    sm, _ = sigma_model(Pinn(), [lora("fc1", 10, 10, 4, 1), lora("fc_out", 1, 10, 1, 2)], pinn_loss)
    g = torch.Generator().manual_seed(3)
    batches = [
        {
            "x": torch.rand(24, 2, generator=g, dtype=torch.float64),
            "f": torch.randn(24, generator=g, dtype=torch.float64),
            "xb": torch.rand(8, 2, generator=g, dtype=torch.float64),
            "ub": torch.randn(8, generator=g, dtype=torch.float64),
        }
        for _ in range(2)
    ]
    seen = []
    curv = compute_curvature(sm, batches, progress=lambda stage, done, total: seen.append((stage, done, total)))
    grad, H = reference_hessian(sm, batches)
    torch.testing.assert_close(curv.gradient, grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curv.hessian, (H + H.T) / 2, rtol=1e-9, atol=1e-11)

    # an independent check: central differences of the gradient
    def mean_grad(s):
        s = s.clone().requires_grad_(True)
        return torch.autograd.grad(sum(sm.loss(s, b) for b in batches) / 2, s)[0]

    eps, R = 1e-5, sm.size
    fd = torch.stack(
        [
            (mean_grad(sm.sigma + eps * e) - mean_grad(sm.sigma - eps * e)) / (2 * eps)
            for e in torch.eye(R, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(curv.hessian, fd, rtol=1e-6, atol=1e-7)
    assert seen[0] == ("curvature", 0, 2 * R) and seen[-1] == ("curvature", 2 * R, 2 * R)


def test_float32_model_accumulates_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    spectra = [factor_svd(m.B, m.A, m.scale) for m in [lora("0", 5, 3, 2, 1)]]
    sm = SigmaModel(model, [lora("0", 5, 3, 2, 1)], spectra, lambda m, b: m(b).pow(2).mean())
    curv = compute_curvature(sm, [torch.randn(4, 3)], "exact")
    assert curv.hessian.dtype == curv.gradient.dtype == torch.float64
    torch.testing.assert_close(curv.hessian, curv.hessian.T, rtol=0, atol=0)


def test_refuses_a_hessian_over_the_memory_limit_and_estimates_cost():
    model = nn.Sequential(nn.Linear(3, 3))
    sm, _ = sigma_model(model, [lora("0", 3, 3, 3, 1)], lambda m, b: m(b).sum())
    with pytest.raises(SubloraError, match="--curvature diag"):
        compute_curvature(sm, [torch.randn(2, 3, dtype=torch.float64)], max_hessian_gb=1e-12)
    assert estimate_cost(1000, 4, "exact") == {"hessian_bytes": 8_000_000, "hvps": 4000, "passes": 4}
    assert estimate_cost(1000, 4, "diag")["hessian_bytes"] == 8000


def test_loss_independent_of_the_adapter_is_zero_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    sm, _ = sigma_model(model, [lora("0", 4, 3, 2, 1)], lambda m, b: (b**2).sum())  # ignores the model
    curv = compute_curvature(sm, [torch.randn(2, 3, dtype=torch.float64)])
    assert curv.is_zero and curv.hessian.shape == (2, 2)
    # linear in σ: g ≠ 0, H = 0
    sm, _ = sigma_model(nn.Sequential(nn.Linear(3, 4)), [lora("0", 4, 3, 2, 1)], lambda m, b: m(b).sum())
    curv = compute_curvature(sm, [torch.randn(2, 3, dtype=torch.float64)], "diag")
    assert not curv.is_zero and not curv.hessian_diag.any()
