"""PEFT AdaLoRA adapters (saved by real peft) are read as LoRA and written as plain PEFT LoRA adapters that
PeftModel.from_pretrained loads with the same outputs at full budget and the truncated SVD at a cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2

from sublora_cli.core.svd import factor_svd
from sublora_cli.formats import read_adapter

peft = pytest.importorskip("peft")

TOKENS = torch.arange(12).reshape(2, 6)
INIT_R = 6
# rank_pattern masks as AdaLoRA's allocator leaves them: one module trimmed, one trimmed to nothing.
MASKS = {
    "transformer.h.0.attn.c_attn": [True, False, True, True, False, False],
    "transformer.h.1.mlp.c_fc": [False] * INIT_R,
}


def save_adalora(path: Path, masks: dict[str, list[bool]] | None = None, lora_alpha: int = 16) -> Path:
    """AdaLoRA (nonzero A, E, B) on the tiny GPT-2, saved by peft; `masks` set its rank_pattern as training does."""
    torch.manual_seed(2)
    config = peft.AdaLoraConfig(
        init_r=INIT_R, target_r=3, total_step=10, target_modules=["c_attn", "c_fc"], lora_alpha=lora_alpha
    )
    model = peft.get_peft_model(tiny_gpt2(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    if masks is not None:
        names = [n for n, _ in model.base_model.model.named_modules() if n.endswith(("c_attn", "c_fc"))]
        model.peft_config["default"].rank_pattern = {f"{n}.lora_E": masks.get(n, [True] * INIT_R) for n in names}
    model.save_pretrained(str(path))
    return path


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(tiny_gpt2(), str(path)).eval()(TOKENS).logits


def delta_weights(path: Path) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(tiny_gpt2(), str(path))
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): m.get_delta_weight("default").T.double()  # Conv1D: peft returns in × out
        for name, m in model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }


@pytest.mark.parametrize("masks", [None, MASKS], ids=["untrimmed", "rank_pattern"])
def test_full_budget_writes_a_lora_adapter_with_the_same_outputs(tmp_path, run_cli, masks):
    adapter = save_adalora(tmp_path / "adalora", masks)
    total = read_adapter(adapter).total_rank
    result = run_cli("prune", adapter, "--budget", total, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["input"]["format"] == "adalora"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "init_r" not in config
    if masks:
        assert config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 3
        assert "transformer.h.1.mlp.c_fc" in config["exclude_modules"]
    assert (logits(tmp_path / "out") - logits(adapter)).abs().max() <= 1e-4


def test_a_cut_writes_the_truncated_svd_of_the_adalora_update(tmp_path, run_cli):
    adapter_path = save_adalora(tmp_path / "adalora", MASKS)
    original = delta_weights(adapter_path)
    adapter = read_adapter(adapter_path)
    assert adapter.format.name == "adalora" and {m.name for m in adapter.modules} == set(original) - set(
        n for n, mask in MASKS.items() if not any(mask)
    )
    budget = adapter.total_rank // 2
    result = run_cli("prune", adapter_path, "--budget", budget, "--out", tmp_path / "out", "--min-rank", 1)
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "sublora_report.json").read_text())
    assert report["totals"]["rank_after"] == budget
    written = delta_weights(tmp_path / "out")
    modules = {m.name: m for m in adapter.modules}
    for entry in report["modules"]:
        module = modules[entry["name"]]
        spectrum = factor_svd(module.B, module.A, module.scale)
        assert torch.linalg.norm(spectrum.dense() - original[module.name]) <= 1e-5 * torch.linalg.norm(
            spectrum.dense()
        )
        expected = spectrum.dense(entry["kept"])
        got = written[module.name]
        assert torch.linalg.norm(got - expected) <= 1e-5 * torch.linalg.norm(expected), module.name


def test_lora_alpha_zero_scales_by_the_trimmed_rank_as_peft_does(tmp_path, run_cli):
    adapter = save_adalora(tmp_path / "adalora", MASKS, lora_alpha=0)
    total = read_adapter(adapter).total_rank
    result = run_cli("prune", adapter, "--budget", total, "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert (logits(tmp_path / "out") - logits(adapter)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(init_r=0), "init_r"),
        (lambda c: c.update(init_r=5), "rank"),
        (lambda c: c.update(rank_pattern={"transformer.h.0.attn.c_attn.lora_E": [True]}), "booleans"),
        (lambda c: c.update(lora_alpha="x"), "lora_alpha"),
    ],
    ids=["init_r", "rank_mismatch", "mask_length", "alpha"],
)
def test_bad_adalora_configs_are_refused(tmp_path, run_cli, edit, message):
    adapter = save_adalora(tmp_path / "adalora")
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    result = run_cli("inspect", adapter)
    assert result.code == 1 and message in result.stderr and "Traceback" not in result.stderr
