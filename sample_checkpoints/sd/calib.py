r"""Calibration script for the Stable-Diffusion-style sample (sample_checkpoints/sd/lora.safetensors), and the
denoising task its LoRA was trained on (make_sd.py imports it from here).

    sublora prune sample_checkpoints/sd/lora.safetensors --calib sample_checkpoints/sd/calib.py \
        --budget 50% --out /tmp/sd_b50

The base model is a small diffusers `UNet2DConditionModel` (SD-1.5's layout: cross-attention down and up blocks,
a 3×3-conv ResNet in each block; 32 and 64 channels, 4-channel 8×8 latents, 32-wide text context) built from its
config with seeded random weights: no weights to download or ship. The task is SD's training objective, noise
prediction: a latent x₀ of class c (one of 8; a class fixes the frequencies of the 2-D waves that make up its
latents, the phases are random) is noised to x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (SD's scaled-linear schedule, 1000
steps), and the UNet, given x_t, t and the class's prompt embedding (a fixed random 4-token "text" per class),
predicts ε; the loss is the mean squared error. The LoRA (kohya key names, fp16, alpha = rank / 2) adapts every
attention projection, the feed-forward layers and proj_in/proj_out, plus one LoCon 3×3 conv (the first ResNet's
conv1), and was trained on this loss; `batches()` is a fixed sample of it, `evaluate()` a held-out one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

BASE_SEED, PROMPT_SEED = 0, 1
CALIB_SEED, EVAL_SEED = 1234, 4321
CLASSES, PROMPT_TOKENS, CONTEXT = 8, 4, 32
LATENT_CHANNELS, LATENT_SIZE = 4, 8
TIMESTEPS = 1000
CALIB_BATCHES, CALIB_BATCH_SIZE = 2, 8
EVAL_SAMPLES = 64


def unet_config() -> dict:
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": CONTEXT,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def load_model() -> UNet2DConditionModel:
    """The base UNet: its config, seeded random weights (the same on every call), eval mode."""
    torch.manual_seed(BASE_SEED)
    return UNet2DConditionModel(**unet_config()).eval()


def prompts() -> torch.Tensor:
    """(CLASSES, PROMPT_TOKENS, CONTEXT): each class's fixed "text encoder output"."""
    return torch.randn(CLASSES, PROMPT_TOKENS, CONTEXT, generator=torch.Generator().manual_seed(PROMPT_SEED))


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear β schedule (β from 0.00085 to 0.012): ᾱ_t for t = 0 … 999."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def latents(classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Clean latents: per channel a 2-D wave whose frequencies the class fixes, with a random phase."""
    grid = torch.arange(LATENT_SIZE) / LATENT_SIZE
    fx = (classes[:, None] + torch.arange(LATENT_CHANNELS)) % 3 + 1  # (n, channels)
    fy = (classes[:, None] // 3 + torch.arange(LATENT_CHANNELS)) % 3 + 1
    phase = 2 * math.pi * torch.rand(len(classes), LATENT_CHANNELS, 1, 1, generator=generator)
    x = 2 * math.pi * fx[:, :, None, None] * grid[None, None, None, :]
    y = 2 * math.pi * fy[:, :, None, None] * grid[None, None, :, None]
    return torch.sin(x + y + phase)


def samples(n: int, seed: int) -> dict[str, torch.Tensor]:
    """n denoising problems: noisy latents, timesteps, prompt embeddings and the noise to predict."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(CLASSES, (n,), generator=g)
    clean = latents(classes, g)
    noise = torch.randn(clean.shape, generator=g)
    t = torch.randint(TIMESTEPS, (n,), generator=g)
    a = alphas_cumprod()[t][:, None, None, None]
    noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
    return {"sample": noisy, "timestep": t, "context": prompts()[classes], "noise": noise}


def batches() -> list[dict[str, torch.Tensor]]:
    """CALIB_BATCHES batches of CALIB_BATCH_SIZE problems (fixed seed: the same on every call)."""
    data = samples(CALIB_BATCHES * CALIB_BATCH_SIZE, CALIB_SEED)
    starts = range(0, CALIB_BATCHES * CALIB_BATCH_SIZE, CALIB_BATCH_SIZE)
    return [{k: v[i : i + CALIB_BATCH_SIZE] for k, v in data.items()} for i in starts]


def per_sample_loss(model, batch) -> torch.Tensor:
    """The noise-prediction error of each problem (mean over its latent)."""
    predicted = model(batch["sample"], batch["timestep"], encoder_hidden_states=batch["context"]).sample
    return F.mse_loss(predicted.float(), batch["noise"].to(predicted.device), reduction="none").flatten(1).mean(1)


def loss(model, batch) -> torch.Tensor:
    return per_sample_loss(model, batch).mean()


@torch.no_grad()
def evaluate(model) -> dict[str, float]:
    """The noise-prediction MSE on EVAL_SAMPLES held-out problems."""
    return {"mse": float(loss(model, samples(EVAL_SAMPLES, EVAL_SEED)))}
