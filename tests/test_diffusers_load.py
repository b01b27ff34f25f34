"""A pruned kohya file and a pruned diffusers-keyed file load through diffusers' own LoRA loader
(`StableDiffusionPipeline.load_lora_weights`, on the SD sample's UNet with a tiny text encoder and VAE built from
configs), and what diffusers applies is sublora's ΔW: module by module once fused, and in the UNet's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_samples import SAMPLES, load_calib

from sublora_cli.formats import read_adapter
from sublora_cli.formats.kohya import resolve_model_module

diffusers = pytest.importorskip("diffusers")
SD = load_calib(SAMPLES / "sd" / "calib.py")
LORA = SAMPLES / "sd" / "lora.safetensors"


def pipeline():
    """A StableDiffusionPipeline around the sample's base UNet; the text encoder and VAE are tiny random ones (the
    LoRA adapts only the UNet) and there is no tokenizer (nothing is tokenized here)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=SD.load_model(), scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def sublora_deltas(path: Path, unet) -> dict[str, torch.Tensor]:
    """{UNet module path: ΔW in the weight's shape} of a file as sublora reads it."""
    names = [n for n, _ in unet.named_modules()]
    deltas = {}
    for m in read_adapter(path).modules:
        name = resolve_model_module(m.name.removeprefix("unet."), names)
        weight = unet.get_submodule(name).weight
        deltas[name] = (m.scale * m.B.double() @ m.A.double()).reshape(weight.shape)
    return deltas


def unet_output(unet) -> torch.Tensor:
    batch = SD.batches()[0]
    with torch.no_grad():
        return unet(batch["sample"], batch["timestep"], encoder_hidden_states=batch["context"]).sample


def prune(run_cli, path: Path, out: Path) -> tuple[Path, dict]:
    result = run_cli("prune", path, "--budget", "40%", "--out", out, "--json")
    assert result.code == 0, result.stderr
    return out / path.name, json.loads(result.stdout)


def diffusers_keyed(path: Path) -> Path:
    """The kohya sample rewritten with diffusers' own keys (`unet.<module path>.lora_A/B.weight`, no alpha: the
    scale alpha / rank folded into B), as `pipe.save_lora_weights` writes them."""
    tensors = load_file(str(LORA))
    unet_names = [n for n, _ in SD.load_model().named_modules()]
    out = {}
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        down, up, alpha = tensors[key], tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.alpha"]
        name = resolve_model_module(stem, unet_names)
        out[f"unet.{name}.lora_A.weight"] = down
        out[f"unet.{name}.lora_B.weight"] = (up.float() * float(alpha) / down.shape[0]).half()
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_a_pruned_file_loads_in_diffusers_with_sublora_s_update(style, tmp_path, run_cli):
    source = LORA if style == "kohya" else diffusers_keyed(tmp_path / "pytorch_lora_weights.safetensors")
    written, report = prune(run_cli, source, tmp_path / "out")
    ranks = {m["rank_after"] for m in report["modules"]}
    assert len(ranks) > 1 and report["totals"]["rank_after"] < report["totals"]["rank_before"]  # "Dynamic" ranks

    pipe = pipeline()
    base = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    expected = sublora_deltas(written, pipe.unet)
    reference = SD.load_model()  # the base UNet with sublora's ΔW added to its weights
    with torch.no_grad():
        for name, delta in expected.items():
            reference.get_submodule(name).weight.add_(delta.float())

    pipe.load_lora_weights(str(written))
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(reference), rtol=1e-4, atol=1e-5)

    pipe.fuse_lora()
    applied = {
        name.removesuffix(".base_layer.weight").removesuffix(".weight"): p.detach().double() - base[key].double()
        for name, p in pipe.unet.named_parameters()
        if (key := name.replace(".base_layer", "")) in base and not torch.equal(p, base[key])
    }
    assert applied.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(applied[name], delta, rtol=1e-5, atol=1e-6)
