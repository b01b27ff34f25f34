"""What a new user trips on when following the README: --debug where they add it, help texts that name what the
tool reads and how it exits, refusals that come before the expensive work, default output folders that do not
collide."""

from __future__ import annotations

import re

import pytest
import torch
from test_cli_errors import PREFIX, assert_refused, write_adapter
from test_prune_calibrated import make_problem

import sublora_cli.cli.app as app
from sublora_cli.formats import FORMATS


def crash(*args, **kwargs):
    raise RuntimeError("a bug")


@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_is_accepted_before_and_after_the_command(tmp_path, run_cli, monkeypatch, where):
    monkeypatch.setattr(app, "prune", crash)
    args = ["prune", write_adapter(tmp_path / "a"), "--budget", "1", "-o", tmp_path / "o"]
    with pytest.raises(RuntimeError, match="a bug"):  # the traceback is shown: the exception is not caught
        run_cli(*(args + ["--debug"] if where == "after" else ["--debug", *args]))


def test_crash_hint_names_a_form_that_works(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(app, "sweep", crash)
    args = ["sweep", write_adapter(tmp_path / "a"), "--calib", tmp_path / "c.py", "-o", tmp_path / "o"]
    result = run_cli(*args)
    assert result.code == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "unexpected RuntimeError: a bug" in message and "sublora sweep … --debug" in message
    with pytest.raises(RuntimeError):  # and that form does show it
        run_cli(*args, "--debug")


@pytest.mark.parametrize("command", ["inspect", "prune", "eval", "sweep"])
def test_help_names_every_format_and_the_exit_codes(run_cli, command):
    result = run_cli(command, "--help")
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.split()).lower()
    for fmt in FORMATS:
        assert fmt.name in text, fmt.name
    assert "diffusers" in text and "peft lora adapter directory" not in text
    assert "exit codes: 0 success; 1 bad input or failure" in text
    assert "2 command-line usage" in text and "3 a quality guard" in text


def test_help_says_what_eval_calib_does_and_that_1_0_is_a_rank(run_cli):
    eval_help = " ".join(run_cli("eval", "--help").stdout.split())
    assert "calibrated methods" not in eval_help
    assert "eval prints the adapter's mean loss over its batches and its evaluate() metrics" in eval_help
    prune_help = " ".join(run_cli("prune", "--help").stdout.split())
    assert "a number of 1 or more is a rank even with a decimal point: 1.0 keeps one component" in prune_help


def wide_adapter(path, rank=40):
    """One module `lin` (out 48, in 48) of rank 40: choosing 20 of its components is C(40, 20) ≈ 1.4e11 subsets."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{PREFIX}lin.lora_A.weight": torch.randn(rank, 48, generator=g),
        f"{PREFIX}lin.lora_B.weight": torch.randn(48, rank, generator=g),
    }
    return write_adapter(path, tensors=tensors, config={"r": rank, "lora_alpha": rank})


UNCALLABLE_SCRIPT = "def load_model():\n    raise RuntimeError('the calibration script was run')\n"


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_exhaustive_over_too_many_subsets_is_refused_before_the_calibration(tmp_path, run_cli, command):
    calib = tmp_path / "calib.py"
    calib.write_text(UNCALLABLE_SCRIPT)
    args = ["--budget", "20", "--method"] if command == "prune" else ["--budgets", "20", "--methods"]
    out = tmp_path / "o"
    result = run_cli(command, wide_adapter(tmp_path / "a"), "--calib", calib, *args, "exhaustive", "-o", out)
    assert_refused(result, "exhaustive search would evaluate", "over the limit of 2,000,000", out=out)
    assert "calibration script was run" not in result.stderr


def test_readme_examples_in_order_write_their_own_default_folders(tmp_path, run_cli):
    """The README's prune examples one after another, without --out: each writes its own sibling folder (named with
    the method and the budget as written), so the CI guard exits 3 as documented, not 1 for a folder in the way."""
    adapter, calib = make_problem(tmp_path / "p")
    examples = [
        ("--budget", "4"),
        ("--budget", "0.25", "--calib", calib),
        ("--budget", "4", "--calib", calib, "--method", "diag", "--curvature", "diag"),
        ("--budget", "2", "--calib", calib, "--max-loss-increase", "5%", "--json"),
        ("--budget", "25%"),
    ]
    codes = [run_cli("prune", adapter, *args).code for args in examples]
    assert codes == [0, 0, 0, 3, 0]
    folders = sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith("adapter-"))
    assert folders == [
        "adapter-pruned-diag-4", "adapter-pruned-magnitude-25pct", "adapter-pruned-magnitude-4",
        "adapter-pruned-sublora-0p25", "adapter-pruned-sublora-2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("budget", "allowed", "whole"), [("0.4KB", "0.4 KB", "0.624 KB"), ("0.5KiB", "0.5 KiB", "0.6094 KiB")]
)
def test_a_size_budget_is_echoed_in_the_unit_it_was_written_in(tmp_path, run_cli, budget, allowed, whole):
    adapter, _ = make_problem(tmp_path / "p")  # rank 4 on a 12×3 and a 12×12 layer, float32: 624 bytes
    result = run_cli("prune", adapter, "--budget", budget, "-o", tmp_path / "o")
    assert result.code == 0, result.stderr
    summary = " ".join(result.stdout.split())
    unit = allowed.split()[1]
    used = rf"used [0-9.]+ {unit} of {allowed} allowed, {whole} in all"
    assert re.search(rf"budget {budget}, read as a size in bytes: {used}", summary), summary
    assert re.search(rf"bytes {whole} → [0-9.]+ {unit}", summary)


def test_readme_sweeps_in_order_write_their_own_default_folders(tmp_path, run_cli):
    """The README's two sweeps (a rank axis, then a size axis) one after another, without --out."""
    adapter, calib = make_problem(tmp_path / "p")
    for budgets in ("2:6:2", "200B:600B:200B"):
        args = ("sweep", adapter, "--calib", calib, "--budgets", budgets, "--methods", "magnitude", "--no-evaluate")
        assert run_cli(*args).code == 0
    folders = sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith("adapter-"))
    assert folders == ["adapter-sweep-2-6-2", "adapter-sweep-200B-600B-200B"]
