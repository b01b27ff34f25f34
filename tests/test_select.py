"""Selection methods against brute force on small problems: projection, incremental gains, exhaustive
optimum, the (1 − 1/e) guarantee, bounds, and the paper's near-stationary example (§3.1)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sublora_cli.core.budget import Budget
from sublora_cli.core.methods import METHODS, lookup
from sublora_cli.core.select import (
    RankBounds,
    predicted_increase,
    project_submodular,
    select,
)

torch.set_num_threads(1)
FEW = settings(max_examples=40, deadline=None)


def select_ranks(method, sigma, budget, bounds, *args, **kwargs):
    """select() under a rank budget of `budget` components (cost 1 each), as these tests state their budgets."""
    return select(method, sigma, Budget.ranks(budget, sigma.numel()), bounds, *args, **kwargs)


def problem(seed: int, n: int, kind: str = "general"):
    """sigma ≥ 0, g, symmetric H. kind "submodular": g = 0 and H PSD with nonnegative entries (monotone and
    submodular f); "general": any symmetric H and a gradient (neither monotone nor submodular)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.05, 2.0, n)
    if kind == "submodular":
        factor = rng.uniform(0.0, 1.0, (n, n)) * (rng.uniform(size=(n, n)) < 0.6)
        hessian = factor @ factor.T
        gradient = np.zeros(n)
    else:
        m = rng.normal(size=(n, n))
        hessian = (m + m.T) / 2
        gradient = rng.normal(scale=0.5, size=n)
    return torch.tensor(sigma), torch.tensor(gradient), torch.tensor(hessian)


def q(pruned, sigma, gradient, hessian) -> float:
    """q(P) from scratch with numpy, by indexing (independent of select's masked form)."""
    p = sorted(pruned)
    s, g, h = sigma.numpy()[p], gradient.numpy()[p], hessian.numpy()[np.ix_(p, p)]
    return float(-g @ s + 0.5 * s @ h @ s)


def feasible_counts(counts, bounds: RankBounds, left: int) -> bool:
    """Whether counts are within the upper bounds and the lower ones are reachable in `left` more picks."""
    lower, upper = bounds.lower.tolist(), bounds.upper.tolist()
    deficit = sum(max(lo - c, 0) for lo, c in zip(lower, counts, strict=True))
    return all(c <= hi for c, hi in zip(counts, upper, strict=True)) and deficit <= left


def module_counts(kept, bounds: RankBounds) -> list[int]:
    return torch.bincount(bounds.group[kept], minlength=bounds.lower.numel()).tolist()


def random_ranks(seed: int, n_modules: int, low: int = 1, high: int = 4) -> list[int]:
    return np.random.default_rng(seed).integers(low, high + 1, n_modules).tolist()


# projection


