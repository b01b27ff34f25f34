"""Every bad input the tool promises to reject: exit 1, one clear paragraph, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def write_adapter(path, tensors=None, config=None):
    """A minimal hand-made PEFT LoRA directory (module `lin`, out 3, in 4, r 2)."""
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        g = torch.Generator().manual_seed(0)
        tensors = {
            f"{PREFIX}lin.lora_A.weight": torch.randn(2, 4, generator=g),
            f"{PREFIX}lin.lora_B.weight": torch.randn(3, 2, generator=g),
        }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]}
    (path / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    return path


def assert_refused(result, *needles, out=None):
    assert result.code == 1, (result.code, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert needle.lower() in message.lower(), message
    if out is not None:
        assert not out.exists(), "a refused run must not leave output behind"
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_path(tmp_path, run_cli):
    assert_refused(run_cli("prune", tmp_path / "nope", "--budget", "1"), "does not exist")


def test_directory_without_config(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli("inspect", tmp_path / "empty"), "adapter_config.json")


def test_safetensors_without_lora_keys(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a", tensors={"something.weight": torch.ones(3)})
    assert_refused(
        run_cli("prune", path, "--budget", "1", "--out", tmp_path / "o"),
        "no LoRA factors",
        out=tmp_path / "o",
    )


def test_factor_shapes_that_disagree(tmp_path, run_cli):
    tensors = {f"{PREFIX}lin.lora_A.weight": torch.ones(2, 4), f"{PREFIX}lin.lora_B.weight": torch.ones(3, 3)}
    path = write_adapter(tmp_path / "a", tensors=tensors)
    assert_refused(run_cli("prune", path, "--budget", "1", "--out", tmp_path / "o"), "disagree", out=tmp_path / "o")


def test_rank_that_disagrees_with_the_config(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a", config={"r": 3})
    assert_refused(run_cli("inspect", path), "r=3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor(tmp_path, run_cli, bad):
    A = torch.ones(2, 4)
    A[0, 1] = bad
    tensors = {f"{PREFIX}lin.lora_A.weight": A, f"{PREFIX}lin.lora_B.weight": torch.ones(3, 2)}
    path = write_adapter(tmp_path / "a", tensors=tensors)
    assert_refused(run_cli("prune", path, "--budget", "1", "--out", tmp_path / "o"), "NaN or Inf", out=tmp_path / "o")


def assert_usage_error(result, *needles):
    """A malformed flag value: exit 2, click's usage message naming the flag, no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert needle.lower() in message.lower(), message


@pytest.mark.parametrize("budget", ["abc", "0", "-3", "0%", "150%", "1.5", "50.5", "-0.5", "nan", "5 0"])
def test_malformed_or_non_positive_budget(tmp_path, run_cli, budget):
    path = write_adapter(tmp_path / "a")
    assert_usage_error(run_cli("prune", path, "--budget", budget, "--out", tmp_path / "o"), "--budget")
    assert not (tmp_path / "o").exists()
    config = tmp_path / "sublora.yaml"
    config.write_text(f"budget: {json.dumps(budget)}\n")
    result = run_cli("prune", path, "--config", config, "--out", tmp_path / "o")
    assert_refused(result, "--config: budget", repr(budget), out=tmp_path / "o")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["prune", "A", "--budget", "1", "--dtype", "int8"], "--dtype"),
        (["prune", "A", "--budget", "1", "--device", "gpu!"], "--device"),
        (["prune", "A", "--budget", "1", "--max-loss-increase", "5x"], "--max-loss-increase"),
        (["prune", "A", "--budget", "1", "--max-loss-increase", "-1%"], "--max-loss-increase"),
        (["prune", "A", "--budget", "1", "--curvature", "fast"], "--curvature"),
        (["prune", "A", "--budget", "1", "--min-rank", "-1"], "--min-rank"),
        (["prune", "A", "--budget", "1", "--max-rank", "-1"], "--max-rank"),
        (["eval", "A", "--calib", "c.py", "--dtype", "int8"], "--dtype"),
        (["eval", "A", "--calib", "c.py", "--device", "cuda:x"], "--device"),
        (["sweep", "A", "--calib", "c.py", "--budgets", "10:abc"], "--budgets"),
        (["sweep", "A", "--calib", "c.py", "--budgets", "10,x"], "--budgets"),
        (["sweep", "A", "--calib", "c.py", "--dtype", "int8"], "--dtype"),
        (["sweep", "A", "--calib", "c.py", "--methods", "foo"], "--methods"),
        (["sweep", "A", "--calib", "c.py", "--min-rank", "-2"], "--min-rank"),
    ],
)
def test_malformed_flag_values_are_usage_errors(tmp_path, run_cli, args, flag):
    path = write_adapter(tmp_path / "a")
    assert_usage_error(run_cli(*[str(path) if a == "A" else a for a in args]), flag)


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("dtype: int8", "--config: dtype 'int8'"),
        ("device: 'gpu!'", "--config: device"),
        ("max_loss_increase: 5x", "--config: max_loss_increase"),
        ("min_rank: -1", "--config: min_rank -1"),
    ],
)
def test_malformed_config_values_are_input_errors_naming_the_key(tmp_path, run_cli, setting, needle):
    path = write_adapter(tmp_path / "a")
    config = tmp_path / "sublora.yaml"
    config.write_text(f"budget: 1\n{setting}\n")
    assert_refused(run_cli("prune", path, "--config", config, "--out", tmp_path / "o"), needle, out=tmp_path / "o")


