"""Interop with the real peft library: pruned adapters load with PeftModel.from_pretrained and are exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BASE_MODELS, model_output, save_adapter

from sublora_cli.adapters import read_adapter
from sublora_cli.svd import factor_svd

peft = pytest.importorskip("peft")


def load_pruned(family: str, path):
    model = peft.PeftModel.from_pretrained(BASE_MODELS[family](), str(path))
    return model.eval()


def lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_full_budget_reproduces_the_original_outputs(family, tmp_path, run_cli):
    adapter = save_adapter(family, tmp_path / "adapter")
    original = model_output(load_pruned(family, adapter), family)
    total = read_adapter(adapter).total_rank
    result = run_cli("prune", adapter, "--budget", total, "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "nothing to prune" in result.stderr
    pruned = model_output(load_pruned(family, tmp_path / "out"), family)
    assert (pruned - original).abs().max() <= 1e-4


def test_pruned_modules_merge_to_the_kept_components(family, tmp_path, run_cli):
    adapter_path = save_adapter(family, tmp_path / "adapter")
    adapter = read_adapter(adapter_path)
    budget = adapter.total_rank // 2
    result = run_cli("prune", adapter_path, "--budget", budget, "--out", tmp_path / "out", "--min-rank", 1)
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "sublora_report.json").read_text())
    assert report["totals"]["rank_after"] == budget
    layers = lora_layers(load_pruned(family, tmp_path / "out"))
    modules = {m.name: m for m in adapter.modules}
    changed = 0
    for entry in report["modules"]:
        module = modules[entry["name"]]
        layer = layers[entry["name"]]
        assert layer.r["default"] == entry["rank_after"]
        spectrum = factor_svd(module.B, module.A, module.scale)
        expected = spectrum.dense(entry["kept"])
        merged = layer.get_delta_weight("default").double()
        if module.kind == "embedding":
            merged = merged.T  # peft returns the embedding table's update (num × dim)
        elif getattr(layer, "fan_in_fan_out", False):
            merged = merged.T  # Conv1D stores weights as in × out
        merged = merged.reshape(expected.shape)
        assert torch.linalg.norm(merged - expected) / torch.linalg.norm(expected) <= 1e-5, entry["name"]
        assert entry["sigma"] == pytest.approx([float(spectrum.sigma[i]) for i in entry["kept"]])
        changed += entry["rank_after"] < entry["rank_before"]
    assert changed > 0


def test_modules_pruned_to_zero_are_dropped_and_the_model_still_loads(tmp_path, run_cli):
    # Shrink the second block's attention so magnitude pruning removes it entirely.
    adapter_path = save_adapter("gpt2", tmp_path / "adapter", shrink={"h.1.attn.c_attn": 1e-4})
    result = run_cli("prune", adapter_path, "--budget", 10, "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "sublora_report.json").read_text())
    dropped = [m["name"] for m in report["modules"] if m["rank_after"] == 0]
    assert "transformer.h.1.attn.c_attn" in dropped
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(dropped) <= set(config["exclude_modules"])
    model = load_pruned("gpt2", tmp_path / "out")
    layers = lora_layers(model)
    assert not set(dropped) & set(layers)
    assert sum(layer.r["default"] for layer in layers.values()) == 10
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert not any("h.1.attn.c_attn.lora" in k for k in keys)
    assert "base_model.model.transformer.ln_f.weight" in keys  # modules_to_save carried through
    assert "base_model.model.transformer.h.1.attn.c_attn.base_layer.bias" in keys  # bias="lora_only" carried
    model_output(model, "gpt2")


def test_input_is_never_modified(tmp_path, run_cli):
    adapter_path = save_adapter("bert", tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in adapter_path.iterdir()}
    assert run_cli("prune", adapter_path, "--budget", "50%", "--out", tmp_path / "out").code == 0
    assert {p.name: p.read_bytes() for p in adapter_path.iterdir()} == before
