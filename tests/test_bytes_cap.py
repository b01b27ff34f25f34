"""A bytes budget is a hard cap on every tensor written: the factors, the carried tensors (modules_to_save, biases,
kohya's non-LoRA tensors) and the format's own (kohya's `.alpha` scalars), in every format and output dtype."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import save_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_adalora import save_adalora
from test_kohya import SD15, diffusers_file, kohya_file
from test_loldu import save_loldu

from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.errors import SubloraError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CARRIED_KEY = "lora_unet_conv_in.diff"  # a kohya tensor that is not a LoRA pair: carried whole


def recast(path: Path, dtype: torch.dtype) -> Path:
    """Every floating tensor of every safetensors file under `path` stored in `dtype`, as a trainer saving in it."""
    for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"} if path.is_dir() else None)
    return path


BUILDERS = {
    "peft-gpt2": lambda d: save_adapter("gpt2", d / "adapter"),  # Conv1D, embedding, modules_to_save, biases
    "peft-conv": lambda d: save_adapter("conv", d / "adapter"),
    "kohya-locon": lambda d: kohya_file(d / "sd15.safetensors", SD15, dtype=torch.float32),
    "kohya-odd-alpha": lambda d: kohya_file(  # alpha / rank · k that half precision cannot hold: float32 alphas
        d / "sd15.safetensors", SD15, dtype=torch.float32, alpha_ratio=0.3, extra={CARRIED_KEY: torch.ones(4, 3)}
    ),
    "diffusers": lambda d: diffusers_file(d / "pytorch_lora_weights.safetensors"),
    "adalora": lambda d: save_adalora(d / "adapter"),
    "loldu": lambda d: save_loldu(d / "loldu.safetensors")[0],
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every format stored in every dtype, built once."""
    built = {}
    for name, build in BUILDERS.items():
        for dtype_name, dtype in DTYPES.items():
            directory = tmp_path_factory.mktemp(f"{name}-{dtype_name}")
            built[name, dtype_name] = recast(build(directory), dtype)
    return built


def written_tensor_bytes(out_dir: Path) -> int:
    return sum(t.numel() * t.element_size() for f in out_dir.glob("*.safetensors") for t in load_file(str(f)).values())


def whole_bytes(path: Path, dtype_out: str) -> int:
    """The input's tensors in the output dtype (AdaLoRA's E and ranknum and LoLDU's P, z0, … are not written, so
    this is only a scale for drawing budgets)."""
    size = DTYPES[dtype_out].itemsize if dtype_out in DTYPES else None
    return sum(t.numel() * (size or t.element_size()) for t in load_file(str(_weights(path))).values())


def _weights(path: Path) -> Path:
    return path if path.is_file() else path / "adapter_model.safetensors"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(BUILDERS)),
    dtype=st.sampled_from(sorted(DTYPES)),
    dtype_out=st.sampled_from(["same", *sorted(DTYPES)]),
    share=st.floats(0.02, 1.2),
    method=st.sampled_from(["magnitude", "balanced"]),
)
def test_no_bytes_budget_is_exceeded_by_the_written_file(
    adapters, tmp_path_factory, fmt, dtype, dtype_out, share, method
):
    path = adapters[fmt, dtype]
    budget = max(1, math.floor(share * whole_bytes(path, dtype_out)))
    out = tmp_path_factory.mktemp("out") / "pruned"
    try:
        result = prune(path, PruneOptions(budget=f"{budget}B", method=method, dtype_out=dtype_out), out_dir=out)
    except SubloraError as e:  # only when the budget cannot pay for what is written whatever is kept and one component
        assert "which are written whatever is kept" in str(e) or "less than the cheapest component" in str(e)
        return
    written = written_tensor_bytes(out)
    used = result.report["budget"]["used"]
    assert written <= used <= budget
    if fmt.startswith(("peft", "adalora", "loldu", "diffusers")):  # nothing but factors and carried tensors
        assert written == used
    assert json.loads((out / "sublora_report.json").read_text())["totals"]["carried_bytes"] == (
        result.report["budget"]["carried"]
    )


def test_kohya_alphas_are_paid_for(tmp_path):
    """A budget of exactly the factors' bytes used to keep everything and write the alphas on top; now it prunes."""
    path = kohya_file(tmp_path / "sd15.safetensors", SD15, dtype=torch.float16)
    tensors = load_file(str(path))
    factors = sum(2 * v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
    result = prune(path, PruneOptions(budget=f"{factors}B"), out_dir=tmp_path / "out")
    assert result.report["budget"]["carried"] == 2 * len(SD15)  # the fp16 alphas
    assert result.report["totals"]["rank_after"] < result.report["totals"]["rank_before"]
    assert written_tensor_bytes(tmp_path / "out") <= factors
