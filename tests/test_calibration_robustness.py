"""Calibration scripts that misbehave (endless or non-iterable batches(), prints, NaN metrics) and the curvature
time estimate: each must end in a clear message or valid output, never a hang, a bare TypeError or bad JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ELLIPTIC, elliptic_script
from test_prune_calibrated import CALIB, make_problem

from sublora_cli.cli.app import live_progress
from sublora_cli.errors import SubloraError
from sublora_cli.formats import read_adapter
from sublora_cli.model.calibrated import open_calibration
from sublora_cli.model.curvature import estimate_cost
from sublora_cli.model.script import load_calibration
from sublora_cli.pipeline.spectra import adapter_spectra

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
ENDLESS = """
import itertools
import torch

def load_model():
    return torch.nn.Linear(3, 1)

def batches():
    for i in itertools.count():
        yield torch.full((2, 3), float(i))

def loss(model, batch):
    return model(batch).pow(2).mean()
"""


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as strict parsers (jq, JavaScript) do."""

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def with_replaced(old: str, new: str) -> str:
    assert old in CALIB
    return CALIB.replace(old, new)


def test_endless_batches_stop_at_the_cap_with_progress(tmp_path):
    path = tmp_path / "endless.py"
    path.write_text(textwrap.dedent(ENDLESS))
    seen: list[tuple[str, int, int | None]] = []
    with pytest.raises(SubloraError, match=r"yielded more than 50 batches \(--max-batches\).*loop forever"):
        load_calibration(path).call_batches(max_batches=50, progress=lambda *a: seen.append(a))
    assert seen[0] == ("batches", 1, None) and seen[-1] == ("batches", 50, None)
    finite = tmp_path / "finite.py"
    finite.write_text(textwrap.dedent(ENDLESS).replace("itertools.count()", "range(3)"))
    seen.clear()
    assert len(load_calibration(finite).call_batches(max_batches=3, progress=lambda *a: seen.append(a))) == 3
    assert seen[-1] == ("batches", 3, 3)


def test_live_progress_takes_an_unknown_total():
    with live_progress() as (progress, _):
        progress("batches", 1, None)
        progress("batches", 2, None)
        progress("batches", 2, 2)


def test_endless_batches_through_the_cli_exit_1(tmp_path, run_cli):
    adapter, calib = make_problem(
        tmp_path / "p", with_replaced("return [torch.randn(16, 3, generator=g) for _ in range(3)]", ENDLESS_BODY)
    )
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "--max-batches", 20, "-o", tmp_path / "o")
    assert result.code == 1 and "more than 20 batches (--max-batches)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()
    config = tmp_path / "c.yaml"
    config.write_text("max_batches: 7\n")
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "--config", config, "-o", tmp_path / "o")
    assert result.code == 1 and "more than 7 batches" in result.stderr
    for command in (["eval"], ["sweep", "--budgets", "2", "-o", tmp_path / "s"]):
        result = run_cli(command[0], adapter, *command[1:], "--calib", calib, "--max-batches", 9)
        assert result.code == 1 and "more than 9 batches" in result.stderr


ENDLESS_BODY = "return (torch.randn(16, 3, generator=g) for _ in iter(int, 1))"


@pytest.mark.parametrize("returned", ["42", "None", "3.5"])
def test_batches_returning_a_non_iterable_is_one_clear_error(tmp_path, run_cli, returned):
    source = with_replaced("return [torch.randn(16, 3, generator=g) for _ in range(3)]", f"return {returned}")
    adapter, calib = make_problem(tmp_path / "p", source)
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "-o", tmp_path / "o")
    assert result.code == 1
    assert "batches() in" in result.stderr and "which is not iterable; it must return (or yield)" in result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr


def test_a_chatty_script_leaves_json_stdout_parseable(tmp_path, run_cli):
    chatty = (
        "print('importing')\n"
        + CALIB.replace("def load_model():\n", "def load_model():\n    print('loading')\n")
        .replace("def batches():\n", "def batches():\n    print('batches')\n")
        .replace("def loss(model, batch):\n", "def loss(model, batch):\n    print('loss')\n")
        .replace("def evaluate(model):\n", "def evaluate(model):\n    print('evaluating')\n")
    )
    adapter, calib = make_problem(tmp_path / "p", chatty)
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "-o", tmp_path / "o", "--json")
    assert result.code == 0, result.stderr
    assert strict_loads(result.stdout)["method"] == "sublora"
    for line in ("importing", "loading", "batches", "loss", "evaluating"):
        assert line in result.stderr
    assert strict_loads(run_cli("eval", adapter, "--calib", calib, "--json").stdout)["batches"] == 3


@pytest.mark.parametrize("value", ["float('nan')", "float('inf')"])
def test_non_finite_metrics_are_written_as_null_with_a_warning(tmp_path, run_cli, value):
    source = with_replaced('return {"mse": float(', f'return {{"diverged": {value}, "mse": float(')
    adapter, calib = make_problem(tmp_path / "p", source)
    out = tmp_path / "o"
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "-o", out, "--json")
    assert result.code == 0, result.stderr
    assert "evaluate(model) returned diverged" in result.stderr and "written as null" in result.stderr
    for report in (strict_loads(result.stdout), strict_loads((out / "sublora_report.json").read_text())):
        assert report["metrics"]["before"]["diverged"] is None and report["metrics"]["after"]["diverged"] is None
        assert math.isfinite(report["metrics"]["after"]["mse"])
    assert "nan" in (out / "sublora_report.md").read_text() or "inf" in (out / "sublora_report.md").read_text()
    swept = run_cli("sweep", adapter, "--calib", calib, "--budgets", "2,4", "-o", tmp_path / "s", "--json")
    assert swept.code == 0, swept.stderr
    assert strict_loads(swept.stdout)["metrics_before"]["diverged"] is None
    assert strict_loads((tmp_path / "s" / "sweep.json").read_text())["rows"][0]["metrics_after"]["diverged"] is None
    assert "diverged" in swept.stderr
    assert strict_loads(run_cli("eval", adapter, "--calib", calib, "--json").stdout)["metrics"]["diverged"] is None


