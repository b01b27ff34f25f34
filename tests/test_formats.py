"""The format seam (issue 10.1): read_adapter/write_adapter dispatch through a first-match registry of formats.

A toy single-file format (tests/toy_format.py), registered here by one list entry, goes through every command
of the CLI: inspect, prune without and with calibration, eval of what was written.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from toy_format import CARRIED, TOY, factors

from sublora_cli import formats
from sublora_cli.core.svd import factor_svd
from sublora_cli.formats import read_adapter

PACKAGE = Path(__file__).resolve().parents[1] / "sublora_cli"
CALIB = """
import torch

class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 12)
        self.fc2 = torch.nn.Linear(12, 12)
        self.out = torch.nn.Linear(12, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

def load_model():
    torch.manual_seed(0)
    return TinyMLP()

def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, generator=g) for _ in range(2)]

def loss(model, batch):
    return (model(batch) - torch.sin(batch.sum(-1, keepdim=True))).pow(2).mean()
"""


@pytest.fixture
def toy(monkeypatch):
    """The toy format registered ahead of PEFT: the one line a new format adds to FORMATS."""
    monkeypatch.setattr(formats, "FORMATS", [TOY, *formats.FORMATS])


def toy_adapter(path: Path) -> Path:
    """Rank-3 updates of the MLP's fc1 and fc2, and a trained bias of its output layer carried along."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"{CARRIED}out.bias": torch.tensor([0.3])}
    for name, out, inp in (("fc1", 12, 3), ("fc2", 12, 12)):
        tensors |= factors(name, 0.3 * torch.randn(out, 3, generator=g), torch.randn(3, inp, generator=g), 2.0)
    save_file(tensors, str(path))
    return path


def test_a_new_format_is_inspected_pruned_and_written_through_the_cli(toy, tmp_path, run_cli):
    path = toy_adapter(tmp_path / "mine.toy.safetensors")
    inspected = run_cli("inspect", path, "--json")
    assert inspected.code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["input"]["format"] == "toy"

    result = run_cli("prune", path, "--budget", 4, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input"]["format"] == "toy" and report["totals"]["rank_after"] == 4
    written_file = tmp_path / "out" / path.name  # the format chose its single output file
    assert written_file.is_file() and (tmp_path / "out" / "sublora_report.json").is_file()

    original, written = read_adapter(path), read_adapter(written_file)
    assert written.format is TOY and written.carried.keys() == original.carried.keys()
    assert torch.equal(written.carried[f"{CARRIED}out.bias"], original.carried[f"{CARRIED}out.bias"])
    after = {m.name: m for m in written.modules}
    for before, entry in zip(original.modules, report["modules"], strict=True):
        kept = entry["kept"]
        if not kept:
            assert before.name not in after
            continue
        module = after[before.name]
        expected = factor_svd(before.B, before.A, before.scale).dense(kept)
        torch.testing.assert_close(module.scale * module.B.double() @ module.A.double(), expected, atol=1e-5, rtol=0)
        if len(kept) < before.rank:  # the toy writer's own factorisation: down = Vᵀ has orthonormal rows
            gram = module.A.double() @ module.A.double().T
            torch.testing.assert_close(gram, torch.eye(len(kept), dtype=torch.float64), atol=1e-6, rtol=0)


def test_a_new_format_is_measured_as_written(toy, tmp_path, run_cli):
    """The loss after pruning is measured on the toy format's stored factors with its carried tensors mapped to
    the model's parameters: `eval` of the written file gives the same loss."""
    path = toy_adapter(tmp_path / "mine.toy.safetensors")
    calib = tmp_path / "calib.py"
    calib.write_text(textwrap.dedent(CALIB))
    out = tmp_path / "out"
    result = run_cli("prune", path, "--calib", calib, "--budget", 3, "--out", out, "--json")
    assert result.code == 0, result.stderr
    loss = json.loads(result.stdout)["loss"]
    assert loss["after"] != loss["before"]
    for adapter, expected in ((out / path.name, loss["after"]), (path, loss["before"])):
        measured = run_cli("eval", adapter, "--calib", calib, "--json")
        assert measured.code == 0, measured.stderr
        assert json.loads(measured.stdout)["loss"] == pytest.approx(expected, rel=1e-6)


def test_the_first_format_that_detects_a_path_reads_it(toy, tmp_path):
    from test_cli_errors import write_adapter

    assert read_adapter(write_adapter(tmp_path / "peft")).format.name == "peft"
    assert read_adapter(toy_adapter(tmp_path / "a.toy.safetensors")).format is TOY


@pytest.mark.parametrize("registered", [False, True])
def test_a_path_no_format_recognises_says_what_can_be_read(registered, tmp_path, run_cli, monkeypatch):
    if registered:
        monkeypatch.setattr(formats, "FORMATS", [TOY, *formats.FORMATS])
    (tmp_path / "notes.txt").write_text("not an adapter")
    result = run_cli("inspect", tmp_path / "notes.txt")
    assert result.code == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "is not an adapter sublora can read" in message and "adapter_config.json" in message
    assert (".toy.safetensors" in message) == registered


def test_a_peft_file_given_for_its_directory_names_the_directory(tmp_path, run_cli):
    from test_cli_errors import write_adapter

    weights = write_adapter(tmp_path / "a") / "adapter_model.safetensors"
    result = run_cli("inspect", weights)
    assert result.code == 1
    assert f"point sublora at {tmp_path / 'a'}" in " ".join(result.stderr.split())


def test_only_the_formats_package_knows_a_format():
    """Outside sublora_cli/formats/ every module goes through the registry, never a format's own module."""
    importers = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "formats" not in path.relative_to(PACKAGE).parts
        and re.search(r"formats\.peft|formats import .*\bpeft\b", path.read_text())
    ]
    assert importers == []
