"""Issue 21: adapters and flag values a careless script produces. A negative alpha is a valid update and is
pruned faithfully in every format (never NaN); damaged files and numbers past any adapter are refused by name,
with the documented exit code and no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BASE_MODELS, elliptic_script, save_adapter
from safetensors.torch import load_file, save_file
from test_kohya import SD15, deltas, diffusers_file, kohya_file, relative_error

from sublora_cli.core.svd import factor_svd
from sublora_cli.formats import read_adapter

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_checkpoints" / "elliptic"


def expected_deltas(path: Path, report: dict) -> dict[str, torch.Tensor]:
    """Each module's truncated SVD at the kept set the report names, from the input as read."""
    kept = {m["name"]: m["kept"] for m in report["modules"]}
    return {m.name: factor_svd(m.B, m.A, m.scale).dense(kept[m.name]) for m in read_adapter(path).modules}


def pruned(run_cli, path: Path, out: Path, *args) -> dict:
    result = run_cli("prune", path, "--budget", "50%", "--min-rank", 1, "--out", out, "--json", *args)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_negative_peft_alpha_is_pruned_faithfully_and_peft_loads_it(tmp_path, run_cli):
    peft = pytest.importorskip("peft")
    adapter = save_adapter("bert", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": -12}))
    report = pruned(run_cli, adapter, tmp_path / "out")
    expected = expected_deltas(adapter, report)
    model = peft.PeftModel.from_pretrained(BASE_MODELS["bert"](), str(tmp_path / "out"))
    from peft.tuners.lora import LoraLayer

    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, delta in expected.items():
        merged = layers[name].get_delta_weight("default").double()
        assert torch.isfinite(merged).all()
        assert relative_error(merged, delta) <= 1e-5
    assert all(m.scale < 0 for m in read_adapter(tmp_path / "out").modules)


def test_a_negative_kohya_alpha_is_pruned_faithfully(tmp_path, run_cli):
    path = kohya_file(tmp_path / "neg.safetensors", SD15, dtype=torch.float32, alpha_ratio=-0.5)
    report = pruned(run_cli, path, tmp_path / "out")
    written = load_file(tmp_path / "out" / path.name)
    assert all(torch.isfinite(t).all() for t in written.values())
    after, expected = deltas(tmp_path / "out" / path.name), expected_deltas(path, report)
    for name, delta in expected.items():
        assert relative_error(after[name], delta) <= 1e-5


def test_a_negative_diffusers_metadata_alpha_is_pruned_faithfully(tmp_path, run_cli):
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": -4, "text_encoder.r": 4})}
    path = diffusers_file(tmp_path / "d.safetensors", metadata)
    report = pruned(run_cli, path, tmp_path / "out")
    after, expected = deltas(tmp_path / "out" / path.name), expected_deltas(path, report)
    assert any(m.scale < 0 for m in read_adapter(path).modules)
    for name, delta in expected.items():
        assert torch.isfinite(after[name]).all() and relative_error(after[name], delta) <= 1e-5


def refused(result, needle: str, code: int = 1) -> None:
    assert result.code == code, (result.stdout, result.stderr)
    text = " ".join(result.stderr.split())
    assert needle in text, text
    assert "unexpected" not in text and "Traceback" not in text


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("unet.lora_alpha", "four", "lora_adapter_metadata (unet): lora_alpha = 'four'"),
        ("unet.lora_alpha", None, "lora_alpha = None"),
        ("unet.lora_alpha", 0, "lora_alpha = 0; lora_alpha must be a non-zero number"),
        ("unet.alpha_pattern", {"mid_block.attentions.0.proj_out": None}, "alpha_pattern['mid_block"),
        ("unet.alpha_pattern", ["x"], "alpha_pattern must be an object"),
    ],
)
def test_malformed_diffusers_alphas_are_named(field, value, needle, tmp_path, run_cli):
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, field: value})}
    path = diffusers_file(tmp_path / "d.safetensors", metadata)
    refused(run_cli("prune", path, "--budget", "50%", "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_a_zero_peft_alpha_is_refused(tmp_path, run_cli):
    adapter = tmp_path / "adapter"
    shutil.copytree(SAMPLE / "adapter_k2", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0}))
    refused(run_cli("prune", adapter, "--budget", "50", "--out", tmp_path / "out"), "lora_alpha = 0")


@pytest.mark.parametrize("damage", ["fp8", "empty_down", "empty_up"])
def test_fp8_and_zero_size_factors_are_refused_by_name(damage, tmp_path, run_cli):
    path = kohya_file(tmp_path / "lora.safetensors", SD15, dtype=torch.float32)
    tensors = load_file(path)
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_" + ("up" if damage == "empty_up" else "down") + ".weight"
    if damage == "fp8":
        tensors = {k: v.to(torch.float8_e4m3fn) if "lora_" in k else v for k, v in tensors.items()}
        needle = "float8_e4m3fn; sublora reads factors stored as float16, bfloat16, float32 or float64"
    else:
        tensors[key] = tensors[key][:, :0] if damage == "empty_up" else tensors[key][:0]
        needle = "no entries"
    save_file(tensors, str(path))
    refused(run_cli("inspect", path), needle)
    refused(run_cli("prune", path, "--budget", "50%", "--out", tmp_path / "out"), needle)


def test_a_peft_adapter_with_fp8_factors_is_refused(tmp_path, run_cli):
    adapter = tmp_path / "adapter"
    shutil.copytree(SAMPLE / "adapter_k2", adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(weights).items()}, str(weights))
    refused(run_cli("prune", adapter, "--budget", "50", "--out", tmp_path / "out"), "float8_e4m3fn")


def test_an_adalora_rank_pattern_that_is_a_list_is_refused(tmp_path, run_cli):
    from test_adalora import save_adalora

    adapter = save_adalora(tmp_path / "adalora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": [[True, False]]}))
    refused(run_cli("prune", adapter, "--budget", "2", "--out", tmp_path / "out"), "rank_pattern must be an object")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--budget", "1e300TB"], "larger than any adapter can be"),
        (["--budget", "1e308TB"], "larger than any adapter can be"),
        (["--budget", "50", "--max-rank", str(10**30)], "larger than any module's rank"),
        (["--budget", "50", "--max-rank", f"fc1={10**30}"], "larger than any module's rank"),
        (["--budget", "50", "--seed", str(10**23)], "outside the seeds torch accepts"),
        (["--budget", "50", "--lr", "nan"], "nan is not positive"),
        (["--budget", "50", "--lr", "inf"], "not a finite number"),
        (["--budget", "50", "--max-hessian-gb", "nan"], "nan is not positive"),
        (["--budget", "50", "--device", "meta"], "meta tensors hold shapes but no values"),
    ],
)
def test_numbers_past_any_adapter_and_nan_are_usage_errors(args, needle, tmp_path, run_cli):
    refused(run_cli("prune", SAMPLE / "adapter_k2", *args, "--out", tmp_path / "out"), needle, code=2)
    assert not (tmp_path / "out").exists()


def test_a_model_on_the_meta_device_is_refused(tmp_path, run_cli):
    body = "_load = load_model\ndef load_model():\n    return _load().to('meta')\n"
    script = elliptic_script(tmp_path / "calib.py", body)
    result = run_cli("prune", SAMPLE / "adapter_k2", "--calib", script, "--budget", "50", "--out", tmp_path / "out")
    refused(result, "parameters on the meta device")
