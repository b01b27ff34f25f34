"""The refit in the pipeline (issue 13): `prune --calib` refits the kept σ by default and writes them, the file
reloads in peft with the loss the report promises, --no-refit writes the σ as trained, `obs` runs through the
CLI within its bounds, the report and `sweep` show the loss before and after the refit, and a pruned adapter
worse than none is flagged."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from test_faithful import reloaded
from test_prune_calibrated import CALIB, make_problem, read_report

from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.core.methods import lookup

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
REFIT_KEYS = {"accepted", "damping", "step", "predicted_change", "measured_change", "evaluations"}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return make_problem(tmp_path_factory.mktemp("refit") / "problem")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The shipped elliptic adapter_k2 (two modules of rank 50) and its calib on the first batch only."""
    from test_faithful import CALIB_ONE_BATCH, SAMPLE

    calib = tmp_path_factory.mktemp("sample") / "calib_k2_one_batch.py"
    calib.write_text(CALIB_ONE_BATCH)
    return SAMPLE / "adapter_k2", calib


@pytest.mark.parametrize(
    ("method", "budget"),
    [("sublora", "60"), ("obs", "99")],  # 99 of 2 × 50: one module keeps everything, its refit σ must be written
    ids=["sublora", "obs-with-a-full-module"],
)
def test_the_refit_is_written_and_reloads_in_peft_with_the_reported_loss(sample, method, budget, tmp_path):
    adapter, calib = sample
    options = PruneOptions(budget=budget, calib=calib, method=method, dtype="float64")
    report = prune(adapter, options, out_dir=tmp_path / "out").report
    loss, refit = report["loss"], report["refit"]
    assert set(refit) == REFIT_KEYS and refit["accepted"] and refit["evaluations"] >= 1
    assert loss["after"] < loss["after_selection"]
    assert refit["measured_change"] == pytest.approx(loss["after"] - loss["after_selection"])
    loss_after, metrics_after = reloaded(tmp_path / "out", calib, torch.float64)
    assert loss["after"] == pytest.approx(loss_after, rel=1e-5)
    assert report["metrics"]["after"]["rel_l2"] == pytest.approx(metrics_after["rel_l2"], rel=1e-5)
    if budget == "99":
        full = [m for m in report["modules"] if m["rank_after"] == m["rank_before"]]
        assert full and all(m["sigma"] != m["sigma_before"] for m in full)  # refit σ, not a bit-exact copy
        original, written = load_file(str(adapter / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
        assert any(not torch.equal(original[k], written[k]) for k in original if "fc1" in k or "fc2" in k)


def test_the_refit_is_on_by_default_and_never_worse_than_the_selection(problem, tmp_path, run_cli):
    adapter, calib = problem
    for method in ("sublora", "hessian", "linear", "diag", "magnitude", "obs"):
        out = tmp_path / method
        result = run_cli("prune", adapter, "--calib", calib, "-m", method, "-b", 3, "-o", out)
        assert result.code == 0, result.stderr
        report = read_report(out)
        assert set(report["refit"]) == REFIT_KEYS and report["options"]["refit"] is True
        assert report["timings"]["refit"] > 0
        assert report["loss"]["after"] <= report["loss"]["after_selection"]
        assert report["curvature"] is not None  # magnitude too: the refit steps with the curvature
        assert "refit:" in result.stdout and "loss without the adapter" in result.stdout
        markdown = (out / "sublora_report.md").read_text()
        assert "- refit:" in markdown and "- loss without the adapter (every σ = 0)" in markdown


def test_no_refit_writes_the_kept_sigma_as_trained(problem, tmp_path, run_cli):
    adapter, calib = problem
    args = ("prune", adapter, "-m", "magnitude", "-b", 3)
    assert run_cli(*args, "--calib", calib, "--no-refit", "-o", tmp_path / "off").code == 0
    assert run_cli(*args, "-o", tmp_path / "free").code == 0  # no data: the output of the σ as trained
    off, free = load_file(str(tmp_path / "off" / WEIGHTS)), load_file(str(tmp_path / "free" / WEIGHTS))
    assert off.keys() == free.keys() and all(torch.equal(off[k], free[k]) for k in off)
    report = read_report(tmp_path / "off")
    assert report["refit"] is None and report["curvature"] is None
    assert report["loss"]["after"] == report["loss"]["after_selection"]
    assert "refit: off" in (tmp_path / "off" / "sublora_report.md").read_text()

    result = run_cli("prune", adapter, "--calib", calib, "-m", "obs", "-b", 3, "--no-refit", "-o", tmp_path / "obs")
    assert result.code == 0, result.stderr
    assert "counting on the refit" in result.stderr  # obs chose its kept set for a refit that does not run
    for m in read_report(tmp_path / "obs")["modules"]:
        assert m["sigma"] == [m["sigma_before"][i] for i in m["kept"]]


def test_refit_can_be_turned_off_in_the_config(problem, tmp_path, run_cli):
    adapter, calib = problem
    config = tmp_path / "prune.yaml"
    config.write_text(f"adapter: {adapter}\ncalib: {calib}\nbudget: 3\nrefit: false\n")
    assert run_cli("prune", "--config", config, "-o", tmp_path / "out").code == 0
    assert read_report(tmp_path / "out")["refit"] is None
    assert run_cli("prune", "--config", config, "--refit", "-o", tmp_path / "flag").code == 0  # the flag wins
    assert read_report(tmp_path / "flag")["refit"] is not None


def test_obs_runs_through_the_cli_within_its_bounds(problem, tmp_path, run_cli):
    adapter, calib = problem
    assert lookup("obs").compensates and lookup("obs").prediction == "compensated"
    args = ("-m", "obs", "-b", 5, "--min-rank", 2, "--max-rank", 3, "-o", tmp_path / "obs")
    result = run_cli("prune", adapter, "--calib", calib, *args)
    assert result.code == 0, result.stderr
    report = read_report(tmp_path / "obs")
    ranks = [m["rank_after"] for m in report["modules"]]
    assert sum(ranks) == 5 and all(2 <= r <= 3 for r in ranks)
    assert report["loss"]["predicted_increase"] is not None and report["loss"]["predicted_with"] == "exact"
    refused = run_cli("prune", adapter, "--calib", calib, "-m", "obs", "-b", 3, "--min-rank", 2, "-o", tmp_path / "x")
    assert refused.code == 1 and "minimum ranks need" in refused.stderr
    assert run_cli("prune", adapter, "-m", "obs", "-b", 3, "-o", tmp_path / "y").code == 1  # it needs --calib


def test_sweep_reports_the_loss_before_and_after_the_refit(problem, tmp_path, run_cli):
    adapter, calib = problem
    methods = "magnitude,sublora,obs"
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "3,5", "--methods", methods, "--no-evaluate", "--json",
        "-o", tmp_path / "sweep",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert {r["method"] for r in rows} == set(methods.split(",")) and len(rows) == 6
    for r in rows:
        assert r["refit_accepted"] is not None and r["loss_after"] <= r["loss_after_selection"]
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        header = next(csv.reader(f))
    assert {"loss_after_selection", "loss_after", "refit_accepted"} <= set(header)
    table = run_cli("sweep", adapter, "--calib", calib, "--budgets", "3", "--methods", "sublora", "--no-evaluate",
                    "-o", tmp_path / "table")  # fmt: skip
    assert "loss selected" in table.stdout and "loss refit" in table.stdout

    off = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "3", "--methods", "sublora", "--no-refit", "--no-evaluate",
        "--json", "-o", tmp_path / "off",
    )  # fmt: skip
    row = json.loads(off.stdout)["rows"][0]
    assert row["refit_accepted"] is None and row["loss_after"] == row["loss_after_selection"]


def test_a_pruned_adapter_worse_than_none_is_flagged(tmp_path, run_cli):
    """A script whose target is the base model itself: every σ = 0 is the optimum, so any adapter is worse."""
    harmful = CALIB.replace("return torch.sin(x.sum(-1, keepdim=True))", "return load_model()(x).detach()")
    adapter, calib = make_problem(tmp_path / "problem", harmful)
    result = run_cli("prune", adapter, "--calib", calib, "-b", 6, "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    loss = read_report(tmp_path / "out")["loss"]
    assert loss["without_adapter"] == pytest.approx(0.0, abs=1e-12) and loss["after"] > loss["without_adapter"]
    assert "worse than no adapter at all" in result.stderr
    assert "WARNING: the pruned adapter is worse than no adapter at all" in result.stdout


def test_auto_computes_the_matrix_the_refit_steps_with(problem, tmp_path, run_cli):
    adapter, calib = problem
    args = ("sweep", adapter, "--calib", calib, "--budgets", "3", "--methods", "magnitude", "--no-evaluate", "--json")
    on = json.loads(run_cli(*args, "-o", tmp_path / "on").stdout)
    off = json.loads(run_cli(*args, "--no-refit", "-o", tmp_path / "off").stdout)
    assert on["curvature"] == "exact" and "refit of the kept σ steps with it" in on["curvature_reason"]
    assert off["curvature"] is None
