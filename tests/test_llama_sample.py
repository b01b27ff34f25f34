"""The causal-LM sample (sample_checkpoints/llama): its adapter prunes end to end with every kind of method, the
report's loss after pruning is the loss of the written adapter as peft reloads it, bf16 works; and stock
transformers models with their default (SDPA) attention get the exact Hessian."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

LLAMA = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "llama"
ADAPTER, CALIB = LLAMA / "adapter", LLAMA / "calib.py"


@pytest.fixture(scope="module")
def calib():
    spec = importlib.util.spec_from_file_location("llama_calib", CALIB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reloaded_loss(calib, adapter: Path) -> float:
    """Mean calibration loss of an adapter loaded by peft onto the script's base model."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(calib.load_model(), str(adapter)).eval()
    batches = calib.batches()
    with torch.no_grad():
        return sum(float(calib.loss(model, b)) for b in batches) / len(batches)


def test_sample_is_small_and_uses_default_attention(calib):
    files = [p for p in LLAMA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 20e6
    assert {p.name for p in ADAPTER.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == projections
    assert calib.load_model().config._attn_implementation == "sdpa"


def test_sequences_are_deterministic_and_the_answer_follows_the_rule(calib):
    a, b = calib.sequences(16, "shift", 3), calib.sequences(16, "shift", 3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["answer_mask"], b["answer_mask"])
    row = a["input_ids"][0].tolist()
    sep = row.index(calib.SEP)
    source = [t - calib.FIRST_SYMBOL for t in row[1:sep]]
    answer = [t - calib.FIRST_SYMBOL for t in row[sep + 1 : sep + 1 + len(source)]]
    assert answer == [(s + 1) % calib.N_SYMBOLS for s in source] and row[sep + 1 + len(source)] == calib.EOS


def test_per_sample_loss_ignores_padding(calib):
    model = calib.load_model().eval()
    batch = calib.batches()[0]
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :3])], 1) for k, v in batch.items()}  # 3 more PAD columns
    with torch.no_grad():
        assert torch.allclose(calib.per_sample_loss(model, batch), calib.per_sample_loss(model, padded), atol=1e-5)


def prune_report(run_cli, out: Path, *args) -> dict:
    result = run_cli("prune", ADAPTER, "--budget", "50%", "-o", out, *args)
    assert result.code == 0, result.stderr
    return json.loads((out / "sublora_report.json").read_text())


def test_magnitude_prunes_the_adapter_and_eval_matches_peft(calib, tmp_path, run_cli):
    """magnitude is data-free (it refuses --calib); `sublora eval --calib` measures what it wrote."""
    report = prune_report(run_cli, tmp_path / "magnitude", "--method", "magnitude")
    assert report["totals"]["rank_after"] == report["totals"]["rank_before"] // 2
    result = run_cli("eval", tmp_path / "magnitude", "--calib", CALIB, "--json")
    assert result.code == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["loss"] == pytest.approx(reloaded_loss(calib, tmp_path / "magnitude"), rel=1e-4)
    assert set(evaluated["metrics"]) == {"perplexity", "accuracy"}


def check_calibrated_prune(calib, tmp_path, run_cli, method: str, *args) -> dict:
    """Prune with --calib to 50 %; the report's losses are those of the adapters as peft reloads them."""
    out = tmp_path / method
    report = prune_report(run_cli, out, "--calib", CALIB, "--method", method, *args)
    assert report["totals"]["rank_after"] == report["totals"]["rank_before"] // 2
    assert report["loss"]["after"] == pytest.approx(reloaded_loss(calib, out), rel=1e-4)
    assert report["loss"]["before"] == pytest.approx(reloaded_loss(calib, ADAPTER), rel=1e-4)
    assert set(report["metrics"]["after"]) == {"perplexity", "accuracy"}
    return report


@pytest.mark.parametrize("method", ["linear", "diag", "sublora"])
def test_calibrated_methods_prune_the_adapter_with_the_fisher(method, calib, tmp_path, run_cli):
    report = check_calibrated_prune(calib, tmp_path, run_cli, method, "--curvature", "fisher")
    assert report["curvature"] == "fisher"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["diag", "sublora"])
def test_calibrated_methods_prune_the_adapter_with_exact_curvature(method, calib, tmp_path, run_cli):
    """auto: R = 448 over 2 batches is within its exact limit (896 HVPs, ~1 min per run on 2 busy cores)."""
    report = check_calibrated_prune(calib, tmp_path, run_cli, method)
    assert report["curvature"] == ("diag" if method == "diag" else "exact")


def test_bfloat16_prunes_the_sample(calib, tmp_path, run_cli):
    """bf16 forward passes (the Fisher, float64 accumulation); the report's loss is measured in bf16, so it
    matches the float32 peft reload only loosely."""
    report = prune_report(
        run_cli, tmp_path / "bf16", "--calib", CALIB, "--dtype", "bfloat16", "--curvature", "fisher"
    )
    assert report["loss"]["after"] == pytest.approx(reloaded_loss(calib, tmp_path / "bf16"), rel=5e-2)


BERT_CALIB = """
import torch
from transformers import BertConfig, BertModel

def load_model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config)  # transformers' default attention (sdpa)

def batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50, (4, 10), generator=g)} for _ in range(2)]

def loss(model, batch):  # regression onto a fixed target (LayerNorm would make a plain norm constant)
    hidden = model(input_ids=batch["input_ids"]).last_hidden_state
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(hidden)
    return (hidden - target).pow(2).mean()
"""


def save_bert_adapter(calib_path: Path, path: Path) -> Path:
    """A LoRA adapter (random nonzero B) on the attention projections of the script's BertModel."""
    from peft import LoraConfig, get_peft_model

    spec = importlib.util.spec_from_file_location("bert_calib", calib_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.load_model()
    assert base.config._attn_implementation == "sdpa"
    config = LoraConfig(r=2, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    torch.manual_seed(1)
    get_peft_model(base, config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stock_bert_with_default_attention_gets_the_exact_hessian(dtype, tmp_path, run_cli):
    calib = tmp_path / "calib.py"
    calib.write_text(BERT_CALIB)
    adapter = save_bert_adapter(calib, tmp_path / "adapter")
    out = tmp_path / "out"
    result = run_cli(
        "prune", adapter, "--calib", calib, "--curvature", "exact", "--dtype", dtype, "-b", "50%", "-o", out
    )
    assert result.code == 0, result.stderr
    assert json.loads((out / "sublora_report.json").read_text())["curvature"] == "exact"


def test_bfloat16_curvature_is_float64_and_close_to_float32(tmp_path):
    from sublora_cli.formats import read_adapter
    from sublora_cli.model.calibrated import open_calibration
    from sublora_cli.pipeline.spectra import adapter_spectra

    calib = tmp_path / "calib.py"
    calib.write_text(BERT_CALIB)
    adapter = read_adapter(save_bert_adapter(calib, tmp_path / "adapter"))
    spectra = adapter_spectra(adapter)
    curvatures = {}
    for dtype in ("float32", "bfloat16"):
        calibrated = open_calibration(calib, adapter, spectra, dtype=dtype)
        try:
            curvatures[dtype] = calibrated.curvature("exact", max_hessian_gb=1.0)
        finally:
            calibrated.close()
    low, ref = curvatures["bfloat16"], curvatures["float32"]
    assert low.gradient.dtype == low.hessian.dtype == torch.float64
    assert torch.linalg.norm(low.hessian - ref.hessian) <= 0.1 * torch.linalg.norm(ref.hessian)
    assert torch.linalg.norm(low.gradient - ref.gradient) <= 0.1 * torch.linalg.norm(ref.gradient)
