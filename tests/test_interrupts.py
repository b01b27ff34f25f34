"""Issue 21: Ctrl-C and SIGTERM at every point of a run end with one line and 128 + the signal (130, 143), leave a
previous output as it was and no temporaries. Signals are sent by the run to itself at chosen points (the script's
import, load_model(), the loss during the curvature, the write, the rename), and once from outside during the
interpreter's own import of torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ELLIPTIC, elliptic_script
from test_output import leftovers as temporaries
from test_output import tree_hashes as hashes

import sublora_cli.pipeline.output
import sublora_cli.pipeline.write

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ELLIPTIC / "adapter_k2"
KILL = "os.kill(os.getpid(), signal.{name})"


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def previous(tmp_path, run_cli) -> tuple[Path, dict[str, str]]:
    """An --out holding a previous run's output, and its file hashes."""
    out = tmp_path / "out"
    assert run_cli("prune", ADAPTER, "-b", 40, "-o", out).code == 0
    return out, hashes(out)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["import", "load_model", "loss"])
def test_a_signal_inside_the_script_leaves_the_previous_output(tmp_path, run_cli, previous, name, where):
    kill = KILL.format(name=name)
    body = "import signal\n" + {
        "import": kill + "\n",
        "load_model": f"_load = load_model\ndef load_model():\n    {kill}\n    return _load()\n",
        "loss": f"_loss = loss\ndef loss(model, batch):\n    {kill}\n    return _loss(model, batch)\n",
    }[where]
    out, before = previous
    script = elliptic_script(tmp_path / "calib.py", body)
    args = ("--calib", script, "-b", 50, "-o", out, "--overwrite", "--method", "magnitude")
    result = run_cli("prune", ADAPTER, *args)
    assert result.code == 128 + getattr(signal, name)
    assert f"interrupted ({name}); nothing was written" in one_line(result.stderr)
    assert hashes(out) == before and not temporaries(tmp_path)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_writing_removes_the_temporary(tmp_path, run_cli, previous, monkeypatch, name):
    write = sublora_cli.pipeline.write.write_reports

    def write_then_signal(report, directory):
        write(report, directory)
        os.kill(os.getpid(), getattr(signal, name))

    monkeypatch.setattr(sublora_cli.pipeline.write, "write_reports", write_then_signal)
    out, before = previous
    result = run_cli("prune", ADAPTER, "-b", 50, "-o", out, "--overwrite")
    assert result.code == 128 + getattr(signal, name)
    assert "nothing was written (a previous output in --out is intact)" in one_line(result.stderr)
    assert hashes(out) == before and not temporaries(tmp_path)


def test_a_signal_between_the_renames_waits_until_the_output_is_whole(tmp_path, run_cli, previous, monkeypatch):
    """Issue 21: SIGTERM between the two renames left --out missing and the previous output in `.old-PID`."""
    replace = sublora_cli.pipeline.output._replace

    def signalled_replace(out_dir, tmp, old):
        os.kill(os.getpid(), signal.SIGTERM)
        replace(out_dir, tmp, old)

    monkeypatch.setattr(sublora_cli.pipeline.output, "_replace", signalled_replace)
    out, before = previous
    result = run_cli("prune", ADAPTER, "-b", 50, "-o", out, "--overwrite")
    assert result.code == 143
    assert f"interrupted (SIGTERM) after writing {out}" in one_line(result.stderr)
    assert hashes(out) != before and (out / "adapter_model.safetensors").exists() and not temporaries(tmp_path)


def wait_for_torch_import(process: subprocess.Popen) -> None:
    """Until the process has mapped torch's library (it is importing torch) or 30 s passed."""
    deadline = time.monotonic() + 30
    maps = Path(f"/proc/{process.pid}/maps")
    while time.monotonic() < deadline and process.poll() is None:
        if maps.exists() and "libtorch" in maps.read_text():
            return
        time.sleep(0.005)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_import_of_torch_is_one_line(tmp_path, name):
    """Issue 21: Ctrl-C in the first seconds printed a 30-line traceback, once exiting 1 with an ImportError."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see the import")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "sublora_cli", "prune", str(ADAPTER), "-b", "50", "-o", str(tmp_path / "o")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_torch_import(process)
    process.send_signal(getattr(signal, name))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, name), stderr
    assert f"interrupted ({name})" in one_line(stderr) and stdout == ""
    assert not (tmp_path / "o").exists() and not temporaries(tmp_path)