@FEW
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_projection_satisfies_constraint_and_keeps_diagonal(seed, n):
    rng = np.random.default_rng(seed)
    sigma = torch.tensor(rng.normal(size=n) * (rng.uniform(size=n) < 0.8))  # mixed signs and zeros
    hessian = torch.tensor(rng.normal(size=(n, n)))
    projected, fraction, mass = project_submodular(hessian, sigma)
    products = sigma[:, None] * projected * sigma[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    assert bool((products[off] >= 0).all())
    assert torch.equal(torch.diagonal(projected), torch.diagonal(hessian))
    changed = (projected != hessian) & off
    assert fraction == pytest.approx(int(changed.sum()) / max(n * (n - 1), 1))
    clipped = torch.linalg.norm((hessian - projected)[off])
    assert mass == pytest.approx(float(clipped / torch.linalg.norm(hessian[off])) if changed.any() else 0.0)


@FEW
@given(st.integers(0, 2**32 - 1), st.integers(2, 4))
def test_projection_is_the_closest_feasible_matrix(seed, n):
    """Brute force: per entry over a grid of feasible values, and whole random feasible matrices."""
    rng = np.random.default_rng(seed)
    sigma = rng.normal(size=n)
    hessian = rng.normal(size=(n, n))
    projected = project_submodular(torch.tensor(hessian), torch.tensor(sigma))[0].numpy()
    grid = np.append(np.linspace(-4, 4, 801), [0.0])
    for i, j in itertools.product(range(n), range(n)):
        feasible = grid if i == j else grid[sigma[i] * grid * sigma[j] >= 0]
        best = np.abs(feasible - hessian[i, j]).min()
        assert abs(projected[i, j] - hessian[i, j]) <= best + 1e-12
    distance = np.linalg.norm(projected - hessian)
    for _ in range(200):
        candidate = hessian + rng.normal(scale=0.5, size=(n, n))
        signs = np.sign(np.outer(sigma, sigma) * candidate)
        candidate[(signs < 0) & ~np.eye(n, dtype=bool)] *= -1  # reflect into the feasible set
        assert np.linalg.norm(candidate - hessian) >= distance - 1e-12


def test_projection_statistics_on_a_known_matrix():
    sigma = torch.tensor([1.0, 1.0, 1.0])
    hessian = torch.tensor([[5.0, -3.0, 1.0], [-3.0, 5.0, 0.0], [1.0, 0.0, 5.0]])
    projected, fraction, mass = project_submodular(hessian, sigma)
    assert torch.equal(projected, torch.tensor([[5.0, 0.0, 1.0], [0.0, 5.0, 0.0], [1.0, 0.0, 5.0]]))
    assert fraction == pytest.approx(2 / 6)
    assert mass == pytest.approx(math.sqrt(18 / 20))


# greedy against brute force


@FEW
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.sampled_from(["hessian", "sublora", "diag"]))
def test_incremental_gains_equal_brute_force_marginal_gains(seed, n_modules, method):
    """At every step: the picked gain is q(P) − q(P∖{k}) recomputed from scratch, and it is the largest
    such gain among the elements that keep the bounds reachable."""
    ranks = random_ranks(seed, n_modules)
    n = sum(ranks)
    sigma, gradient, hessian = problem(seed, n)
    bounds = RankBounds.from_ranks(ranks, min_rank=1, max_rank=3)
    budget = int(np.random.default_rng(seed).integers(int(bounds.lower.sum()), int(bounds.upper.sum()) + 1))
    model = {
        "hessian": hessian,
        "sublora": project_submodular(hessian, sigma)[0],
        "diag": torch.diag(torch.diagonal(hessian)),
    }[method]
    selection = select_ranks(method, sigma, budget, bounds, gradient, hessian)
    assert len(selection.order) == len(selection.gains) == budget
    kept: list[int] = []
    for k, gain in zip(selection.order, selection.gains, strict=True):
        pruned = set(range(n)) - set(kept)
        gains = {}
        for i in pruned:
            counts = module_counts(torch.tensor(kept + [i]), bounds)
            if feasible_counts(counts, bounds, budget - len(kept) - 1):
                gains[i] = q(pruned, sigma, gradient, model) - q(pruned - {i}, sigma, gradient, model)
        assert gain == pytest.approx(gains[k], abs=1e-9)
        assert gain >= max(gains.values()) - 1e-9
        kept.append(k)
    # the prediction is the method's own model of the loss: diag's diagonal one, the others' full quadratic on H
    expected = q(set(range(n)) - set(kept), sigma, gradient, model if method == "diag" else hessian)
    assert selection.predicted_increase == pytest.approx(expected)


def test_greedy_order_is_nested_across_budgets():
    sigma, gradient, hessian = problem(3, 12)
    bounds = RankBounds.from_ranks([12])
    full = select_ranks("sublora", sigma, 12, bounds, gradient, hessian).order
    for budget in (1, 5, 9):
        assert select_ranks("sublora", sigma, budget, bounds, gradient, hessian).order == full[:budget]


