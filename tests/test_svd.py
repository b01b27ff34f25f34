"""The factor SVD must equal the dense SVD of s·B·A without ever forming it (docs/design.md §1)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sublora_cli.core.svd import balanced_factors, factor_svd, spectrum_stats


@st.composite
def factors(draw):
    out = draw(st.integers(1, 24))
    inp = draw(st.integers(1, 24))
    r = draw(st.integers(1, 32))  # may exceed min(out, in)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g)
    A = torch.randn(r, inp, generator=g)
    defect = draw(st.sampled_from(["none", "zero_column", "repeated_column", "zero_row"]))
    if defect == "zero_column" and r > 1:
        B[:, 0] = 0
    elif defect == "repeated_column" and r > 1:
        B[:, 1] = B[:, 0]
        A[1] = A[0]
    elif defect == "zero_row":
        A[-1] = 0
    scale = draw(st.floats(0.01, 8.0)) * draw(st.sampled_from([1.0, -1.0]))  # a negative alpha is a valid update
    return B, A, scale


@settings(max_examples=150, deadline=None)
@given(factors())
def test_factor_svd_reconstructs_the_update(f):
    B, A, scale = f
    spectrum = factor_svd(B, A, scale)
    dense = scale * B.double() @ A.double()
    error = torch.linalg.norm(spectrum.dense() - dense) / max(torch.linalg.norm(dense), 1e-30)
    assert error < 1e-5
    assert spectrum.rank == B.shape[1]
    assert torch.all(spectrum.sigma >= 0)
    assert torch.all(spectrum.sigma[:-1] >= spectrum.sigma[1:])


@settings(max_examples=100, deadline=None)
@given(factors())
def test_singular_values_match_dense_svd(f):
    B, A, scale = f
    sigma = factor_svd(B, A, scale).sigma
    dense_sigma = torch.linalg.svdvals(scale * B.double() @ A.double())
    k = min(dense_sigma.numel(), sigma.numel())  # the dense SVD has min(out, in) values, the factor SVD r
    tol = 1e-9 * max(float(dense_sigma[0]), 1.0)
    assert torch.allclose(sigma[:k], dense_sigma[:k], rtol=1e-6, atol=tol)
    assert torch.all(sigma[k:] == 0)
    assert torch.all(dense_sigma[k:] <= tol)


@settings(max_examples=100, deadline=None)
@given(factors())
def test_singular_vectors_are_orthonormal_where_sigma_is_positive(f):
    B, A, scale = f
    s = factor_svd(B, A, scale)
    live = s.sigma > 1e-9 * max(float(s.sigma[0]), 1e-30)
    U, V = s.U[:, live], s.V[:, live]
    eye = torch.eye(int(live.sum()), dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-8)
    assert torch.allclose(V.T @ V, eye, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(factors(), st.data())
def test_balanced_factors_reproduce_the_kept_components(f, data):
    B, A, scale = f
    s = factor_svd(B, A, scale)
    kept = sorted(data.draw(st.sets(st.integers(0, s.rank - 1), min_size=1)))
    B2, A2 = balanced_factors(s, kept, scale)
    assert torch.allclose(scale * B2 @ A2, s.dense(kept), atol=1e-9)
    assert torch.allclose(B2.norm(dim=0), A2.norm(dim=1), atol=1e-9)


def test_float32_factors_reconstruct_within_1e5():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 16, generator=g), torch.randn(16, 200, generator=g)
    s = factor_svd(B, A, 2.0)
    dense = 2.0 * B @ A
    assert torch.linalg.norm(s.dense().float() - dense) / torch.linalg.norm(dense) < 1e-5


def test_spectrum_stats_on_a_known_spectrum():
    stats = spectrum_stats(torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert abs(stats.frobenius - 6**0.5) < 1e-12
    assert stats.energy_components == {"50%": 1, "90%": 3, "99%": 3}
    assert abs(stats.stable_rank - 6 / 4) < 1e-12
    assert abs(stats.effective_rank - 2 * 2**0.5) < 1e-12  # exp(entropy of [1/2, 1/4, 1/4]) = 2√2
    assert spectrum_stats(torch.zeros(3)).effective_rank == 0.0
