"""Progress where stderr is a log (CI, a file), not a terminal: a line per stage, at every further tenth of a long loop
with the elapsed time and an estimate, and `sweep`'s total estimate before its curvature starts."""

from __future__ import annotations

from test_prune_calibrated import make_problem

from sublora_cli.cli import render


def test_a_long_loop_writes_a_line_per_tenth_with_elapsed_time_and_estimate(capsys):
    now = [0.0]
    progress = render.LogProgress(clock=lambda: now[0])
    progress("batches", 0, None)
    for step in range(1, 101):  # 100 steps of 3 s: every tenth is worth a line
        now[0] += 3.0
        progress("round 1/2: training", step, 100)
    for step in range(1, 101):  # 100 quick steps: only its start and end
        now[0] += 0.001
        progress("sweep", step, 100)
    progress("batches", 4, 4)
    lines = capsys.readouterr().err.splitlines()
    training = [line for line in lines if line.startswith("round 1/2: training")]
    assert training[0] == "round 1/2: training: started, 100 steps"
    assert training[1] == "round 1/2: training: 10/100 (10%), 27.0 s elapsed, about 4 min left"
    assert training[5] == "round 1/2: training: 50/100 (50%), 2 min elapsed, about 2 min left"
    assert training[-1] == "round 1/2: training: done, 100 in 5 min" and len(training) == 11
    sweep = [line for line in lines if line.startswith("sweep")]
    assert sweep == ["sweep: started, 100 steps", "sweep: done, 100 in 0.1 s"]
    assert lines[0] == "batches: started" and lines[-1].startswith("batches: done, 4 in")


def test_a_stage_that_runs_again_is_reported_again(capsys):
    progress = render.LogProgress()
    for _ in range(2):  # e.g. the curvature of each round
        progress("curvature", 1, 2)
        progress("curvature", 2, 2)
    assert capsys.readouterr().err.count("curvature: started, 2 steps") == 2


def test_sweep_in_a_log_states_its_total_first_then_its_progress(tmp_path, run_cli):
    adapter, calib = make_problem(tmp_path / "p")
    result = run_cli(
        "sweep", adapter, "--calib", calib, "--budgets", "2,4", "--methods", "magnitude,sublora,sublora-random",
        "--seeds", "0,1", "-o", tmp_path / "s",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    (total,) = [i for i, line in enumerate(lines) if line.startswith("sweep: 8 selections")]
    assert "each measured as written (its loss, the refit's losses, evaluate()): about" in lines[total]
    assert lines[total].endswith(" in all")
    assert total < lines.index("curvature: started, 24 steps")  # R = 8, 3 batches
    assert "sweep: started, 8 steps" in lines and "sweep: done, 8 in" in result.stderr
