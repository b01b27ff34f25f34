"""LoLDU files (built here from an LDU decomposition of a tiny model's weights) are read as
ΔW = P L diag(s·z − s₀·z₀) U, pruned, and written as PEFT LoRA adapters that load onto the original base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_tanh_mlp
from safetensors.torch import save_file

from sublora_cli.core.svd import factor_svd
from sublora_cli.formats import read_adapter

peft = pytest.importorskip("peft")

RANK = 4
INPUT = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))


def loldu_factors(weight: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LoLDU's init from W = P L D U (rank RANK, s₀ = alpha / r with alpha 2), then z and s moved as by training."""
    P, L, U = torch.linalg.lu(weight)
    D = torch.diagonal(U)
    U = U / D[:, None]
    z0, s0 = D[:RANK], torch.tensor(2.0 / RANK)
    return {
        "P": P,
        "L": L[:, :RANK].contiguous(),
        "U": U[:RANK].contiguous(),
        "z": z0 + 0.3 * torch.randn(RANK, generator=generator),
        "z0": z0.clone(),
        "scale": s0 * 1.2,
        "scale0": s0,
    }


def save_loldu(path: Path, drop: str | None = None, extra: dict | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """The LoLDU file of fc1 and fc2, and each module's true update to the original weights."""
    g = torch.Generator().manual_seed(5)
    model, tensors, deltas = tiny_tanh_mlp(), {}, {}
    for name in ("fc1", "fc2"):
        f = loldu_factors(getattr(model, name).weight.detach(), g)
        deltas[name] = f["P"].double() @ f["L"].double() @ torch.diag(
            f["scale"] * f["z"].double() - f["scale0"] * f["z0"].double()
        ) @ f["U"].double()
        tensors |= {f"{name}.loldu_{k}": v for k, v in f.items() if k != drop}
    save_file(tensors | (extra or {}), str(path))
    return path, deltas


def loldu_outputs(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the LoLDU-trained model computes: residual base + s·P L diag(z) U = original base + ΔW."""
    model = tiny_tanh_mlp()
    with torch.no_grad():
        for name, delta in deltas.items():
            getattr(model, name).weight.add_(delta.float())
        return model(INPUT)


def peft_model(path: Path):
    return peft.PeftModel.from_pretrained(tiny_tanh_mlp(), str(path)).eval()


def test_full_budget_loads_in_peft_with_the_loldu_outputs(tmp_path, run_cli):
    path, deltas = save_loldu(tmp_path / "model.safetensors")
    inspected = run_cli("inspect", path, "--json")
    assert inspected.code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["input"]["format"] == "loldu"
    adapter = read_adapter(path)
    for module in adapter.modules:
        dense = factor_svd(module.B, module.A, module.scale).dense()
        assert torch.linalg.norm(dense - deltas[module.name]) <= 1e-5 * torch.linalg.norm(deltas[module.name])
    result = run_cli("prune", path, "--budget", adapter.total_rank, "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["fc1", "fc2"]
    with torch.no_grad():
        written = peft_model(tmp_path / "out")(INPUT)
    assert (written - loldu_outputs(deltas)).abs().max() <= 1e-4


def test_a_cut_writes_the_truncated_svd(tmp_path, run_cli):
    path, _ = save_loldu(tmp_path / "model.safetensors")
    adapter = read_adapter(path)
    result = run_cli("prune", path, "--budget", 5, "--out", tmp_path / "out", "--min-rank", 1)
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "sublora_report.json").read_text())
    assert report["totals"]["rank_after"] == 5
    layers = dict(peft_model(tmp_path / "out").base_model.model.named_modules())
    modules = {m.name: m for m in adapter.modules}
    for entry in report["modules"]:
        module = modules[entry["name"]]
        expected = factor_svd(module.B, module.A, module.scale).dense(entry["kept"])
        got = layers[entry["name"]].get_delta_weight("default").double()
        assert torch.linalg.norm(got - expected) <= 1e-5 * torch.linalg.norm(expected), entry["name"]


def test_a_pickle_is_refused_with_the_layout_hint(tmp_path, run_cli):
    path = tmp_path / "loldu.pth"
    path.write_bytes(b"not read")
    result = run_cli("inspect", path)
    assert result.code == 1 and "safetensors" in result.stderr and "loldu_z0" in result.stderr


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        ("z0", None, "z0 and scale0 are needed"),
        ("U", None, "fc1.loldu_U"),
        (None, {"fc1.lora_A.weight": torch.zeros(2, 16)}, "not LoLDU factors"),
        (None, {"fc1.loldu_z0": torch.zeros(3)}, "LoLDU expects"),
        (None, {"fc2.loldu_z": torch.full((RANK,), float("nan"))}, "finite"),
    ],
    ids=["no_initial_z", "missing_factor", "stray_tensor", "bad_shape", "nan"],
)
def test_bad_loldu_files_are_refused(tmp_path, run_cli, drop, extra, message):
    path, _ = save_loldu(tmp_path / "model.safetensors", drop=drop, extra=extra)
    result = run_cli("inspect", path)
    assert result.code == 1 and message in result.stderr and "Traceback" not in result.stderr
