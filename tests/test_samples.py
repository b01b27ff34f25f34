"""The shipped PINN samples: each calibration loss vanishes on its exact solution (so the closed-form
right-hand sides match the autograd operators), and each shipped adapter loads with peft and reproduces
the loss recorded when it was trained."""

from __future__ import annotations

import importlib.util
import json
import math
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


# The exact solutions each family's README documents, by the parameter in the script's name (k2, eps0p15, beta3).
DOCUMENTED = {
    "elliptic": ("k", lambda k, x, t: torch.sin(k * math.pi * x) * torch.sin(k * math.pi * t)),
    "allen_cahn": ("eps", lambda eps, x, t: torch.tanh((x - 0.5 * t) / (math.sqrt(2) * eps))),
    "hyperbolic": ("beta", lambda beta, x, t: torch.sin(math.pi * (x - beta * t))),
}


class Exact64(Exact):
    """The exact solution as a float64 'model' (a float64 parameter, so the loss follows it to float64), optionally
    scaled: scale 1.01 gives a known relative L2 error of exactly 0.01."""

    def __init__(self, exact, scale: float = 1.0):
        super().__init__(exact)
        self.scale = scale
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * self.exact(x)[:, None] + self.anchor


@pytest.mark.parametrize("path", CALIBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_exact_is_the_documented_solution(path):
    """The zero-residual test means something only if `exact` is the solution of the PDE the script claims."""
    calib = load_calib(path)
    prefix, formula = DOCUMENTED[path.parent.name]
    value = float(path.stem.removeprefix("calib_").removeprefix(prefix).replace("p", "."))
    lo = torch.tensor([0.0, 0.0] if prefix == "k" else [-1.0, 0.0], dtype=torch.float64)  # (x, y) or (x, t)
    x = lo + (1 - lo) * torch.rand(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(calib.exact(x), formula(value, x[:, 0], x[:, 1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", CALIBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_exact_solution_has_zero_loss_in_float64(path):
    """Both halves again with a float64 model (what `--dtype float64` runs): the loss follows the model's dtype
    and still vanishes. The floor is ~1e-13, not ~1e-30, because batches() holds f and the data in float32."""
    calib = load_calib(path)
    model = Exact64(calib.exact)
    for batch in calib.batches():
        loss = calib.loss(model, batch)
        assert loss.dtype == torch.float64
        assert loss.item() < 1e-11
    assert calib.evaluate(model)["rel_l2"] < 1e-6


@pytest.mark.parametrize("path", CALIBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_loss_and_evaluate_see_errors(path):
    """The zero tests are not vacuous: a 1 % scaled solution gives rel_l2 = 0.01 and a clearly positive loss, and the
    exact solution of a sibling script (another parameter value) gives a large loss and error."""
    calib = load_calib(path)
    batches = list(calib.batches())
    scaled = Exact64(calib.exact, scale=1.01)
    assert calib.evaluate(scaled)["rel_l2"] == pytest.approx(0.01, rel=1e-4)
    assert min(calib.loss(scaled, b).item() for b in batches) > 1e-5  # ≥ 4e-5 measured (advection: data term only)
    for sibling in sorted(p for p in path.parent.glob("calib_*.py") if p != path):
        other = Exact(load_calib(sibling).exact)
        assert min(calib.loss(other, b).item() for b in batches) > 1e-2
        assert calib.evaluate(other)["rel_l2"] > 0.05


@pytest.mark.parametrize("path", CALIBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_per_sample_loss_has_one_loss_per_point_and_loss_as_its_mean(path):
    """per_sample_loss (for --curvature fisher) is the same loss split over the points: one value per residual
    and boundary point, with mean equal to loss(), on a model that is not the solution."""
    calib = load_calib(path)
    model = calib.load_model().double()
    for batch in calib.batches():
        per_point = calib.per_sample_loss(model, batch)
        assert per_point.shape == (batch["x_res"].shape[0] + batch["x_bc"].shape[0],)
        assert per_point.min() >= 0
        torch.testing.assert_close(per_point.mean(), calib.loss(model, batch), rtol=1e-12, atol=0)


# the Stable-Diffusion-style kohya sample and the AdaLoRA sample (regenerated by sd/make_sd.py and
# llama/make_adalora.py)

SD = SAMPLES / "sd"
ADALORA = SAMPLES / "llama" / "adalora"


def evaluated(run_cli, adapter: Path, calib: Path) -> dict:
    result = run_cli("eval", adapter, "--calib", calib, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_the_sd_sample_is_a_small_fp16_kohya_file_with_one_locon_conv():
    from safetensors.torch import load_file

    tensors = load_file(str(SD / "lora.safetensors"))
    assert (SD / "lora.safetensors").stat().st_size < 150_000
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    downs = {k.removesuffix(".lora_down.weight"): t for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    assert all(k.startswith("lora_unet_") for k in downs) and len(downs) == 49
    convs = [k for k, t in downs.items() if t.dim() == 4 and t.shape[2:] == (3, 3)]  # (proj_in/out: 1×1 convs)
    assert convs == ["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert all(float(tensors[f"{k}.alpha"]) == t.shape[0] / 2 for k, t in downs.items())


def test_the_sd_sample_learned_its_task_and_eval_reproduces_the_recorded_loss(run_cli):
    """The adapter as stored (fp16) on the script's UNet: the loss it was trained to, far below the base's."""
    recorded = json.loads((SD / "results.json").read_text())
    measured = evaluated(run_cli, SD / "lora.safetensors", SD / "calib.py")
    assert measured["loss"] == pytest.approx(recorded["adapter (fp32, as trained)"]["calib_loss"], rel=1e-2)
    assert measured["metrics"]["mse"] < 0.5 * recorded["base"]["mse"]


def test_the_adalora_sample_is_read_as_adalora_and_answers_the_shifted_task(run_cli):
    recorded = json.loads((SAMPLES / "llama" / "adalora_results.json").read_text())
    inspected = run_cli("inspect", ADALORA, "--json")
    assert inspected.code == 0, inspected.stderr
    description = json.loads(inspected.stdout)
    assert description["input"]["format"] == "adalora"
    assert description["totals"]["rank"] == recorded["kept_rank"] < recorded["init_rank"]
    measured = evaluated(run_cli, ADALORA, SAMPLES / "llama" / "calib.py")
    assert measured["loss"] == pytest.approx(recorded["adapter"]["calib_loss"], rel=1e-4)
    assert measured["metrics"]["accuracy"] == 1.0
