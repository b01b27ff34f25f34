"""User-derived text (paths, module names, script errors and source lines, warnings, help defaults) prints literally:
no Rich markup is interpreted and no `:emoji:` code is substituted."""

from __future__ import annotations

import pytest
import torch
from test_cli_errors import PREFIX, write_adapter

import sublora_cli.cli.app as cli

MARKUP_NAME = "blk[red].x:fire:[/]lin"  # a module name that is Rich markup and an emoji code if not escaped


def flat(text: str) -> str:
    """Output with line wrapping undone (tables and long lines may wrap)."""
    return " ".join(text.split())


def odd_adapter(path):
    """A rank-2 adapter whose single module has a markup-like name."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{PREFIX}{MARKUP_NAME}.lora_A.weight": torch.randn(2, 4, generator=g),
        f"{PREFIX}{MARKUP_NAME}.lora_B.weight": torch.randn(3, 2, generator=g),
    }
    return write_adapter(path, tensors=tensors, config={"target_modules": [MARKUP_NAME]})


@pytest.mark.parametrize("name", ["run[/x]", "my:fire:adapter", "[bold]x[/bold]", "a[/mnt/ckpt]b"])
def test_missing_path_is_printed_literally(tmp_path, run_cli, name):
    result = run_cli("prune", tmp_path / name, "--budget", "5")
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr
    assert f"{tmp_path / name} does not exist" in flat(result.stderr)
    assert "🔥" not in result.stderr


def test_inspect_title_and_module_cells_are_literal(tmp_path, run_cli):
    path = odd_adapter(tmp_path / "my:fire:adapter[/x]")
    result = run_cli("inspect", path)
    assert result.code == 0, result.stderr
    assert str(path) in flat(result.stdout)
    assert MARKUP_NAME in result.stdout
    assert "🔥" not in result.stdout


def test_prune_summary_cells_and_paths_are_literal(tmp_path, run_cli):
    path = odd_adapter(tmp_path / "in:100:put")
    out = tmp_path / "out[/x]:fire:"
    result = run_cli("prune", path, "--budget", "1", "--out", out)
    assert result.code == 0, result.stderr
    assert MARKUP_NAME in result.stdout
    assert f"wrote {out}" in flat(result.stdout)
    assert "🔥" not in result.stdout and "💯" not in result.stdout


def test_warnings_are_literal(tmp_path, run_cli, monkeypatch):
    real_prune = cli.prune

    def prune_with_a_warning(*args, **kwargs):
        result = real_prune(*args, **kwargs)
        result.warnings.append("checkpoint [/mnt/ckpt] is :fire: [bold]stale[/bold]")
        return result

    monkeypatch.setattr(cli, "prune", prune_with_a_warning)
    result = run_cli("prune", write_adapter(tmp_path / "a"), "--budget", "1", "--out", tmp_path / "o")
    assert result.code == 0, result.stderr
    assert "warning: checkpoint [/mnt/ckpt] is :fire: [bold]stale[/bold]" in flat(result.stderr)


SCRIPT = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)

def load_model():
    return Net()

def batches():
    return [{"x": torch.ones(2, 4)}]

def loss(model, batch):
    key = "y"
    return model(batch[key]).sum()
"""
FAILING_LOAD = "def load_model():\n    raise RuntimeError('no checkpoint in [/mnt/ckpt] :fire:')\n"


def test_script_errors_and_source_lines_are_literal(tmp_path, run_cli):
    path = write_adapter(tmp_path / "a")
    failing_load = tmp_path / "load.py"
    failing_load.write_text(SCRIPT + FAILING_LOAD)
    result = run_cli("prune", path, "--budget", "1", "--calib", failing_load, "--out", tmp_path / "o")
    assert result.code == 1, result.stderr
    assert "MarkupError" not in result.stderr
    assert "no checkpoint in [/mnt/ckpt] :fire:" in result.stderr

    failing_loss = tmp_path / "loss.py"
    failing_loss.write_text(SCRIPT)
    result = run_cli("prune", path, "--budget", "1", "--calib", failing_loss, "--out", tmp_path / "o")
    assert result.code == 1, result.stderr
    assert "return model(batch[key]).sum()" in result.stderr


@pytest.mark.parametrize("command", ["sweep", "prune", "inspect", "eval"])
def test_help_shows_defaults_and_examples_literally(run_cli, command):
    result = run_cli(command, "--help")
    assert result.code == 0, result.stderr
    assert "💯" not in result.stdout and "🔥" not in result.stdout
    if command == "sweep":
        assert "10:100:10" in result.stdout
