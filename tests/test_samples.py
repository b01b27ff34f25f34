"""The shipped PINN samples: each calibration loss vanishes on its exact solution (so the closed-form
right-hand sides match the autograd operators), and each shipped adapter loads with peft and reproduces
the loss recorded when it was trained."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
RESULTS = json.loads((SAMPLES / "results.json").read_text())
CALIBS = sorted(SAMPLES.glob("*/calib_*.py"))


def load_calib(path: Path):
    """Load a calibration script by file path, as the CLI does."""
    spec = importlib.util.spec_from_file_location(f"calib_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Exact(torch.nn.Module):
    """A 'model' that outputs the family's exact solution (through the same model(x) call the loss makes)."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, x):
        return self.exact(x)[:, None]


def test_every_adapter_has_a_calibration_script():
    adapters = sorted(SAMPLES.glob("*/adapter_*"))
    assert len(adapters) == 9 and len(CALIBS) == 9
    for adapter in adapters:
        assert (adapter.parent / f"calib_{adapter.name.removeprefix('adapter_')}.py").exists()
        assert {p.name for p in adapter.iterdir()} <= {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        }


@pytest.mark.parametrize("path", CALIBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_exact_solution_has_zero_loss(path):
    calib = load_calib(path)
    model = Exact(calib.exact)
    batches = list(calib.batches())
    assert 2 <= len(batches) <= 4
    for batch in batches:
        assert calib.loss(model, batch).item() < 1e-9
    assert calib.evaluate(model)["rel_l2"] < 1e-6


@pytest.mark.parametrize("path", CALIBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_adapter_reproduces_recorded_loss(path):
    from peft import PeftModel

    calib = load_calib(path)
    name = path.stem.removeprefix("calib_")
    recorded = RESULTS[path.parent.name][name]
    model = PeftModel.from_pretrained(calib.load_model(), str(path.parent / f"adapter_{name}"))
    batches = list(calib.batches())
    loss = sum(calib.loss(model, b) for b in batches) / len(batches)
    assert loss.item() == pytest.approx(recorded["loss"], rel=0.05, abs=1e-7)
    assert calib.evaluate(model)["rel_l2"] == pytest.approx(recorded["rel_l2"], rel=0.05)
    base_loss = sum(calib.loss(calib.load_model(), b) for b in batches) / len(batches)
    assert base_loss.item() > 100 * loss.item()  # the adapter matters: the base model solves another PDE