@FEW
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.booleans())
def test_exhaustive_equals_brute_force_optimum(seed, n_modules, with_bounds):
    ranks = random_ranks(seed, n_modules, 1, 4)
    n = sum(ranks)
    sigma, gradient, hessian = problem(seed, n)
    bounds = RankBounds.from_ranks(ranks, min_rank=int(with_bounds), max_rank=3 if with_bounds else None)
    floor = int(bounds.lower.sum())  # budget < n: at b ≥ R every method keeps everything (tested below)
    budget = int(np.random.default_rng(seed + 1).integers(floor, max(n, floor + 1)))
    best = math.inf
    for size in range(budget + 1):
        for kept in itertools.combinations(range(n), size):
            if feasible_counts(module_counts(torch.tensor(kept, dtype=torch.long), bounds), bounds, 0):
                best = min(best, q(set(range(n)) - set(kept), sigma, gradient, hessian))
    selection = select_ranks("exhaustive", sigma, budget, bounds, gradient, hessian)
    assert selection.predicted_increase == pytest.approx(best, abs=1e-9)
    assert q(set(range(n)) - set(selection.order), sigma, gradient, hessian) == pytest.approx(best, abs=1e-9)
    assert selection.order == sorted(selection.order)
    assert int(selection.kept.sum()) <= budget


