"""`--dtype-out`: the pruned adapter is written in the requested dtype, bytes budgets and the report count it, and
the reported loss after pruning is still the loss of the file as written."""

from __future__ import annotations

import pytest
import torch
from conftest import save_adapter
from safetensors.torch import load_file
from test_faithful import TOLERANCE, WEIGHTS, adapter_in, calib, reloaded  # noqa: F401 (calib is a fixture)

from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.model.calibrated import DTYPES

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def written_dtypes(out_dir) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(out_dir / WEIGHTS)).values()}


def test_half_precision_output_is_written_counted_and_measured_as_written(calib, tmp_path):  # noqa: F811
    adapter = adapter_in(torch.float32, tmp_path / "adapter")
    for name, dtype in HALF.items():
        options = PruneOptions(budget="50", calib=calib, method="linear", dtype="float64", dtype_out=name)
        fp32 = prune(adapter, PruneOptions(**{**vars(options), "dtype_out": "same"}), out_dir=tmp_path / f"{name}32")
        result = prune(adapter, options, out_dir=tmp_path / name)
        assert written_dtypes(result.out_dir) == {dtype}
        size, size32 = ((r.out_dir / WEIGHTS).stat().st_size for r in (result, fp32))
        assert 0.45 < size / size32 < 0.55
        totals = result.report["totals"]
        assert totals["bytes_after"] == 2 * totals["params_after"]
        assert totals["bytes_before"] == 2 * totals["params_before"]
        loss_after, _ = reloaded(result.out_dir, calib, DTYPES["float64"])
        assert result.report["loss"]["after"] == pytest.approx(loss_after, rel=TOLERANCE["float64"])


def test_a_bytes_budget_in_fp16_affords_twice_the_components(tmp_path):
    adapter = adapter_in(torch.float32, tmp_path / "adapter")
    ranks = {}
    for dtype_out in ("fp32", "fp16"):
        result = prune(adapter, PruneOptions(budget="20KiB", dtype_out=dtype_out), out_dir=tmp_path / dtype_out)
        ranks[dtype_out] = result.report["totals"]["rank_after"]
        assert result.report["budget"]["used"] <= 20 * 1024
    assert ranks["fp16"] == 2 * ranks["fp32"] > 0


def test_same_and_fp32_of_an_fp32_adapter_leave_the_output_as_today(tmp_path):
    adapter = adapter_in(torch.float32, tmp_path / "adapter")
    files = {}
    for dtype_out in ("same", "fp32"):
        result = prune(adapter, PruneOptions(budget="50", dtype_out=dtype_out), out_dir=tmp_path / dtype_out)
        files[dtype_out] = (result.out_dir / WEIGHTS).read_bytes()
    today = prune(adapter, PruneOptions(budget="50"), out_dir=tmp_path / "today")
    assert files["same"] == files["fp32"] == (today.out_dir / WEIGHTS).read_bytes()


def test_carried_tensors_and_unchanged_modules_are_cast(tmp_path):
    adapter = save_adapter("gpt2", tmp_path / "adapter")
    source = load_file(str(adapter / WEIGHTS))
    result = prune(adapter, PruneOptions(budget="100%", dtype_out="bf16"), out_dir=tmp_path / "out")
    written = load_file(str(result.out_dir / WEIGHTS))
    assert set(written) == set(source)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    for key, tensor in source.items():  # everything kept: each tensor is the input's, rounded
        assert torch.equal(written[key], tensor.to(torch.bfloat16))
    assert result.report["totals"]["carried_bytes"] == sum(2 * t.numel() for k, t in source.items() if "lora_" not in k)


def test_a_bad_dtype_out_is_a_usage_error(tmp_path, run_cli):
    adapter = adapter_in(torch.float32, tmp_path / "adapter")
    result = run_cli("prune", adapter, "--budget", "50", "--dtype-out", "fp8", "--out", tmp_path / "out")
    assert result.code == 2
    assert "fp8" in result.stderr and "fp16" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_kohya_file_is_written_in_the_output_dtype_with_its_alpha_kept(tmp_path, run_cli):
    from test_kohya import SD15, kohya_file, tensors_and_metadata

    path = kohya_file(tmp_path / "sd15.safetensors", SD15, dtype=torch.float32)
    result = run_cli("prune", path, "--out", tmp_path / "out", "--budget", "75%", "--dtype-out", "fp16")
    assert result.code == 0, result.stderr
    written, _ = tensors_and_metadata(tmp_path / "out" / path.name)
    source, _ = tensors_and_metadata(path)
    assert {t.dtype for k, t in written.items() if not k.endswith(".alpha")} == {torch.float16}
    for key in (k for k in written if k.endswith(".alpha")):  # alpha / rank keeps the scale at any rank
        rank = written[key.replace(".alpha", ".lora_down.weight")].shape[0]
        down = source[key.replace(".alpha", ".lora_down.weight")]
        assert float(written[key]) / rank == pytest.approx(float(source[key]) / down.shape[0], rel=1e-6)