@pytest.mark.parametrize("value", ["-1", "0", "abc"])
def test_non_positive_limits_are_usage_errors(problem_dir, tmp_path, run_cli, value):
    adapter, calib = problem_dir
    for flag in ("--max-hessian-gb", "--max-batches"):
        if flag == "--max-batches" and value == "abc":
            continue
        for command in (["prune", "-b", "3"], ["sweep"], ["eval"]):
            if command == ["eval"] and flag == "--max-hessian-gb":
                continue
            result = run_cli(command[0], adapter, *command[1:], "--calib", calib, flag, value)
            assert result.code == 2, (command, flag, result.stderr)
            assert flag in result.stderr


@pytest.mark.parametrize("content", ["max_hessian_gb: -1\n", "max_batches: 0\n", "max_batches: 2.5\n"])
def test_non_positive_limits_in_the_config_are_refused(problem_dir, tmp_path, run_cli, content):
    adapter, calib = problem_dir
    config = tmp_path / "c.yaml"
    config.write_text(content)
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "--config", config, "-o", tmp_path / "o")
    assert result.code == 1 and content.split(":")[0] in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def problem_dir(tmp_path) -> tuple[Path, Path]:
    return make_problem(tmp_path / "problem")


@pytest.mark.parametrize(
    "adapter, calib",
    [("elliptic/adapter_k2", "elliptic/calib_k2.py"), ("allen_cahn/adapter_eps0p1", "allen_cahn/calib_eps0p1.py")],
)
def test_curvature_time_estimate_is_within_3x_on_the_samples(adapter, calib):
    loaded = read_adapter(SAMPLES / adapter)
    calibrated = open_calibration(SAMPLES / calib, loaded, adapter_spectra(loaded))
    try:
        R, n = calibrated.sigma_model.size, len(calibrated.batches)
        estimate = estimate_cost(R, n, "exact", calibrated.steady_loss_seconds("exact"))["seconds"]
        start = time.perf_counter()
        calibrated.curvature("exact", max_hessian_gb=4.0)
        actual = time.perf_counter() - start
    finally:
        calibrated.close()
    assert actual / 3 <= estimate <= 3 * actual, f"estimated {estimate:.2f} s, took {actual:.2f} s"


def run_sublora(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m sublora_cli ARGS` in a fresh process: real file descriptors, a real exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sublora_cli", *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("where", "code"),
    [("import", 0), ("load_model", 3), ("batches", 0), ("loss", 3), ("evaluate", 0)],
)
def test_os_exit_in_the_script_is_exit_1_with_a_message(tmp_path, where, code):
    """Issue 21: os._exit(0) made sublora exit 0 with no output, os._exit(3) looked like a failed quality gate."""
    call = f"os._exit({code})"
    body = {
        "import": call + "\n",
        "load_model": f"def load_model():\n    {call}\n",
        "batches": f"def batches():\n    {call}\n",
        "loss": f"def loss(model, batch):\n    {call}\n",
        "evaluate": f"def evaluate(model):\n    {call}\n",
    }[where]
    script = elliptic_script(tmp_path / "calib.py", body)
    result = run_sublora("prune", ELLIPTIC / "adapter_k2", "--calib", script, "-b", 50, "-o", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert f"called os._exit({code})" in result.stderr and "Return a value or raise" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_fork_inside_the_script_still_ends_its_child_with_os_exit(tmp_path, run_cli):
    """multiprocessing ends a forked worker with os._exit: the guard must let the child go."""
    body = (
        "import multiprocessing\n_batches = batches\n"
        "def batches():\n"
        "    with multiprocessing.get_context('fork').Pool(1) as pool:\n"
        "        assert pool.map(abs, [-1, -2]) == [1, 2]\n"
        "    return _batches()\n"
    )
    script = elliptic_script(tmp_path / "calib.py", body)
    result = run_cli("eval", ELLIPTIC / "adapter_k2", "--calib", script, "--holdout", "0", "--json")
    assert result.code == 0, result.stderr
    assert strict_loads(result.stdout)["batches"] == 4


def test_child_processes_and_fd_1_writes_leave_json_stdout_parseable(tmp_path):
    """Issue 21: a script's child processes, os.write(1, …) and print(file=sys.__stdout__) corrupted --json."""
    chatter = (
        "    os.write(1, b'raw fd write\\n')\n"
        "    print('dunder stdout', file=sys.__stdout__)\n"
        "    import subprocess; subprocess.run(['echo', 'child process'])\n"
    )
    body = (
        chatter.replace("    ", "", 1).replace("\n    ", "\n")
        + "_load = load_model\ndef load_model():\n" + chatter + "    return _load()\n"
        + "_evaluate = evaluate\ndef evaluate(model):\n" + chatter + "    return _evaluate(model)\n"
    )  # fmt: skip
    script = elliptic_script(tmp_path / "calib.py", body)
    result = run_sublora("prune", ELLIPTIC / "adapter_k2", "--calib", script, "-b", 50, "-o", tmp_path / "o", "--json")
    assert result.returncode == 0, result.stderr
    assert strict_loads(result.stdout)["method"] == "sublora"
    for line in ("raw fd write", "dunder stdout", "child process"):
        assert line in result.stderr and line not in result.stdout
