"""Held-out data (docs/design.md §4): the --holdout split, the script's heldout_batches(), batches that never reach a
gradient or a curvature, and decisions judged on data the pipeline did not fit."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_mlp import MODEL_SOURCE

from sublora_cli.model.holdout import HOLDOUT_AUTO, held_out_indices, read_holdout, split_batches
from sublora_cli.model.script import load_calibration

peft = pytest.importorskip("peft")

# A tiny MLP whose adapter was trained on plenty of clean data; the calibration set is 2 batches of 4 noisy samples,
# so the gradient at the adapter is mostly noise and a refit or a gradient term can fit it. heldout_batches() draws
# fresh noisy samples (the same task); HELDOUT marks them so the tests can see where they go.
OVERFIT = MODEL_SOURCE + """
NOISE = 0.3

def target(x):
    return torch.sin(2 * x.sum(-1, keepdim=True))

def draw(count, size, seed, heldout=False):
    g = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        x = torch.randn(size, 3, generator=g)
        y = target(x) + NOISE * torch.randn(size, 1, generator=g)
        result.append({"x": x, "y": y, "heldout": heldout})
    return result

def batches():
    return draw(2, 4, 0)

def heldout_batches():
    return draw(4, 64, 1, heldout=True)

def loss(model, batch):
    value = (model(batch["x"]) - batch["y"]).pow(2).mean()
    if batch["heldout"] and value.requires_grad:
        value.register_hook(HELDOUT_GUARD)
    return value

def per_sample_loss(model, batch):
    value = (model(batch["x"]) - batch["y"]).pow(2).mean(1)
    if batch["heldout"] and value.requires_grad:
        value.register_hook(HELDOUT_GUARD)
    return value

def HELDOUT_GUARD(grad):
    raise RuntimeError("a held-out batch was differentiated through")