def test_exhaustive_refuses_too_many_subsets():
    sigma, gradient, hessian = problem(0, 30)
    with pytest.raises(ValueError, match="evaluate 614,429,672 subsets"):  # Σ_{k≤15} C(30, k)
        select_ranks("exhaustive", sigma, 15, RankBounds.from_ranks([30]), gradient, hessian, max_exhaustive=1000)
    n = 2000  # too big to count exactly in good time: says "more than"
    sigma, gradient = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    hessian = torch.eye(n)  # float32: select converts to sigma's dtype
    with pytest.raises(ValueError, match="more than"):
        select_ranks("exhaustive", sigma, 1000, RankBounds.from_ranks([n // 2] * 2), gradient, hessian)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 9))
def test_greedy_is_within_one_minus_one_over_e_when_monotone_submodular(seed, n):
    """g = 0 and a nonnegative PSD H: f is monotone and submodular, so the greedy achieves at least
    (1 − 1/e) of the optimum of the normalised f(S) − f(∅) = q(N) − q(N∖S)."""
    sigma, gradient, hessian = problem(seed, n, "submodular")
    budget = int(np.random.default_rng(seed).integers(1, n))
    bounds = RankBounds.from_ranks([n])
    everything = q(set(range(n)), sigma, gradient, hessian)
    optimum = everything - select_ranks("exhaustive", sigma, budget, bounds, gradient, hessian).predicted_increase
    for method in ("sublora", "hessian"):
        selection = select_ranks(method, sigma, budget, bounds, gradient, hessian)
        assert selection.diagnostics == {"clipped_fraction": 0.0, "clipped_mass": 0.0, "monotone": True}
        assert everything - selection.predicted_increase >= (1 - 1 / math.e) * optimum - 1e-9


# bounds, budgets and the simple methods


def all_inputs(seed: int, n: int):
    sigma, gradient, hessian = problem(seed, n)
    return {"gradient": gradient, "hessian": hessian}, sigma


def assume_usable(method: str, inputs: dict) -> None:
    """obs refuses a curvature without a positive eigenvalue (no model to compensate with): skip such draws."""
    if method == "obs":
        assume(bool((torch.linalg.eigvalsh(inputs["hessian"]) > 0).any()))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_modules=st.integers(1, 4),
    min_rank=st.integers(0, 2),
    extra=st.integers(0, 2),
)
def test_every_method_honours_bounds(method, seed, n_modules, min_rank, extra):
    ranks = random_ranks(seed, n_modules, 1, 4)
    inputs, sigma = all_inputs(seed, sum(ranks))
    assume_usable(method, inputs)
    bounds = RankBounds.from_ranks(ranks, min_rank=min_rank, max_rank=min_rank + extra)
    floor, ceiling = int(bounds.lower.sum()), int(bounds.upper.sum())
    budget = int(np.random.default_rng(seed).integers(floor, sum(ranks) + 2))
    selection = select_ranks(method, sigma, budget, bounds, **inputs)
    counts = module_counts(selection.kept, bounds)
    limits = zip(counts, bounds.lower.tolist(), bounds.upper.tolist(), strict=True)
    assert all(lo <= c <= hi for c, lo, hi in limits)
    if method in ("sublora-random", "exhaustive"):
        assert sum(counts) <= min(budget, ceiling)
    else:
        assert sum(counts) == min(budget, ceiling)
        assert sorted(selection.order) == torch.nonzero(selection.kept).flatten().tolist()


def test_lower_bounds_above_budget_raise():
    with pytest.raises(ValueError, match="minimum ranks need 6"):
        select_ranks("magnitude", torch.rand(9).double(), 5, RankBounds.from_ranks([3, 3, 3], min_rank=2))


@pytest.mark.parametrize("method", METHODS)
def test_budget_at_least_total_rank_keeps_everything(method):
    inputs, sigma = all_inputs(1, 7)
    for budget in (7, 100):
        selection = select_ranks(method, sigma, budget, RankBounds.from_ranks([3, 4]), **inputs)
        assert bool(selection.kept.all())
        if lookup(method).prediction == "none":  # magnitude and linear have no model of the loss to predict with
            assert selection.predicted_increase is None
        else:
            assert selection.predicted_increase == pytest.approx(0.0)


def test_magnitude_keeps_the_largest_sigma():
    sigma = torch.tensor([0.9, 0.5, 0.1, 2.0, 0.7, 0.3, 1.2, 0.05], dtype=torch.float64)
    bounds = RankBounds.from_ranks([3, 3, 2])
    for budget in range(9):
        selection = select_ranks("magnitude", sigma, budget, bounds)
        assert set(selection.order) == set(torch.topk(sigma, budget).indices.tolist())
        assert selection.predicted_increase is None and selection.diagnostics is None


def test_sorted_methods_break_ties_by_index():
    sigma = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    assert select_ranks("magnitude", sigma, 3, RankBounds.from_ranks([5])).order == [1, 3, 0]


def test_linear_and_diag_scores():
    sigma = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    gradient = torch.tensor([-0.5, 0.1, 0.05], dtype=torch.float64)
    hessian_diag = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    bounds = RankBounds.from_ranks([3])
    # |gσ| = 0.5, 0.2, 0.15;  −gσ + ½hσ² = 0.55, 0.8, −0.15
    assert select_ranks("linear", sigma, 2, bounds, gradient).order == [0, 1]
    diag = select_ranks("diag", sigma, 2, bounds, gradient, hessian_diag=hessian_diag)
    assert diag.order == [1, 0]
    assert diag.gains == pytest.approx([0.8, 0.55])
    assert diag.predicted_increase == pytest.approx(-0.15)  # pruning 2 is modelled to help
    assert diag.diagnostics["monotone"] is True


def test_randomized_greedy_is_reproducible_per_seed_and_varies_across_seeds():
    sigma, _, hessian = problem(5, 16, "submodular")
    gradient = torch.zeros(16, dtype=torch.float64)
    bounds = RankBounds.from_ranks([8, 8])

    def run(seed):
        return select_ranks("sublora-random", sigma, 6, bounds, gradient, hessian, seed=seed).order

    runs = {seed: run(seed) for seed in range(6)}
    assert all(run(seed) == order for seed, order in runs.items())
    assert len({tuple(order) for order in runs.values()}) > 1


def test_randomized_greedy_takes_dummies_over_losses_unless_a_lower_bound_forces_it():
    sigma, _, hessian = problem(2, 8, "submodular")
    gradient = torch.full((8,), 100.0, dtype=torch.float64)  # every gain negative: pruning all helps
    for seed in range(5):
        free = select_ranks("sublora-random", sigma, 4, RankBounds.from_ranks([4, 4]), gradient, hessian, seed=seed)
        assert free.order == [] and free.gains == []
        bounded = RankBounds.from_ranks([4, 4], min_rank=1)
        forced = select_ranks("sublora-random", sigma, 4, bounded, gradient, hessian, seed=seed)
        assert module_counts(forced.kept, bounded) == [1, 1]
        assert forced.diagnostics["monotone"] is False


def test_monotone_is_false_when_the_budget_forces_losses():
    sigma = torch.tensor([1.0, 1.0], dtype=torch.float64)
    gradient = torch.tensor([1.0, 1.0], dtype=torch.float64)  # pruning either one lowers the loss
    hessian = torch.eye(2, dtype=torch.float64) * 0.1
    selection = select_ranks("sublora", sigma, 2, RankBounds.from_ranks([2]), gradient, hessian)
    assert selection.diagnostics["monotone"] is False
    assert select_ranks("exhaustive", sigma, 1, RankBounds.from_ranks([2]), gradient, hessian).order == []


def test_near_stationary_point_linear_keeps_the_wrong_component():
    """Paper §3.1: at a (near-)stationary point g is noise, so |gσ| ranks by noise; the curvature term
    ½H_iiσ_i² says component 0 matters far more, and every second-order method keeps it."""
    sigma = torch.tensor([1.0, 0.9], dtype=torch.float64)
    gradient = torch.tensor([1e-6, -3e-6], dtype=torch.float64)
    hessian = torch.tensor([[4.0, 0.1], [0.1, 1.0]], dtype=torch.float64)
    bounds = RankBounds.from_ranks([1, 1])
    assert select_ranks("linear", sigma, 1, bounds, gradient, hessian).order == [1]
    for method in ("diag", "hessian", "sublora", "exhaustive"):
        assert select_ranks(method, sigma, 1, bounds, gradient, hessian).order == [0], method
    linear_kept = select_ranks("linear", sigma, 1, bounds, gradient, hessian).kept
    linear = predicted_increase(linear_kept, sigma, gradient, hessian)
    assert select_ranks("sublora", sigma, 1, bounds, gradient, hessian).predicted_increase < linear / 4


def test_method_sets_and_missing_inputs():
    assert {m for m in METHODS if lookup(m).needs_calibration} == set(METHODS) - {"magnitude"}
    matrix = {"hessian", "sublora", "sublora-random", "exhaustive", "obs"}
    assert {m for m in METHODS if lookup(m).needs == "matrix"} == matrix
    sigma = torch.rand(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown method"):
        select_ranks("nope", sigma, 2, RankBounds.from_ranks([4]))
    with pytest.raises(ValueError, match="needs the full Hessian"):
        select_ranks("sublora", sigma, 2, RankBounds.from_ranks([4]), gradient=torch.zeros(4, dtype=torch.float64))


def test_predicted_increase_matches_direct_formula():
    sigma, gradient, hessian = problem(7, 6)
    kept = torch.tensor([True, False, True, False, False, True])
    expected = q({1, 3, 4}, sigma, gradient, hessian)
    assert predicted_increase(kept, sigma, gradient, hessian) == pytest.approx(expected)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_modules=st.integers(1, 4), extra=st.integers(0, 3))
def test_sigma_zero_components_are_kept_only_when_no_other_is_left(method, seed, n_modules, extra):
    """σ = 0 adds nothing (issue 9: an all-zero lora_B module was written at full rank with σ = 0): a dead component
    is kept only once every live one its module bounds allow is kept, for every method and gain sign."""
    ranks = random_ranks(seed, n_modules, 1, 4)
    inputs, sigma = all_inputs(seed, sum(ranks))
    rng = np.random.default_rng(seed)
    dead = torch.as_tensor(rng.uniform(size=sigma.numel()) < 0.4)
    dead[: ranks[0]] = True  # a whole module with lora_B = 0
    sigma = sigma.masked_fill(dead, 0.0)
    bounds = RankBounds.from_ranks(ranks, max_rank=1 + extra)
    budget = int(rng.integers(1, sum(ranks) + 1))
    assume_usable(method, inputs)
    kept = select_ranks(method, sigma, budget, bounds, **inputs).kept
    counts = module_counts(kept, bounds)
    room = [counts[m] < bounds.upper[m] for m in bounds.group.tolist()]
    open_live = [i for i in range(sigma.numel()) if not dead[i] and not kept[i] and room[i]]
    if bool((kept & dead).any()):
        assert open_live == []


@pytest.mark.parametrize("method", METHODS)
def test_an_all_zero_module_is_left_out_while_live_components_remain(method):
    sigma = torch.tensor([0.0, 0.0, 0.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    gradient = torch.tensor([0.5, -0.5, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    hessian = torch.eye(6, dtype=torch.float64)
    bounds = RankBounds.from_ranks([3, 3])
    selection = select_ranks(method, sigma, 3, bounds, gradient=gradient, hessian=hessian)
    assert not bool(selection.kept[:3].any())
