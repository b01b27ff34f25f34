"""Interop with the real peft library: pruned adapters load with PeftModel.from_pretrained and are exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BASE_MODELS, model_output, save_adapter

from sublora_cli.core.svd import factor_svd
from sublora_cli.formats import read_adapter

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
    # bias="lora_only": carried, under the plain layer's name now that peft no longer wraps the dropped module
    assert "base_model.model.transformer.h.1.attn.c_attn.bias" in keys
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    model_output(model, "gpt2")


def test_input_is_never_modified(tmp_path, run_cli):
    adapter_path = save_adapter("bert", tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in adapter_path.iterdir()}
    assert run_cli("prune", adapter_path, "--budget", "50%", "--out", tmp_path / "out").code == 0
    assert {p.name: p.read_bytes() for p in adapter_path.iterdir()} == before


GPT2_CALIB = """
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2

def load_model():
    return tiny_gpt2()

def batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(2)]

def per_sample_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)
"""


def peft_loss(path, calib) -> float:
    """The calibration loss of an adapter as peft itself loads it (modules_to_save, biases and all)."""
    from sublora_cli.model.script import load_calibration

    script = load_calibration(calib)
    model = load_pruned("gpt2", path)
    with torch.no_grad():
        return sum(float(script.call_loss(model, b)) for b in script.call_batches()) / 2


def test_calibration_sees_modules_to_save_and_biases_and_fisher_prunes_gpt2(tmp_path, run_cli):
    """The gpt2 adapter carries a modules_to_save copy of ln_f and lora_only biases: the loss sublora measures
    must be peft's, before pruning and (reloaded) after a Fisher-curvature prune with per-sample losses."""
    from safetensors.torch import load_file, save_file

    adapter = save_adapter("gpt2", tmp_path / "adapter")
    weights = str(adapter / "adapter_model.safetensors")
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(3)
    for key, value in tensors.items():
        if "lora_" not in key:  # as if trained: they now differ from the base model's
            tensors[key] = value + 0.5 * torch.randn(value.shape, generator=g)
    save_file(tensors, weights)
    calib = tmp_path / "calib.py"
    calib.write_text(GPT2_CALIB)
    result = run_cli("prune", adapter, "--calib", calib, "-b", 4, "--curvature", "fisher", "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "sublora_report.json").read_text())
    assert report["curvature"] == "fisher" and report["calibration"]["samples"] == 8
    loss = report["loss"]
    assert loss["before"] == pytest.approx(peft_loss(adapter, calib), rel=1e-6)
    assert loss["after"] == pytest.approx(peft_loss(tmp_path / "out", calib), rel=1e-6)
    assert abs(loss["after"] - loss["before"]) > 1e-5  # the prune changed something measurable


def test_carried_tensors_the_model_lacks_are_refused(tmp_path, run_cli):
    adapter = save_adapter("gpt2", tmp_path / "adapter")
    calib = tmp_path / "calib.py"
    calib.write_text(
        GPT2_CALIB.replace("return tiny_gpt2()", "m = tiny_gpt2(); m.transformer.ln_f = torch.nn.Identity(); return m")
    )
    result = run_cli("eval", adapter, "--calib", calib)
    assert result.code == 1 and "transformer.ln_f." in result.stderr and "modules_to_save" in result.stderr


def test_exact_curvature_runs_through_default_sdpa_attention(tmp_path, run_cli):
    """transformers' default attention (fused SDPA, no double backward on the CPU) gets the exact Hessian
    through the math kernel, with the same selection and losses as eager attention."""
    adapter = save_adapter("gpt2", tmp_path / "adapter")
    calib = tmp_path / "calib.py"
    reports = {}
    eager = 'm = tiny_gpt2()\n    m.set_attn_implementation("eager")\n    return m'
    for name, source in (("sdpa", GPT2_CALIB), ("eager", GPT2_CALIB.replace("return tiny_gpt2()", eager))):
        calib.write_text(source)
        result = run_cli("prune", adapter, "--calib", calib, "-b", 10, "--curvature", "exact", "-o", tmp_path / name)
        assert result.code == 0, result.stderr
        reports[name] = json.loads((tmp_path / name / "sublora_report.json").read_text())
    assert reports["sdpa"]["curvature"] == "exact"
    assert [m["kept"] for m in reports["sdpa"]["modules"]] == [m["kept"] for m in reports["eager"]["modules"]]
    for key in ("before", "after"):
        assert reports["sdpa"]["loss"][key] == pytest.approx(reports["eager"]["loss"][key], rel=1e-5)
