"""`sublora sweep` as a new user meets it: budgets at or above the adapter's size, the plot's labels and legend, and
sizes shown in the unit the user typed (the figure is read back from the matplotlib object that was saved)."""

from __future__ import annotations

import json

import pytest
from test_prune_calibrated import make_problem

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """The tiny MLP of test_prune_calibrated: rank 4 on fc1 (12×3) and fc2 (12×12), float32: 624 bytes."""
    return make_problem(tmp_path_factory.mktemp("sweep") / "problem")


def legend_texts(figure) -> list[str]:
    return [t.get_text() for legend in figure.legends for t in legend.get_texts()]


@pytest.mark.parametrize("budgets", ["4,20", "0.2KB,0.5KB,0.8KB"])
def test_budgets_at_or_above_the_adapter_are_swept_not_a_crash(problem, tmp_path, run_cli, budgets):
    adapter, calib = problem
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", budgets, "--methods", "magnitude,sublora", "-o", out
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"sweep.csv", "sweep.json", "sweep.png"}
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert {r["rank_after"] for r in rows if r["budget"] == max(r["budget"] for r in rows)} == {8}
    message = " ".join(result.stderr.split())
    assert "at least the whole adapter (total rank 8), so nothing is pruned there" in message
    assert "all kept" in result.stdout


def test_sweep_plot_labels_legend_and_the_users_size_unit(problem, tmp_path, run_cli, saved_figures):
    adapter, calib = problem
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "0.2KB:0.5KB:0.3KB", "--methods", "magnitude,sublora",
        "-o", out,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    table = " ".join(result.stdout.split())
    assert "0.2 KB" in table and "0.5 KB" in table and " 200 " not in table
    (figure, path), *_ = [(f, p) for f, p in saved_figures if str(p).endswith("sweep.png")]
    loss_axis, metric_axis = figure.axes
    assert loss_axis.get_ylabel() == "calibration loss after pruning"  # not the last curve's name
    assert metric_axis.get_ylabel() == "mse after pruning"
    assert loss_axis.get_xlabel() == "budget: size of the written adapter (KB)"
    for line in loss_axis.get_lines():
        if line.get_label() in ("magnitude", "sublora"):
            assert list(line.get_xdata()) == pytest.approx([0.2, 0.5])
    # the legend is the figure's, outside the panels, so no curve is hidden under it
    assert loss_axis.get_legend() is None and metric_axis.get_legend() is None
    texts = legend_texts(figure)
    assert texts[:2] == ["magnitude", "sublora"] and "before pruning" in texts
    assert "dotted: kept σ as trained (no refit)" in texts
    legend_box = figure.legends[0].get_window_extent()
    for axis in figure.axes:
        assert not legend_box.overlaps(axis.get_window_extent())


def test_rank_axis_is_labelled_as_ranks(problem, tmp_path, run_cli, saved_figures):
    adapter, calib = problem
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "2,4", "--methods", "sublora", "--no-refit",
        "--no-evaluate", "-o", tmp_path / "s",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    figure = saved_figures[-1][0]
    (axis,) = figure.axes
    assert axis.get_xlabel() == "budget (total rank kept)"
    assert "dotted: kept σ as trained (no refit)" not in legend_texts(figure)
