"""Data-parallel curvature (torchrun) on the CPU with gloo: two processes launched as torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR/PORT), on the elliptic PINN sample in float64."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sublora_cli.model import distributed
from sublora_cli.model.batchloop import Sums, over_batches

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_checkpoints" / "elliptic"
ADAPTER, CALIB = SAMPLE / "adapter_k2", SAMPLE / "calib_k2.py"
TIMEOUT_S = 120  # a hang would take SUBLORA_DIST_TIMEOUT; the test fails well before the job's own limit

CURVATURE = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from sublora_cli.model import distributed
    from sublora_cli.formats import read_adapter
    from sublora_cli.model.calibrated import open_calibration
    from sublora_cli.pipeline.spectra import adapter_spectra

    adapter = read_adapter(Path(sys.argv[1]))
    with distributed.process_group():
        calibrated = open_calibration(Path(sys.argv[2]), adapter, adapter_spectra(adapter), dtype="float64")
        curvature = calibrated.curvature(sys.argv[3], max_hessian_gb=1.0)
        before = calibrated.loss()
        torch.save({"g": curvature.gradient, "H": curvature.hessian, "loss": curvature.loss, "before": before,
                    "batches": curvature.n_batches}, f"{sys.argv[4]}.{distributed.rank()}")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world_size: int, **extra_env: str) -> list[subprocess.CompletedProcess]:
    """Run `python ARGS` as `world_size` ranks of one job, as torchrun sets them up; their results by rank."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SUBLORA_DIST_TIMEOUT": "60",
            "CUDA_VISIBLE_DEVICES": "",
            **extra_env,
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for rank, process in enumerate(processes):
        try:
            out, err = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"rank {rank} of the job hung past {TIMEOUT_S} s")
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@pytest.mark.parametrize("kind", ["fisher", pytest.param("exact", marks=pytest.mark.slow)])  # exact: ~2 min
def test_two_ranks_give_the_gradient_and_hessian_of_one(kind, tmp_path):
    single = launch(["-c", CURVATURE, str(ADAPTER), str(CALIB), kind, str(tmp_path / "one")], 1)
    double = launch(["-c", CURVATURE, str(ADAPTER), str(CALIB), kind, str(tmp_path / "two")], 2)
    for result in single + double:
        assert result.returncode == 0, result.stderr
    one = torch.load(tmp_path / "one.0")
    for rank in range(2):
        two = torch.load(tmp_path / f"two.{rank}")
        assert two["batches"] == one["batches"] == 4  # the counts are reduced: means over all batches
        assert torch.allclose(two["g"], one["g"], rtol=0, atol=1e-10)
        assert torch.allclose(two["H"], one["H"], rtol=0, atol=1e-10)
        assert abs(two["loss"] - one["loss"]) < 1e-10
        assert abs(two["before"] - one["before"]) < 1e-10


def prune_args(out: Path, calib: Path = CALIB) -> list[str]:
    return ["-m", "sublora_cli", "prune", str(ADAPTER), "--calib", str(calib), "--budget", "50", "--dtype",
            "float64", "--curvature", "fisher", "--json", "-o", str(out)]  # fmt: skip


@pytest.mark.slow  # ~35 s on two busy cores
def test_torchrun_prune_keeps_the_same_set_writes_once_and_records_the_job(tmp_path):
    (single,) = launch(prune_args(tmp_path / "one"), 1)
    ranks = launch(prune_args(tmp_path / "two"), 2)
    assert single.returncode == 0, single.stderr
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert ranks[1].stdout == ""  # only rank 0 prints
    one, two = json.loads(single.stdout), json.loads(ranks[0].stdout)
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert one["distributed"] == {"world_size": 1, "backend": None}
    assert [m["kept"] for m in two["modules"]] == [m["kept"] for m in one["modules"]]
    for key in ("before", "after"):
        assert abs(two["loss"][key] - one["loss"][key]) < 1e-10
    written = json.loads((tmp_path / "two" / "sublora_report.json").read_text())
    assert written["distributed"]["world_size"] == 2


def test_a_batch_failing_on_one_rank_ends_every_rank_with_its_message(tmp_path):
    calib = tmp_path / "calib_bad.py"
    calib.write_text(
        f"import sys\nsys.path.insert(0, {str(SAMPLE)!r})\n"
        "from calib_k2 import load_model, evaluate\n"
        "from calib_k2 import batches as good_batches, loss as good_loss\n"
        "def batches():\n    return [(i, b) for i, b in enumerate(good_batches())]\n"
        "def loss(model, batch):\n"
        "    if batch[0] == 1:\n        raise ValueError('bad batch on the second shard')\n"
        "    return good_loss(model, batch[1])\n"
    )
    ranks = launch(prune_args(tmp_path / "out", calib), 2)
    assert [r.returncode for r in ranks] == [1, 1]
    assert "bad batch on the second shard" in ranks[0].stderr  # rank 0 reports rank 1's failure
    assert ranks[1].stderr.count("bad batch") == 0  # once, by rank 0
    assert not (tmp_path / "out").exists()


def test_one_process_is_not_distributed():
    assert not distributed.active()
    assert distributed.describe() == {"world_size": 1, "backend": None}
    totals = over_batches([1.0, 2.0, 3.0], lambda i, b, sums, _m: sums.add("x", b), Sums(x=0.0))
    assert totals == {"x": 6.0}


