"""Shared fixtures: tiny models built in code, adapters saved with the real peft, and an in-process CLI runner."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sublora_cli.cli.app import main


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `sublora ARGS…` in-process and return its exit code and output (exit codes as the shell sees them)."""

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["sublora", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure the command saves, with the path it was saved to: a test reads the picture's labels,
    lines and legend back from the figure object."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def savefig(self, path, *args, **kwargs):
        saved.append((self, path))
        return real_savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


class TinyConvNet(torch.nn.Module):
    """A model with an nn.Conv2d (3×3, stride 2, padding 1) and an nn.Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, vocab_size: int = 64, n_positions: int = 32):
    """A random-weight GPT-2 (Conv1D projections, tied embedding) built in code, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


class TinyTanhMLP(torch.nn.Module):
    """16 → 24 → 8 with a tanh: two nn.Linear layers to adapt."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 24)
        self.fc2 = torch.nn.Linear(24, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_tanh_mlp() -> TinyTanhMLP:
    torch.manual_seed(0)
    return TinyTanhMLP()


def tiny_convnet():
    torch.manual_seed(0)
    return TinyConvNet().eval()


BASE_MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "conv": tiny_convnet}


def lora_config(family: str):
    from peft import LoraConfig

    if family == "gpt2":  # Conv1D (fan_in_fan_out) + embedding, patterns, modules_to_save, biases
        return LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["c_attn", "c_fc", "wte"],
            fan_in_fan_out=True,
            rank_pattern={"h.1.attn.c_attn": 4},
            alpha_pattern={"c_fc": 4},
            modules_to_save=["ln_f"],
            bias="lora_only",
            init_lora_weights=False,
        )
    if family == "bert":  # nn.Linear with rsLoRA
        return LoraConfig(
            r=6, lora_alpha=12, target_modules=["query", "value"], use_rslora=True, init_lora_weights=False
        )
    return LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "head"], init_lora_weights=False)


def model_input(family: str):
    g = torch.Generator().manual_seed(1)
    if family == "conv":
        return {"x": torch.randn(2, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(0, 64, (2, 10), generator=g)}


def model_output(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        result = model(**model_input(family))
    return result if isinstance(result, torch.Tensor) else (result.logits if hasattr(result, "logits") else result[0])


def save_adapter(family: str, path: Path, shrink: dict[str, float] | None = None) -> Path:
    """Attach LoRA (random nonzero B) to a tiny base model with peft and save it; `shrink` scales some B's."""
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(BASE_MODELS[family](), lora_config(family))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(0.5)
                for key, factor in (shrink or {}).items():
                    if key in name:
                        param.mul_(factor)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(params=sorted(BASE_MODELS))
def family(request) -> str:
    return request.param


ELLIPTIC = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "elliptic"


def elliptic_script(path: Path, body: str = "") -> Path:
    """A calibration script at `path` that takes the elliptic k2 sample's functions, then runs `body` (which may
    redefine some of them): the hostile scripts of the tests."""
    path.write_text(
        f"import os, sys\nsys.path.insert(0, {str(ELLIPTIC)!r})\n"
        "from calib_k2 import load_model, batches, loss, evaluate\n" + body
    )
    return path