@pytest.mark.parametrize(
    "budget, reading, resolved",
    [("1", "rank", 1), ("1.0", "rank", 1), ("2e0", "rank", 2), ("0.5", "fraction", 1), ("50%", "percentage", 1)],
)
def test_budget_reading_is_reported(tmp_path, run_cli, budget, reading, resolved):
    path = write_adapter(tmp_path / "a")
    result = run_cli("prune", path, "--budget", budget, "--out", tmp_path / "o", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["budget"] == {**report["budget"], "requested": budget, "reading": reading, "resolved": resolved}
    summary = run_cli("prune", path, "--budget", budget, "--out", tmp_path / "o", "--overwrite")
    assert f"budget {budget}, read as a {reading}: {resolved} of 2 components" in " ".join(summary.stdout.split())


def test_a_rank_budget_with_a_decimal_point_is_not_a_fraction(tmp_path, run_cli):
    """`--budget 50.0` is the rank 50, so on a rank-2 adapter it keeps everything instead of failing "at most 1"."""
    path = write_adapter(tmp_path / "a")
    result = run_cli("prune", path, "--budget", "50.0", "--out", tmp_path / "o", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["budget"]["reading"] == "rank"


@pytest.mark.parametrize("peft_type", ["IA3", "VERA", "LOHA"])
def test_unsupported_adapter_types_are_named(tmp_path, run_cli, peft_type):
    path = write_adapter(tmp_path / "a", config={"peft_type": peft_type})
    assert_refused(run_cli("prune", path, "--budget", "1"), peft_type)


def test_dora_is_refused(tmp_path, run_cli):
    from conftest import tiny_bert
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], use_dora=True))
    model.save_pretrained(str(tmp_path / "dora"))
    assert_refused(
        run_cli("prune", tmp_path / "dora", "--budget", "1", "--out", tmp_path / "o"),
        "DoRA",
        out=tmp_path / "o",
    )
    # Even if the config flag were lost, the magnitude vectors in the file give it away.
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(run_cli("inspect", tmp_path / "dora"), "magnitude")


def test_pickle_adapter_is_refused_with_a_hint(tmp_path, run_cli):
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    torch.save({f"{PREFIX}lin.lora_A.weight": torch.ones(2, 4)}, path / "adapter_model.bin")
    assert_refused(run_cli("prune", path, "--budget", "1"), "pickle", "safetensors", "save_file")


def test_non_empty_out_needs_overwrite(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(run_cli("prune", path, "--budget", "1", "--out", out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli("prune", path, "--budget", "1", "--out", out, "--overwrite")
    assert result.code == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "sublora_report.json").exists()


def test_out_inside_the_input_is_refused(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    assert_refused(run_cli("prune", path, "--budget", "1", "--out", path / "sub"), "never modifies its input")


def test_min_ranks_above_the_budget_are_refused(tmp_path, run_cli):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("lin", "lin2"):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(2, 4, generator=g)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(3, 2, generator=g)
    path = write_adapter(tmp_path / "a", tensors=tensors)
    assert_refused(
        run_cli("prune", path, "--budget", "1", "--min-rank", "1", "--out", tmp_path / "o"),
        "budget",
        out=tmp_path / "o",
    )


def test_calibrated_method_without_calibration_script(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    assert_refused(run_cli("prune", path, "--budget", "1", "--method", "sublora"), "--calib")


def test_usage_errors_exit_2(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    assert run_cli("prune", path).code == 2  # --budget is required
    assert run_cli("prune", path, "--budget", "1", "--method", "nonsense").code == 2
    assert run_cli("frobnicate").code == 2


def test_module_entry_point_version_and_no_traceback(tmp_path):
    version = subprocess.run([sys.executable, "-m", "sublora_cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("sublora ")
    bad = subprocess.run(
        [sys.executable, "-m", "sublora_cli", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr


def without_config_keys(path, *keys):
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k not in keys}))
    return path


def test_config_without_lora_alpha_uses_peft_default_when_reading_and_writing(tmp_path, run_cli):
    """peft's LoraConfig defaults lora_alpha to 8: the input's scale is 8/2, kept at rank 1 by alpha 4."""
    path = without_config_keys(write_adapter(tmp_path / "a"), "lora_alpha")
    result = run_cli("prune", path, "--budget", "1", "--out", tmp_path / "o", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["modules"][0]["scale"] == 4.0
    written = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert (written["lora_alpha"], written["rank_pattern"], written["alpha_pattern"]) == (8, {"lin": 1}, {"lin": 4.0})


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"r": "fifty"}, "r = 'fifty'"),
        ({"r": 0}, "positive whole number"),
        ({"r": 2.5}, "positive whole number"),
        ({"r": True}, "positive whole number"),
        ({"lora_alpha": "big"}, "lora_alpha = 'big'"),
        ({"rank_pattern": {"lin": "two"}}, "rank_pattern['lin']"),
        ({"alpha_pattern": {"lin": None}}, "alpha_pattern['lin']"),
        ({"rank_pattern": ["lin"]}, "rank_pattern must be an object"),
    ],
)
def test_malformed_ranks_and_alphas_in_the_config(tmp_path, run_cli, config, needle):
    path = write_adapter(tmp_path / "a", config=config)
    assert_refused(run_cli("prune", path, "--budget", "1", "--out", tmp_path / "o"), needle, out=tmp_path / "o")


def test_config_without_target_modules_is_written_so_peft_loads_it(tmp_path, run_cli):
    peft = pytest.importorskip("peft")

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

    path = without_config_keys(write_adapter(tmp_path / "a"), "target_modules")
    result = run_cli("prune", path, "--budget", "1", "--out", tmp_path / "o")
    assert result.code == 0, result.stderr
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["target_modules"] == ["lin"]
    model = peft.PeftModel.from_pretrained(Base(), str(tmp_path / "o"))
    assert model.base_model.model.lin.lora_A["default"].weight.shape == (1, 4)
