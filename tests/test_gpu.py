"""The same answers on a CUDA device as on the CPU. Skipped on machines without CUDA (CI has none);
bench/gpu_check.sh runs these on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
ADAPTER = SAMPLES / "elliptic" / "adapter_k2"
CALIB = SAMPLES / "elliptic" / "calib_k2.py"


def prune_json(run_cli, out: Path, *extra: str) -> dict:
    result = run_cli("prune", ADAPTER, "--budget", "50", "--calib", CALIB, "--out", out, "--json", *extra)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", ["sublora", "diag", "linear"])
def test_prune_on_cuda_matches_cpu(tmp_path, run_cli, method):
    common = ("--method", method, "--dtype", "float64")
    cpu = prune_json(run_cli, tmp_path / "cpu", *common, "--device", "cpu")
    gpu = prune_json(run_cli, tmp_path / "gpu", *common, "--device", "cuda")
    assert [m["kept"] for m in gpu["modules"]] == [m["kept"] for m in cpu["modules"]]
    for key in ("before", "after"):
        assert gpu["loss"][key] == pytest.approx(cpu["loss"][key], rel=1e-6)


@pytest.mark.parametrize("kind", ["exact", "fisher"])
def test_curvature_on_cuda_matches_cpu(kind):
    from sublora_cli.formats import read_adapter
    from sublora_cli.model.calibrated import open_calibration
    from sublora_cli.pipeline.spectra import adapter_spectra

    adapter = read_adapter(ADAPTER)
    spectra = adapter_spectra(adapter)
    results = {}
    for device in ("cpu", "cuda"):
        calibrated = open_calibration(CALIB, adapter, spectra, device, "float64")
        try:
            results[device] = calibrated.curvature(kind, 4.0)
        finally:
            calibrated.close()
    cpu, gpu = results["cpu"], results["cuda"]
    scale_g = float(cpu.gradient.abs().max())
    scale_h = float(cpu.hessian.abs().max())
    assert float((gpu.gradient - cpu.gradient).abs().max()) <= 1e-8 * scale_g
    assert float((gpu.hessian - cpu.hessian).abs().max()) <= 1e-8 * scale_h


@pytest.mark.parametrize(("optimizer", "train"), [("adam", "factors"), ("lorsum", "factors"), ("adam", "sigma")])
def test_training_rounds_on_cuda_match_cpu(tmp_path, run_cli, optimizer, train):
    """Alternating rounds (issue 14) train on the device: master factors, optimizer state, probes and re-initialised
    components all follow --device, and float64 training gives the CPU's losses and kept sets."""
    common = ("--dtype", "float64", "--rounds", "2", "--train-steps", "20", "--optimizer", optimizer, "--train", train)
    cpu = prune_json(run_cli, tmp_path / "cpu", *common, "--device", "cpu")
    gpu = prune_json(run_cli, tmp_path / "gpu", *common, "--device", "cuda")
    assert [m["kept"] for m in gpu["modules"]] == [m["kept"] for m in cpu["modules"]]
    for round_cpu, round_gpu in zip(cpu["rounds"], gpu["rounds"], strict=True):
        assert round_gpu["loss_after_training"] == pytest.approx(round_cpu["loss_after_training"], rel=1e-5)
    assert gpu["loss"]["after"] == pytest.approx(cpu["loss"]["after"], rel=1e-5)
