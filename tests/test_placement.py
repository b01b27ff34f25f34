"""`--device auto`/`--dtype auto` (the defaults) leave the model as load_model() returned it; `--curvature auto`
falls back to the Fisher when the model cannot be differentiated twice."""

from __future__ import annotations

import json

import pytest
import torch
from test_prune_calibrated import CALIB, make_problem

from sublora_cli.core.svd import factor_svd
from sublora_cli.formats.base import LoraModule
from sublora_cli.model.reparam import SigmaModel, placement


def lora(name: str, out_f: int, in_f: int, r: int) -> tuple[LoraModule, object]:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    module = LoraModule(name, "linear", A, B, float(r), 1.0, tuple(A.shape), tuple(B.shape))
    return module, factor_svd(B, A, 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_auto_keeps_the_models_device_and_dtype(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dtype)
    module, spectrum = lora("0", 4, 5, 2)
    weight = model[0].weight
    sm = SigmaModel(model, [module], [spectrum], lambda m, b: m(b).pow(2).mean())
    assert sm.model is model and model[0].weight is weight  # not moved, not cast, not copied
    assert (sm.device, sm.dtype) == (torch.device("cpu"), dtype)
    assert sm.sigma.dtype == dtype
    loss = sm.loss(sm.sigma, torch.randn(3, 5))  # float32 inputs are cast to the model's dtype
    assert loss.dtype == dtype


def test_an_explicit_dtype_still_casts():
    model = torch.nn.Linear(5, 4)
    module, spectrum = lora("", 4, 5, 2)
    sm = SigmaModel(model, [module], [spectrum], lambda m, b: m(b).sum(), dtype=torch.float64)
    assert model.weight.dtype == torch.float64 and sm.dtype == torch.float64


def test_placement_reads_the_first_parameter():
    model = torch.nn.Sequential(torch.nn.Embedding(3, 2), torch.nn.Linear(2, 2).to(torch.float16))
    assert placement(model) == (torch.device("cpu"), torch.float32)
    assert placement(torch.nn.ReLU()) == (torch.device("cpu"), torch.float32)


ONCE_DIFFERENTIABLE = CALIB.replace(
    "class TinyMLP",
    """class Tanh1(torch.autograd.Function):  # a fused op with a first derivative only, as many custom kernels
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is wanted
            raise RuntimeError("derivative for tanh1_backward is not implemented")
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

class TinyMLP""",
).replace("torch.tanh(self.fc2(torch.tanh(self.fc1(x))))", "Tanh1.apply(self.fc2(Tanh1.apply(self.fc1(x))))")


def test_auto_falls_back_to_the_fisher_when_the_model_has_no_second_derivative(tmp_path, run_cli):
    adapter, calib = make_problem(tmp_path / "problem", ONCE_DIFFERENTIABLE)
    out = tmp_path / "out"
    result = run_cli("prune", adapter, "--calib", calib, "--budget", 3, "--out", out)
    assert result.code == 0, result.stderr
    report = json.loads((out / "sublora_report.json").read_text())
    assert report["curvature"] == "fisher"
    reason = report["calibration"]["curvature_reason"]
    assert "Hessian-vector product on batch 0 failed" in reason and "Fisher" in reason
    assert "batch 0 failed" in " ".join(result.stderr.split())  # said up front, too
    asked = run_cli("prune", adapter, "--calib", calib, "-b", 3, "--curvature", "exact", "-o", tmp_path / "x")
    assert asked.code == 1  # asked for explicitly, exact is not replaced: the error says why it cannot run
