"""Refusing what is not a delta: PiSSA (and OLoRA, CorDA, LoRA-GA) adapters saved without conversion change the
base weights, so their B·A is not the update; the converted adapter (PEFT's path_initial_model_for_weight_conversion)
is a plain LoRA and is pruned like one. Adapters on raw parameters or with trainable tokens are refused with the
reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_tanh_mlp

from sublora_cli.formats import read_adapter

peft = pytest.importorskip("peft")

INPUT = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))


def train_pissa(tmp_path: Path, convert: bool) -> tuple[Path, torch.Tensor]:
    """A PiSSA adapter whose factors moved after init, saved with or without conversion, and the outputs of the
    trained PiSSA model (residual base + B·A) that a faithful adapter reproduces on the original base."""
    config = peft.LoraConfig(r=3, lora_alpha=3, target_modules=["fc1", "fc2"], init_lora_weights="pissa")
    model = peft.get_peft_model(tiny_tanh_mlp(), config)
    initial = tmp_path / "pissa_init"
    model.save_pretrained(str(initial))
    with torch.no_grad():  # stands in for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
        expected = model(INPUT)
    out = tmp_path / ("converted" if convert else "unconverted")
    if convert:
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial))
    else:
        model.save_pretrained(str(out))
    return out, expected


def outputs(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(tiny_tanh_mlp(), str(path)).eval()(INPUT)


def test_unconverted_pissa_is_refused_naming_the_conversion(tmp_path, run_cli):
    adapter, _ = train_pissa(tmp_path, convert=False)
    result = run_cli("prune", adapter, "--budget", 2, "--out", tmp_path / "out")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert "path_initial_model_for_weight_conversion" in result.stderr and "'pissa'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_converted_pissa_is_a_lora_delta_and_prunes_faithfully(tmp_path, run_cli):
    adapter, trained_outputs = train_pissa(tmp_path, convert=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 6  # what PEFT's conversion writes
    assert (outputs(adapter) - trained_outputs).abs().max() <= 1e-4
    total = read_adapter(adapter).total_rank
    result = run_cli("prune", adapter, "--budget", total, "--out", tmp_path / "full")
    assert result.code == 0, result.stderr
    assert (outputs(tmp_path / "full") - trained_outputs).abs().max() <= 1e-4
    result = run_cli("prune", adapter, "--budget", total // 2, "--out", tmp_path / "cut", "--min-rank", 1)
    assert result.code == 0, result.stderr
    assert read_adapter(tmp_path / "cut").total_rank == total // 2


def lora_adapter(path: Path, **config_changes) -> Path:
    model = peft.get_peft_model(tiny_tanh_mlp(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    model.save_pretrained(str(path))
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | config_changes))
    return path


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora", "corda", "lora_ga"])
def test_other_base_mutating_inits_are_refused(tmp_path, run_cli, init):
    result = run_cli("inspect", lora_adapter(tmp_path / "a", init_lora_weights=init))
    assert result.code == 1 and "path_initial_model_for_weight_conversion" in result.stderr


@pytest.mark.parametrize("init", [True, "gaussian", "eva", "loftq", "orthogonal"])
def test_inits_that_leave_the_base_alone_are_accepted(tmp_path, run_cli, init):
    result = run_cli("inspect", lora_adapter(tmp_path / "a", init_lora_weights=init))
    assert result.code == 0, result.stderr


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"target_parameters": ["experts.gate_up_proj"]}, "every expert"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
    ],
)
def test_raw_parameters_and_trainable_tokens_are_refused_with_the_reason(tmp_path, run_cli, change, reason):
    result = run_cli("inspect", lora_adapter(tmp_path / "a", **change))
    assert result.code == 1 and reason in result.stderr and "Traceback" not in result.stderr