def test_a_bad_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("SUBLORA_DIST_TIMEOUT", "soon")
    with pytest.raises(distributed.SubloraError, match="SUBLORA_DIST_TIMEOUT"):
        distributed.timeout_seconds()


def failing_script(tmp_path: Path, body: str) -> Path:
    """The elliptic sample's calibration script with `body` appended (it may read RANK, as a script could)."""
    script = tmp_path / "calib_rank.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(SAMPLE)!r})\n"
        "from calib_k2 import load_model, batches, loss, evaluate\nRANK = int(os.environ.get('RANK', '0'))\n" + body
    )
    return script


def assert_every_rank_fails_with(ranks, needle: str, out: Path) -> None:
    assert [r.returncode for r in ranks] == [1, 1], ranks[0].stderr + ranks[1].stderr
    assert needle in " ".join(ranks[0].stderr.split()), ranks[0].stderr
    assert "unexpected" not in ranks[0].stderr and "Traceback (most recent call last)" not in ranks[1].stderr
    assert not out.exists()


@pytest.mark.parametrize("stage", ["load_model", "train_batches"])
def test_a_rank_failing_outside_the_batch_loop_ends_every_rank_with_its_message(tmp_path, stage):
    """Issue 21: a failure in load_model() or train_batches() on rank 1 left rank 0 waiting for the timeout."""
    body = {
        "load_model": "_load = load_model\ndef load_model():\n"
        "    if RANK == 1:\n        raise RuntimeError('no weights on rank 1')\n    return _load()\n",
        "train_batches": "def train_batches():\n"
        "    if RANK == 1:\n        raise RuntimeError('no weights on rank 1')\n    return batches()\n",
    }[stage]
    args = prune_args(tmp_path / "out", failing_script(tmp_path, body))
    if stage == "train_batches":
        args += ["--rounds", "1", "--train-steps", "1"]
    started = time.monotonic()
    ranks = launch(args, 2)
    assert_every_rank_fails_with(ranks, "no weights on rank 1", tmp_path / "out")
    assert time.monotonic() - started < 50  # the launch's SUBLORA_DIST_TIMEOUT is 60 s: nobody waited for it


def test_batches_that_differ_between_ranks_are_refused(tmp_path):
    """Issue 21: a batches() sharding by rank itself gave rank 0 four batches and rank 1 three, and exit 0."""
    body = "_batches = batches\ndef batches():\n    return _batches()[: 4 - RANK]\n"
    ranks = launch(prune_args(tmp_path / "out", failing_script(tmp_path, body)), 2)
    assert_every_rank_fails_with(ranks, "disagree on what batches() yields (rank 0: 4 batches", tmp_path / "out")
    assert "must not split the data by rank" in ranks[0].stderr


def test_a_peer_that_dies_is_named_as_such(tmp_path):
    """Issue 21: rank 1 killed mid-run left rank 0 printing gloo's "Connection closed by peer" as unexpected."""
    body = "import signal\n_loss = loss\ndef loss(model, batch):\n" \
        "    if RANK == 1:\n        os.kill(os.getpid(), signal.SIGKILL)\n    return _loss(model, batch)\n"  # fmt: skip
    ranks = launch(prune_args(tmp_path / "out", failing_script(tmp_path, body)), 2)
    assert ranks[1].returncode == -9
    assert ranks[0].returncode == 1, ranks[0].stderr
    assert "Another process of the torchrun job" in ranks[0].stderr and "unexpected" not in ranks[0].stderr
    assert not (tmp_path / "out").exists()


def test_a_malformed_timeout_is_one_message_from_rank_0(tmp_path):
    args = ["-m", "sublora_cli", "prune", str(ADAPTER), "-b", "50", "-o", str(tmp_path / "out")]
    ranks = launch(args, 2, SUBLORA_DIST_TIMEOUT="abc")
    assert [r.returncode for r in ranks] == [1, 1]
    assert "SUBLORA_DIST_TIMEOUT='abc'" in ranks[0].stderr and "Traceback" not in ranks[0].stderr
    assert ranks[1].stderr == ""


def sweep_args(out: Path) -> list[str]:
    return ["-m", "sublora_cli", "sweep", str(ADAPTER), "--calib", str(CALIB), "--budgets", "20,40",
            "--methods", "magnitude,diag", "--dtype", "float64", "--curvature", "fisher", "--no-evaluate",
            "-o", str(out)]  # fmt: skip


@pytest.mark.slow  # ~40 s on two busy cores
def test_torchrun_sweep_writes_once_and_matches_one_process(tmp_path):
    (single,) = launch(sweep_args(tmp_path / "one"), 1)
    ranks = launch(sweep_args(tmp_path / "two"), 2)
    assert single.returncode == 0, single.stderr
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert ranks[1].stdout == ""  # only rank 0 prints
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert [(r["budget"], r["method"], r["rank_after"]) for r in two["rows"]] == [
        (r["budget"], r["method"], r["rank_after"]) for r in one["rows"]
    ]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert abs(a["loss_after"] - b["loss_after"]) < 1e-10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no scratch folder of rank 1 left beside
