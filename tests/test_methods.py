"""The method registry drives the curvature choice, the flag checks and the help; budgets are costs and a
capacity; a prediction comes only from the method's own model of the loss, the same in `prune` and `sweep`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_prune_calibrated import make_problem, read_report

from sublora_cli.commands.sweep import DEFAULT_METHODS
from sublora_cli.core.budget import Budget
from sublora_cli.core.methods import METHODS, REGISTRY, lookup, most_demanding
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import select
from sublora_cli.errors import SubloraError
from sublora_cli.model.curvature import AUTO_MAX_HVPS, Curvature, choose_kind, resolve_kind
from sublora_cli.pipeline.curvature_choice import check_curvature, check_method

AUTO_KIND = {"none": "none", "gradient": "fisher", "diagonal": "diag", "matrix": "exact"}  # within the HVP limit


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> tuple[Path, Path]:
    return make_problem(tmp_path_factory.mktemp("methods") / "problem")


@pytest.mark.parametrize("name", METHODS)
def test_auto_computes_what_the_registry_says_the_method_needs(name):
    need = lookup(name).needs
    assert choose_kind(10, 4, name)[0] == AUTO_KIND[need]
    assert resolve_kind("auto", 10, 4, [name])[0] == AUTO_KIND[need]
    if need in ("diagonal", "matrix"):  # past the HVP limit: the Fisher's single pass per batch
        assert choose_kind(AUTO_MAX_HVPS + 1, 1, name)[0] == "fisher"


def test_most_demanding_need_decides_a_sweep_and_data_free_methods_get_no_curvature():
    assert most_demanding(["magnitude"]) == "none" and most_demanding(["magnitude", "linear"]) == "gradient"
    assert most_demanding(["linear", "diag", "sublora"]) == "matrix"
    assert resolve_kind("exact", 10, 4, ["magnitude"])[0] == "none"  # it would not be used


def test_the_diag_reason_describes_the_diagonal():
    kind, reason = choose_kind(100, 4, "diag")
    assert kind == "diag" and "diagonal" in reason and "400" in reason
    assert "Hessian-vector products, within the" not in reason  # the full-Hessian wording


@pytest.mark.parametrize("name", METHODS)
def test_flag_checks_follow_the_registry(name):
    entry = lookup(name)
    check_method(name, Path("calib.py"), "auto")  # every method accepts a calibration script
    if entry.needs_calibration:
        with pytest.raises(SubloraError, match="needs a calibration script"):
            check_method(name, None, "auto")
    else:
        check_method(name, None, "auto")
    if entry.needs == "matrix":
        with pytest.raises(SubloraError, match="needs the full Hessian"):
            check_curvature(name, "diag")
    else:
        check_curvature(name, "diag")


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of magnitude, linear"):
        lookup("no-such-method")


def test_help_and_default_sweep_list_the_registry(run_cli):
    assert DEFAULT_METHODS == tuple(n for n, m in REGISTRY.items() if m.in_default_sweep)
    assert "exhaustive" not in DEFAULT_METHODS
    for command in ("prune", "sweep"):
        text = " ".join(run_cli(command, "--help").stdout.split())
        assert all(name in text for name in METHODS), command


def test_the_fisher_drops_the_gradient_for_methods_that_use_its_matrix():
    g, H = torch.tensor([1.0, -2.0]), torch.eye(2)
    fisher = Curvature("fisher", 0.0, g, H, H.diagonal(), 0.0, notes=("about F",))
    for name in METHODS:
        dropped = not fisher.selection_inputs(name)["gradient"].any()
        assert dropped == lookup(name).needs_at_least("diagonal"), name
    assert fisher.notes_for(["magnitude", "linear"]) == [] and fisher.notes_for(["diag"]) == ["about F"]


def test_budget_is_validated():
    with pytest.raises(ValueError, match="must be 0 or more"):
        Budget.ranks(-1, 4)
    with pytest.raises(ValueError, match="positive"):
        Budget(torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="float64"):
        Budget(torch.ones(3), 1.0)
    sigma = torch.rand(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="prices 3 components but sigma has 4"):
        select("magnitude", sigma, Budget.ranks(2, 3), RankBounds.from_ranks([4]))


def _inputs(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return {"gradient": torch.randn(n, generator=g, dtype=torch.float64) * 0.1, "hessian": m @ m.T / n}


@pytest.mark.parametrize("name", METHODS)
def test_scaling_every_cost_and_the_capacity_together_changes_nothing(name):
    sigma = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    bounds = RankBounds.from_ranks([3, 5], min_rank=1, max_rank=4)
    ranks = select(name, sigma, Budget.ranks(5, 8), bounds, **_inputs(8))
    doubled = Budget(torch.full((8,), 2.0, dtype=torch.float64), 10.0, unit="bytes")
    scaled = select(name, sigma, doubled, bounds, **_inputs(8))
    assert scaled.order == ranks.order and torch.equal(scaled.kept, ranks.kept)


def test_greedy_stops_when_nothing_eligible_is_affordable():
    sigma = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    cost = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    selection = select("magnitude", sigma, Budget(cost, 5.0, unit="bytes"), RankBounds.from_ranks([5]))
    assert selection.order == [2, 3, 0]  # σ per cost: 2, 3, then 0 fills the rest exactly; 4 is then unaffordable


def test_lower_bounds_are_reserved_in_cost_terms():
    sigma = torch.tensor([5.0, 4.0, 3.0, 0.5], dtype=torch.float64)
    cost = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)  # module 1 (component 3) costs 2
    bounds = RankBounds.from_ranks([3, 1], min_rank=1)
    selection = select("magnitude", sigma, Budget(cost, 4.0, unit="bytes"), bounds)
    assert selection.kept.tolist() == [True, True, False, True]  # 2 of the 4 reserved for module 1
    with pytest.raises(ValueError, match="need 3 bytes in total, more than the budget of 2"):
        select("magnitude", sigma, Budget(cost, 2.0, unit="bytes"), bounds)


@pytest.mark.parametrize("name", ["sublora-random", "obs"])
def test_searches_defined_by_a_count_refuse_unequal_costs(name):
    sigma = torch.rand(4, dtype=torch.float64) + 0.1
    cost = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="all cost the same.*Use --method sublora"):
        select(name, sigma, Budget(cost, 3.0, unit="bytes"), RankBounds.from_ranks([4]), **_inputs(4))


def test_magnitude_with_a_calibration_script_measures_without_curvature(problem, tmp_path, run_cli):
    adapter, calib = problem
    result = run_cli("prune", adapter, "--calib", calib, "-m", "magnitude", "-b", 3, "--no-refit", "-o", tmp_path / "m")
    assert result.code == 0, result.stderr
    report = read_report(tmp_path / "m")
    assert report["curvature"] is None and report["diagnostics"] is None
    loss = report["loss"]
    assert loss["after"] > loss["before"] > 0
    assert loss["predicted_increase"] is None and loss["predicted_with"] is None
    assert set(report["metrics"]["after"]) == {"mse"}
    assert run_cli("prune", adapter, "-b", 3, "-o", tmp_path / "d").code == 0  # the same choice without data
    data_free = read_report(tmp_path / "d")
    assert [m["kept"] for m in data_free["modules"]] == [m["kept"] for m in report["modules"]]


def test_prune_and_sweep_predict_the_same_for_the_same_kept_set(problem, tmp_path, run_cli):
    adapter, calib = problem
    methods = ["magnitude", "linear", "diag", "hessian", "sublora"]
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "4", "--methods", ",".join(methods), "--curvature", "exact",
        "--no-evaluate", "--json", "-o", tmp_path / "sweep",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    for name in methods:
        out = tmp_path / name
        code = run_cli("prune", adapter, "--calib", calib, "-m", name, "-b", 4, "--curvature", "exact", "-o", out).code
        assert code == 0
        loss = read_report(out)["loss"]
        predicted = rows[name]["predicted_increase"]
        if lookup(name).prediction == "none":
            assert predicted is None and loss["predicted_increase"] is None and loss["predicted_with"] is None
        else:
            assert predicted == pytest.approx(loss["predicted_increase"], rel=1e-9)
            assert loss["predicted_with"] == "exact"
