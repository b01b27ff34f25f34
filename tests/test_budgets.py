"""Budgets in bytes and parameters (syntax, pricing, knapsack selection against brute force) and `--budget auto`."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli_errors import PREFIX, assert_usage_error, write_adapter
from test_prune_calibrated import problem, read_report  # noqa: F401 (a fixture)
from test_select import problem as quadratic_problem
from test_select import q

from sublora_cli.core.autobudget import smallest_within
from sublora_cli.core.budget import Budget, BudgetSpec, Pricing, budget_unit, read_budget, resolve_budget
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import Selection, select
from sublora_cli.errors import SubloraError
from sublora_cli.formats import read_adapter
from sublora_cli.pipeline.budgeting import adapter_pricing

torch.set_num_threads(1)


# syntax


@pytest.mark.parametrize(
    "text, reading, value",
    [
        ("12MiB", "bytes", 12 * 2**20),
        ("500KB", "bytes", 500_000),
        ("500kB", "bytes", 500_000),
        ("1.5GB", "bytes", 1_500_000_000),
        ("2KiB", "bytes", 2048),
        ("700B", "bytes", 700),
        ("12 MiB", "bytes", 12 * 2**20),
        ("2.5M", "params", 2_500_000),
        ("300k", "params", 300_000),
        ("1G", "params", 10**9),
        ("50", "rank", 50),
        ("25%", "percentage", 0.25),
        ("0.25", "fraction", 0.25),
        ("auto", "auto", 0),
    ],
)
def test_budget_forms(text, reading, value):
    assert read_budget(text) == BudgetSpec(reading, value)


@pytest.mark.parametrize("text", ["12mb", "12Mb", "2m", "3b", "1.5Mib", "5 kg", "0MB", "-1KiB"])
def test_ambiguous_or_unknown_sizes_are_usage_errors_naming_the_forms(tmp_path, run_cli, text):
    path = write_adapter(tmp_path / "a")
    result = run_cli("prune", path, "--budget", text, "--out", tmp_path / "o")
    assert_usage_error(result, "--budget")
    if text not in ("0MB", "-1KiB"):
        assert_usage_error(result, "12MiB", "2.5M", "powers of 1000", "powers of 1024")


def test_a_unit_that_contradicts_the_budget_is_refused():
    assert budget_unit(read_budget("12MiB"), None) == "bytes"
    assert budget_unit(read_budget("25%"), "params") == "params"
    assert budget_unit(read_budget("25%"), None) == "rank"
    with pytest.raises(SubloraError, match="count of bytes but --budget-unit says params"):
        budget_unit(read_budget("12MiB"), "params")


# pricing


def test_a_component_costs_out_plus_in_parameters_times_the_element_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{PREFIX}conv.lora_A.weight": torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float16),  # in 3, k 3
        f"{PREFIX}conv.lora_B.weight": torch.randn(8, 2, 1, 1, generator=g, dtype=torch.float16),  # out 8
        f"{PREFIX}lin.lora_A.weight": torch.randn(2, 4, generator=g),
        f"{PREFIX}lin.lora_B.weight": torch.randn(3, 2, generator=g),
        f"{PREFIX}head.weight": torch.randn(5, 5, generator=g),  # modules_to_save: carried whole
    }
    adapter = read_adapter(write_adapter(tmp_path / "a", tensors, {"target_modules": ["conv", "lin"]}))
    pricing = adapter_pricing(adapter)
    assert pricing.costs("params").tolist() == [3 * 3 * 3 + 8] * 2 + [3 + 4] * 2
    assert pricing.costs("bytes").tolist() == [35 * 2] * 2 + [7 * 4] * 2
    assert pricing.costs("rank").tolist() == [1.0] * 4
    assert pricing.fixed("bytes") == 25 * 4 and pricing.fixed("params") == 0


def test_carried_tensors_are_paid_first_and_a_share_is_of_the_whole_file():
    pricing = Pricing(ranks=[2, 2], widths=[10, 20], element_sizes=[4, 4], carried_bytes=100)  # 240 + 100 bytes
    assert resolve_budget(read_budget("300B"), "bytes", pricing).capacity == 200
    assert resolve_budget(read_budget("50%"), "bytes", pricing).capacity == 340 / 2 - 100
    assert resolve_budget(read_budget("50%"), "params", pricing).capacity == 30
    assert resolve_budget(read_budget("3"), "rank", pricing).capacity == 3
    with pytest.raises(SubloraError, match="less than the 100 bytes of the tensors the adapter carries"):
        resolve_budget(read_budget("99B"), "bytes", pricing)


# knapsack selection against brute force


def knapsack_problem(seed: int, n_modules: int, kind: str):
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 4, n_modules).tolist()
    n = sum(ranks)
    sigma, gradient, hessian = quadratic_problem(seed, n, kind)
    per_module = rng.integers(1, 6, n_modules).astype(float)
    cost = torch.tensor(np.repeat(per_module, ranks), dtype=torch.float64)
    capacity = min(float(rng.uniform(cost.min(), cost.sum())), float(cost.sum()) - 0.5)  # not everything: that
    # keeps everything by definition
    return ranks, sigma, gradient, hessian, Budget(cost, capacity, unit="bytes")


def brute_force(n: int, value, budget: Budget, bounds: RankBounds) -> float:
    """The best value over every affordable kept set within the bounds."""
    best = -math.inf
    for size in range(n + 1):
        for kept in itertools.combinations(range(n), size):
            counts = torch.bincount(bounds.group[list(kept)], minlength=bounds.lower.numel())
            if bool((counts > bounds.upper).any() or (counts < bounds.lower).any()):
                continue
            if float(budget.cost[list(kept)].sum()) <= budget.capacity:
                best = max(best, value(set(kept)))
    return best


def spent(selection: Selection, budget: Budget) -> float:
    return float(budget.cost[selection.kept].sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.booleans())
def test_exhaustive_is_the_knapsack_optimum(seed, n_modules, with_bounds):
    ranks, sigma, gradient, hessian, budget = knapsack_problem(seed, n_modules, "general")
    n = sum(ranks)
    bounds = RankBounds.from_ranks(ranks, max_rank=2 if with_bounds else None)
    selection = select("exhaustive", sigma, budget, bounds, gradient, hessian)
    everything = set(range(n))
    best = brute_force(n, lambda kept: -q(everything - kept, sigma, gradient, hessian), budget, bounds)
    assert -selection.predicted_increase == pytest.approx(best, abs=1e-9)
    assert spent(selection, budget) <= budget.capacity


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_the_knapsack_greedy_keeps_its_guarantee_on_monotone_submodular_problems(seed, n_modules):
    """g = 0, H ≥ 0 entrywise and PSD: f(S) − f(∅) = q(N) − q(N∖S) is monotone submodular, so the best of the
    density greedy and the best-single start is within ½(1 − 1/e) of the knapsack optimum."""
    ranks, sigma, gradient, hessian, budget = knapsack_problem(seed, n_modules, "submodular")
    n = sum(ranks)
    bounds = RankBounds.from_ranks(ranks)
    everything = q(set(range(n)), sigma, gradient, hessian)
    value = lambda kept: everything - q(set(range(n)) - kept, sigma, gradient, hessian)  # noqa: E731
    optimum = brute_force(n, value, budget, bounds)
    for method in ("sublora", "hessian"):
        selection = select(method, sigma, budget, bounds, gradient, hessian)
        assert spent(selection, budget) <= budget.capacity + 1e-9
        assert everything - selection.predicted_increase >= 0.5 * (1 - 1 / math.e) * optimum - 1e-9


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_magnitude_per_cost_is_within_half_of_the_modular_optimum(seed, n_modules):
    ranks, sigma, _, _, budget = knapsack_problem(seed, n_modules, "general")
    n = sum(ranks)
    bounds = RankBounds.from_ranks(ranks)
    optimum = brute_force(n, lambda kept: float(sigma[list(kept)].sum()), budget, bounds)
    selection = select("magnitude", sigma, budget, bounds)
    assert float(sigma[selection.kept].sum()) >= 0.5 * optimum - 1e-9


def test_the_best_single_element_beats_a_density_greedy_that_fills_up_on_crumbs():
    sigma = torch.tensor([10.0, 1.0, 1.0], dtype=torch.float64)
    budget = Budget(torch.tensor([10.0, 1.0, 1.0], dtype=torch.float64), 10.0, unit="bytes")
    selection = select("magnitude", sigma, budget, RankBounds.from_ranks([1, 1, 1]))
    assert selection.kept.tolist() == [True, False, False]  # density: 1, 2 (σ/cost 1 ≥ 1), then 0 unaffordable


@pytest.mark.parametrize("method", ["magnitude", "linear", "diag", "hessian", "sublora", "exhaustive"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_modules=st.integers(1, 3), min_rank=st.integers(0, 1))
def test_every_method_honours_costs_and_bounds(method, seed, n_modules, min_rank):
    ranks, sigma, gradient, hessian, budget = knapsack_problem(seed, n_modules, "general")
    bounds = RankBounds.from_ranks(ranks, min_rank=min_rank, max_rank=2)
    floor = float((budget.cost[torch.tensor(np.cumsum([0, *ranks[:-1]]))] * bounds.lower).sum())
    budget = Budget(budget.cost, max(budget.capacity, floor), unit="bytes")
    selection = select(method, sigma, budget, bounds, gradient, hessian)
    counts = torch.bincount(bounds.group[selection.kept], minlength=len(ranks))
    assert spent(selection, budget) <= budget.capacity + 1e-9
    assert bool((counts >= bounds.lower).all() and (counts <= bounds.upper).all())


# the auto budget


def test_the_auto_search_finds_the_smallest_passing_capacity_in_few_evaluations():
    """A measured increase that falls with the kept rank; the model is off by a factor of 3."""
    n = 400
    costs = torch.ones(n, dtype=torch.float64)
    evaluations = []

    def choose(budget: Budget) -> Selection:
        kept = torch.arange(n) < int(budget.capacity)
        return Selection(kept, [], predicted_increase=((n - budget.capacity) / n) ** 2 / 3, diagnostics=None)

    def measure(kept: torch.Tensor) -> float:
        evaluations.append(int(kept.sum()))
        return 1.0 + ((n - float(kept.sum())) / n) ** 2

    result = smallest_within(0.0101, costs, 0.0, choose, measure, 1.0, "rank")
    assert result.capacity == 360  # (40/400)² = 0.01 passes, (41/400)² = 0.0105 does not
    assert len(result.evaluations) == len(evaluations) <= 12
    assert all(e.passed == (e.measured <= 0.0101) for e in result.evaluations)
    assert [point["capacity"] for point in result.curve] == sorted(point["capacity"] for point in result.curve)


def test_budget_auto_needs_max_loss_increase_and_a_missing_budget_is_a_usage_error(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    assert_usage_error(run_cli("prune", path, "--budget", "auto"), "--max-loss-increase")
    assert_usage_error(run_cli("prune", path), "--budget is required", "--max-loss-increase")
    assert_usage_error(run_cli("prune", path, "--budget-unit", "kg", "-b", "1"), "--budget-unit")


def test_prune_with_max_loss_increase_alone_keeps_the_smallest_adapter_within_it(problem, tmp_path, run_cli):  # noqa: F811
    adapter, calib = problem
    out = tmp_path / "auto"
    result = run_cli("prune", adapter, "--calib", calib, "--max-loss-increase", "5%", "-o", out)
    assert result.code == 0, result.stderr
    report = read_report(out)
    budget, loss = report["budget"], report["loss"]
    search = budget["search"]
    assert budget["reading"] == "auto" and budget["unit"] == "rank"
    assert loss["relative_increase"] <= 0.05 and report["quality"]["passed"]
    assert 1 <= len(search["evaluations"]) <= 12 and search["curve"]
    chosen = report["totals"]["rank_after"]
    assert chosen == budget["used"] == budget["resolved"]
    smaller = [e for e in search["evaluations"] if e["rank"] == chosen - 1]
    assert chosen == 1 or (smaller and not smaller[0]["passed"])  # one less was measured and failed
    assert "auto budget: smallest within 5.00%" in " ".join(result.stdout.split())


def test_prune_to_a_size_in_bytes(problem, tmp_path, run_cli):  # noqa: F811
    adapter, calib = problem  # fc1 12×3 and fc2 12×12, rank 4 each, float32: 60 and 96 bytes per component
    out = tmp_path / "bytes"
    result = run_cli("prune", adapter, "--calib", calib, "--budget", "400B", "-o", out)
    assert result.code == 0, result.stderr
    budget = read_report(out)["budget"]
    assert (budget["unit"], budget["capacity"], budget["whole"], budget["carried"]) == ("bytes", 400, 624, 0)
    assert budget["used"] <= 400 and budget["used"] > 400 - 96
    assert "used 336 B of 400 B allowed" in result.stdout or "of 400 B allowed" in result.stdout
    unit = run_cli("prune", adapter, "--budget", "50%", "--budget-unit", "params", "-o", tmp_path / "p")
    assert unit.code == 0, unit.stderr
    assert read_report(tmp_path / "p")["budget"]["capacity"] == 78


def test_carried_tensors_count_toward_a_bytes_budget(tmp_path, run_cli):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{PREFIX}lin.lora_A.weight": torch.randn(2, 4, generator=g),
        f"{PREFIX}lin.lora_B.weight": torch.randn(3, 2, generator=g),
        f"{PREFIX}head.weight": torch.randn(4, 4, generator=g),  # 64 bytes, written whatever is kept
    }
    path = write_adapter(tmp_path / "a", tensors)
    result = run_cli("prune", path, "--budget", "100B", "-o", tmp_path / "o")  # 64 carried + one component of 28
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "o" / "sublora_report.json").read_text())
    assert (report["budget"]["carried"], report["budget"]["used"], report["totals"]["rank_after"]) == (64, 92, 1)
    assert report["totals"]["carried_bytes"] == 64
    too_small = run_cli("prune", path, "--budget", "60B", "-o", tmp_path / "p")
    assert too_small.code == 1 and "carries whole" in " ".join(too_small.stderr.split())


def test_sublora_random_refuses_a_bytes_budget(problem, tmp_path, run_cli):  # noqa: F811
    adapter, calib = problem
    result = run_cli("prune", adapter, "--calib", calib, "-m", "sublora-random", "-b", "400B", "-o", tmp_path / "r")
    assert result.code == 1 and "all cost the same" in " ".join(result.stderr.split())


def test_a_budget_over_the_whole_file_is_a_warned_no_op(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    result = run_cli("prune", path, "--budget", "1MB", "-o", tmp_path / "o")
    assert result.code == 0 and "nothing to prune" in result.stderr


def test_sweep_over_sizes_in_bytes(problem, tmp_path, run_cli):  # noqa: F811
    adapter, calib = problem  # 624 bytes of factors
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "200B:600B:200B", "--methods", "magnitude,sublora",
        "--out", tmp_path / "sweep", "--json", "--no-evaluate",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["budgets"], data["budget_unit"]) == ([200, 400, 600], "bytes")
    assert {r["unit"] for r in data["rows"]} == {"bytes"} and len(data["rows"]) == 6
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    row = next(r for r in data["rows"] if r["budget"] == 400 and r["method"] == "sublora")
    run_cli("prune", adapter, "--calib", calib, "-b", "400B", "-o", tmp_path / "p")
    assert read_report(tmp_path / "p")["loss"]["after"] == pytest.approx(row["loss_after"], rel=1e-12)


@pytest.mark.parametrize("budgets", ["100KB:1MB", "100KB,50", "100KB:1M:100KB", "1MB:100KB:100KB"])
def test_malformed_size_axes_are_usage_errors(tmp_path, run_cli, budgets):
    result = run_cli("sweep", write_adapter(tmp_path / "a"), "--calib", tmp_path / "c.py", "--budgets", budgets)
    assert_usage_error(result, "--budgets")
