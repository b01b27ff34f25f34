"""A broken calibration script must read as a mistake in the script, in one message that points into it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from sublora_cli.core.svd import factor_svd
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import LoraModule
from sublora_cli.model.curvature import compute_curvature
from sublora_cli.model.reparam import SigmaModel
from sublora_cli.model.script import check_loss, load_calibration

GOOD = """
import torch

def load_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g) for _ in range(3)]

def loss(model, batch):
    return model(batch).pow(2).mean()

def evaluate(model):
    return {"out": model(torch.ones(1, 3)).sum(), "n": 3}
"""


def script(tmp_path: Path, source: str, name: str = "calib.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def sigma_model(calib, loss_fn=None) -> SigmaModel:
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    module = LoraModule("0", "linear", A, B, 2.0, 1.0, (2, 3), (4, 2))
    model = calib.call_load_model()
    return SigmaModel(model, [module], [factor_svd(B, A, 1.0)], loss_fn or calib.call_loss)


def test_good_script_round_trip(tmp_path):
    calib = load_calibration(script(tmp_path, GOOD))
    batches = calib.call_batches()
    assert len(batches) == 3 and calib.evaluate is not None
    sm = sigma_model(calib)
    curv = compute_curvature(sm, batches)
    assert curv.loss == pytest.approx(sm.mean_loss(sm.sigma, batches)) and not curv.is_zero
    metrics = sm.evaluate(sm.sigma, calib.call_evaluate)
    assert set(metrics) == {"out", "n"} and all(isinstance(v, float) for v in metrics.values())


def test_missing_file_and_missing_function(tmp_path):
    with pytest.raises(SubloraError, match="does not exist"):
        load_calibration(tmp_path / "nope.py")
    path = script(tmp_path, GOOD.replace("def loss(", "def my_loss("))
    with pytest.raises(
        SubloraError, match=r"does not define loss\(\).*It defines: batches, evaluate, load_model, my_loss"
    ):
        load_calibration(path)
    assert load_calibration(script(tmp_path, GOOD.replace("def evaluate(", "def _evaluate("))).evaluate is None


def test_script_raising_shows_the_users_traceback(tmp_path):
    path = script(tmp_path, GOOD + "\nlimit = {}['missing']\n", "broken_import.py")
    with pytest.raises(SubloraError) as info:
        load_calibration(path)
    message = str(info.value)
    assert "while being imported" in message and "broken_import.py" in message and "KeyError: 'missing'" in message
    assert "importlib" not in message and "sublora_cli" not in message

    source = GOOD.replace("return model(batch).pow(2).mean()", "return helper(model, batch)") + textwrap.dedent("""
        def helper(model, batch):
            return model(batch[:, :2]).mean()  # wrong width: raises inside torch
    """)
    calib = load_calibration(script(tmp_path, source, "broken_loss.py"))
    sm = sigma_model(calib)
    with pytest.raises(SubloraError) as info:
        sm.mean_loss(sm.sigma, calib.call_batches())
    message = str(info.value)
    assert "raised in loss(model, batch)" in message and "Traceback" in message
    assert "in loss" in message and "in helper" in message and "wrong width" in message
    assert "reparam.py" not in message and "curvature.py" not in message

    with pytest.raises(SubloraError, match="SyntaxError"):
        load_calibration(script(tmp_path, "def load_model(:\n", "syntax.py"))


def test_bad_return_values(tmp_path):
    """Each case redefines one function after GOOD (the last definition wins)."""
    with pytest.raises(SubloraError, match="no batches"):
        load_calibration(script(tmp_path, GOOD + "\ndef batches():\n    return iter([])\n")).call_batches()
    with pytest.raises(SubloraError, match="must return a torch.nn.Module"):
        load_calibration(script(tmp_path, GOOD + "\ndef load_model():\n    return None\n")).call_load_model()
    for bad in ("[1.0]", "{'acc': 'high'}", "{1: 0.5}"):
        calib = load_calibration(script(tmp_path, GOOD + f"\ndef evaluate(model):\n    return {bad}\n"))
        with pytest.raises(SubloraError, match="dict of"):
            calib.call_evaluate(torch.nn.Identity())

    calib = load_calibration(script(tmp_path, GOOD + "\ndef loss(model, batch):\n    return model(batch) ** 2\n"))
    sm = sigma_model(calib)
    with pytest.raises(SubloraError, match=r"returned a tensor of shape \(5, 1\) on batch 0"):
        sm.mean_loss(sm.sigma, calib.call_batches())
    nan_on_negative = "\ndef loss(model, batch):\n    return model(batch).mean() / (batch > 0).float().mean()\n"
    calib = load_calibration(script(tmp_path, GOOD + nan_on_negative))
    with pytest.raises(SubloraError, match=r"returned (nan|inf|-inf) on batch 1"):
        compute_curvature(sigma_model(calib), [torch.ones(2, 3), -torch.ones(2, 3)])
    with pytest.raises(SubloraError, match="returned a float"):
        check_loss(0.5, 2)


def test_zero_curvature_is_detected(tmp_path):
    """A script whose loss never touches the adapted module: the CLI must be able to warn."""
    source = GOOD.replace("return model(batch).pow(2).mean()", "return model[2](torch.ones(1, 4)).sum() * batch.mean()")
    calib = load_calibration(script(tmp_path, source))
    curv = compute_curvature(sigma_model(calib), calib.call_batches(), "diag")
    assert curv.is_zero


def test_sys_exit_in_the_script_is_a_script_error(tmp_path):
    with pytest.raises(SubloraError, match="SystemExit: 3"):
        load_calibration(script(tmp_path, GOOD + "\nimport sys\nsys.exit(3)\n"))
    calib = load_calibration(script(tmp_path, GOOD + "\ndef batches():\n    raise SystemExit('no data')\n"))
    with pytest.raises(SubloraError, match=r"raised in batches\(\)"):
        calib.call_batches()