"""


def make_overfit_problem(root: Path) -> tuple[Path, Path]:
    """The base model, the calibration script above and a rank-4 LoRA on fc1 and fc2 trained on 2,048 clean
    samples (so the adapter is good on the task, not on the calibration set's noise)."""
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.py"
    calib.write_text(textwrap.dedent(OVERFIT))
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = load_calibration(calib)
    base = module.load_model.__globals__["TinyMLP"]()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    model = peft.get_peft_model(
        module.load_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    )
    target = module.load_model.__globals__["target"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 3, generator=g)
    y = target(x)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(300):
        optimizer.zero_grad()
        rows = slice((step % 16) * 128, (step % 16 + 1) * 128)
        (model(x[rows]) - y[rows]).pow(2).mean().backward()
        optimizer.step()
    model.save_pretrained(str(root / "adapter"))
    return root / "adapter", calib


@pytest.fixture(scope="module")
def overfit(tmp_path_factory) -> tuple[Path, Path]:
    return make_overfit_problem(tmp_path_factory.mktemp("overfit"))


def report_of(result, out: Path) -> dict:
    assert result.code == 0, result.stderr
    return json.loads((out / "sublora_report.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# the split


def test_holdout_values_read_as_auto_or_a_fraction_below_one():
    assert read_holdout("auto") == HOLDOUT_AUTO
    assert read_holdout("25%") == pytest.approx(0.25)
    assert read_holdout(0) == 0.0
    for bad in ("1", "1.5", "-0.1", "half", "nan"):
        with pytest.raises(Exception, match="held out|fraction"):
            read_holdout(bad)


@pytest.mark.parametrize("count", [2, 3, 4, 7, 10, 33])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_the_split_is_deterministic_spread_and_never_empties_either_side(count, fraction):
    held = held_out_indices(count, fraction)
    assert held == held_out_indices(count, fraction)
    assert 1 <= len(held) <= count - 1 and len(set(held)) == len(held) and held == sorted(held)
    assert all(0 <= i < count for i in held)
    assert len(held) == min(max(1, round(fraction * count)), count - 1)


def test_auto_takes_the_scripts_heldout_batches_else_a_quarter_of_enough_batches():
    batches = list(range(8))
    own = split_batches(batches, HOLDOUT_AUTO, lambda: ["h1", "h2"])
    assert (own.fit, own.heldout, own.source) == (batches, ["h1", "h2"], "script")
    quarter = split_batches(batches, HOLDOUT_AUTO)
    assert quarter.heldout == [2, 6] and quarter.fit == [0, 1, 3, 4, 5, 7] and quarter.source == "split"
    few = split_batches(batches[:3], HOLDOUT_AUTO)
    assert (few.fit, few.heldout, few.source) == ([0, 1, 2], [], "none") and "too few" in few.note
    asked = split_batches(batches[:3], 0.3, lambda: pytest.fail("an explicit fraction splits batches()"))
    assert asked.heldout == [1] and "not used" in asked.note
    nothing = split_batches(batches, 0.0, lambda: pytest.fail("--holdout 0 holds nothing out"))
    assert (nothing.fit, nothing.heldout) == (batches, [])


@pytest.mark.parametrize("value", ["1", "abc", "-0.5"])
def test_a_malformed_holdout_is_a_usage_error(overfit, tmp_path, run_cli, value):
    adapter, calib = overfit
    result = run_cli("prune", adapter, "--calib", calib, "--budget", 4, "--holdout", value, "--out", tmp_path / "o")
    assert result.code == 2 and "--holdout" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# held-out batches are measured, never fitted


@pytest.mark.parametrize("curvature", ["exact", "fisher", "diag", "auto"])
def test_heldout_batches_never_reach_a_gradient_or_a_curvature(overfit, tmp_path, run_cli, curvature):
    """The script's loss registers a hook on every held-out loss that raises when it is back-propagated: the
    curvature, the refit, the budget search and the judged candidates all run, and none differentiates one."""
    adapter, calib = overfit
    method = "diag" if curvature == "diag" else "sublora"
    out = tmp_path / "out"
    args = ("--calib", calib, "--method", method, "--curvature", curvature, "--max-loss-increase", "50%")
    report = report_of(run_cli("prune", adapter, *args, "--out", out), out)
    assert report["loss"]["heldout"]["batches"] == 4
    assert "heldout_batches()" in report["loss"]["heldout"]["split"]


def test_eval_reports_the_heldout_loss(overfit, run_cli):
    adapter, calib = overfit
    result = run_cli("eval", adapter, "--calib", calib, "--json")
    assert result.code == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["heldout_batches"] == 4 and measured["heldout_loss"] > 0


# ---------------------------------------------------------------------------------------------------------------
# decisions judged on held-out data


@pytest.mark.parametrize("budget", ["25%", "50%", "75%"])
def test_the_default_is_never_worse_than_magnitude_on_heldout_data(overfit, tmp_path, run_cli, budget):
    adapter, calib = overfit
    default = report_of(run_cli("prune", adapter, "--calib", calib, "-b", budget, "-o", tmp_path / "d"), tmp_path / "d")
    magnitude = report_of(
        run_cli("prune", adapter, "--calib", calib, "-b", budget, "-m", "magnitude", "-o", tmp_path / "m"),
        tmp_path / "m",
    )
    assert default["loss"]["heldout"]["after"] <= magnitude["loss"]["heldout"]["after"]
    candidates = default["candidates"]
    assert [c["method"] for c in candidates] == ["sublora", "sublora", "magnitude"]
    assert [c["curvature"] for c in candidates] == ["exact", "fisher", "exact"]
    assert sum(c["chosen"] for c in candidates) == 1
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen["heldout_after"] == min(c["heldout_after"] for c in candidates) == default["loss"]["heldout"]["after"]


def test_the_refit_never_raises_the_heldout_loss(overfit, tmp_path, run_cli):
    adapter, calib = overfit
    for budget in ("25%", "50%", "75%"):
        out = tmp_path / budget
        loss = report_of(run_cli("prune", adapter, "--calib", calib, "-b", budget, "-m", "sublora", "-o", out), out)
        heldout = loss["loss"]["heldout"]
        assert heldout["after"] <= heldout["after_selection"]


def test_holdout_0_decides_on_the_calibration_loss_alone(overfit, tmp_path, run_cli):
    adapter, calib = overfit
    out = tmp_path / "out"
    report = report_of(run_cli("prune", adapter, "--calib", calib, "-b", "50%", "--holdout", "0", "-o", out), out)
    assert report["loss"]["heldout"] is None and report["candidates"] is None
    assert report["refit"]["heldout_change"] is None and report["refit"]["rejected_on_heldout"] == 0


def test_the_overfit_warning_fires_when_the_calibration_loss_falls_and_the_heldout_loss_rises(
    overfit, tmp_path, run_cli
):
    adapter, calib = overfit
    out = tmp_path / "out"
    result = run_cli("prune", adapter, "--calib", calib, "-b", "50%", "-o", out)
    loss = report_of(result, out)["loss"]
    assert loss["after"] < loss["before"] and loss["heldout"]["after"] > loss["heldout"]["before"]
    assert "the calibration loss fell below the unpruned adapter's" in result.stderr
    assert "WARNING: the calibration loss fell while the held-out loss rose" in result.stdout
    assert "held-out loss" in (out / "sublora_report.md").read_text()


def heldout_loss_of(adapter: Path, calib: Path, run_cli) -> float:
    result = run_cli("eval", adapter, "--calib", calib, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)["heldout_loss"]


def test_the_default_beats_fitting_on_every_batch_on_heldout_data(overfit, tmp_path, run_cli):
    """--holdout 0 decides on the 8 calibration samples alone (the behaviour before held-out data): its refit
    drives their loss far below the unpruned adapter's, and the written file is worse on new samples."""
    adapter, calib = overfit
    blind, judged = tmp_path / "blind", tmp_path / "judged"
    fitted = report_of(run_cli("prune", adapter, "-c", calib, "-b", "50%", "--holdout", "0", "-o", blind), blind)
    report_of(run_cli("prune", adapter, "-c", calib, "-b", "50%", "-o", judged), judged)
    assert fitted["loss"]["after"] < fitted["loss"]["before"]
    assert heldout_loss_of(judged, calib, run_cli) < heldout_loss_of(blind, calib, run_cli)


def test_max_loss_increase_holds_the_written_file_on_heldout_data(overfit, tmp_path, run_cli):
    """The search bisects on the held-out loss of the file as written (refit included): the written adapter is
    within the tolerance on held-out data, and the kept set one rank smaller that the search measured is not."""
    adapter, calib = overfit
    out = tmp_path / "out"
    report = report_of(run_cli("prune", adapter, "-c", calib, "--max-loss-increase", "15%", "-o", out), out)
    heldout = report["loss"]["heldout"]
    assert heldout["relative_increase"] <= 0.15 and report["quality"]["measured_on"] == "held-out loss"
    assert heldout_loss_of(out, calib, run_cli) == pytest.approx(heldout["after"], rel=1e-6)
    rank = report["totals"]["rank_after"]
    evaluations = {e["rank"]: e for e in report["budget"]["search"]["evaluations"]}
    assert len(evaluations) <= 12
    assert evaluations[rank]["passed"] and not evaluations[rank - 1]["passed"]


def test_auto_takes_the_fisher_when_the_exact_hessian_would_take_too_long(overfit, tmp_path, run_cli, monkeypatch):
    import sublora_cli.model.calibrated

    monkeypatch.setattr(sublora_cli.model.calibrated, "AUTO_MAX_EXACT_SECONDS", 0.0)
    adapter, calib = overfit
    out = tmp_path / "out"
    report = report_of(run_cli("prune", adapter, "-c", calib, "-b", 4, "-o", out), out)
    assert report["curvature"] == "fisher"
    assert "of CPU time by estimate, past auto's 0 s" in report["calibration"]["curvature_reason"]
    assert [c["curvature"] for c in report["candidates"]] == ["fisher", "fisher"]  # no exact: no Fisher rival


def test_rounds_write_the_round_with_the_lowest_heldout_loss(overfit, tmp_path, run_cli):
    """Training on 8 noisy samples overfits them round after round; with held-out data the written prune is the
    round that is best on them (early stopping), and the report's figures are that round's."""
    adapter, calib = overfit
    out = tmp_path / "out"
    args = ("--rounds", 3, "--train-steps", 20, "--lr", "3e-2", "--curvature", "fisher", "-m", "sublora")
    report = report_of(run_cli("prune", adapter, "-c", calib, "-b", "50%", *args, "-o", out), out)
    rounds = report["rounds"]
    best = min(rounds, key=lambda r: r["heldout_after"])
    assert [r["written"] for r in rounds] == [r is best for r in rounds]
    assert report["loss"]["heldout"]["after"] == best["heldout_after"] and report["loss"]["after"] == best["loss_after"]
    assert report["totals"]["rank_after"] == best["rank"]
    assert heldout_loss_of(out, calib, run_cli) == pytest.approx(best["heldout_after"], rel=1e-6)


def test_sweep_shows_the_heldout_loss_of_every_written_selection(overfit, tmp_path, run_cli):
    adapter, calib = overfit
    out = tmp_path / "sweep"
    args = ("sweep", adapter, "-c", calib, "--budgets", "2,4,6", "--methods", "sublora,magnitude", "-o", out)
    table = run_cli(*args)
    assert table.code == 0, table.stderr
    assert "held-out loss" in table.stdout and "held-out 0.337" in table.stdout
    result = json.loads((out / "sweep.json").read_text())
    assert result["heldout_before"] == pytest.approx(0.33736, rel=1e-4)
    assert all(r["heldout_after"] is not None for r in result["rows"]) and len(result["rows"]) == 6
    assert "heldout_after" in (out / "sweep.csv").read_text().splitlines()[0]


def test_the_refit_backs_off_from_a_step_that_fits_the_calibration_loss_but_raises_the_heldout_one():
    """A quadratic calibration loss whose minimum the full Newton step reaches, and a held-out loss whose minimum
    lies halfway: the full step is rejected on held-out data and a half step is written."""
    from sublora_cli.core.refit import refit

    sigma = torch.ones(3, dtype=torch.float64)
    kept = torch.tensor([True, True, False])
    curvature = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.5, 1.0]], dtype=torch.float64)

    def calibration(c):
        return float((c[:2] - 1.5).pow(2).sum())

    def heldout(c):
        return float((c[:2] - 1.2).pow(2).sum())

    selected = torch.where(kept, sigma, torch.zeros_like(sigma))
    blind = refit(sigma, kept, torch.zeros(3, dtype=torch.float64), curvature, calibration, calibration(selected))
    assert blind.accepted and blind.step == 1.0 and blind.overfit == 0 and blind.heldout_change is None
    checked = refit(
        sigma, kept, torch.zeros(3, dtype=torch.float64), curvature, calibration, calibration(selected),
        check=heldout, check_after_selection=heldout(selected),
    )  # fmt: skip
    assert checked.accepted and checked.step == 0.5 and checked.overfit >= 1
    assert checked.heldout_after_refit == pytest.approx(heldout(checked.sigma))
    assert checked.heldout_after_refit < heldout(selected)
    assert checked.heldout_change == pytest.approx(checked.heldout_after_refit - heldout(selected))


def test_without_heldout_data_holdout_0_and_auto_write_the_same_bytes(tmp_path, run_cli):
    """A script with 3 batches and no heldout_batches() has no held-out data under auto: the run is the one
    --holdout 0 makes, byte for byte (the pipeline before held-out data)."""
    from test_prune_calibrated import make_problem

    adapter, calib = make_problem(tmp_path / "p")
    auto = run_cli("prune", adapter, "-c", calib, "-b", 3, "-o", tmp_path / "auto")
    zero = run_cli("prune", adapter, "-c", calib, "-b", 3, "--holdout", "0", "-o", tmp_path / "zero")
    assert auto.code == zero.code == 0 and "too few to set some aside" in auto.stderr
    weights = "adapter_model.safetensors"
    assert (tmp_path / "auto" / weights).read_bytes() == (tmp_path / "zero" / weights).read_bytes()
