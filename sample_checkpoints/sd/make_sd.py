"""Regenerate the Stable-Diffusion-style sample: a LoRA (plus one LoCon 3×3 conv) on calib.py's small
UNet2DConditionModel, trained on its noise-prediction loss and saved as kohya-ss sd-scripts saves one (key
names `lora_unet_…`, `.lora_down.weight` / `.lora_up.weight` / `.alpha`, fp16, `ss_*` metadata).

    python sample_checkpoints/sd/make_sd.py            # writes lora.safetensors and results.json here (~4 min)

Deterministic on one machine (fixed seeds, one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import calib  # noqa: E402

RANK, ALPHA = 8, 4  # kohya's usual alpha = rank / 2
TARGETS = r".*(to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|down_blocks\.0\.resnets\.0\.conv1)$"
BATCH = 16
METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": str(RANK),
    "ss_network_alpha": str(ALPHA),
    "ss_network_args": json.dumps({"conv_dim": str(RANK), "conv_alpha": str(ALPHA)}),
    "ss_base_model_version": "sd_v1",
    "ss_training_comment": "sublora sample: noise prediction on calib.py's synthetic latents",
}


def train(model, steps: int, lr: float) -> list[float]:
    """Adam with cosine decay on fresh batches (seed 10 000 + step); the mean loss per 100 steps."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history, running = [], 0.0
    for step in range(steps):
        loss = calib.loss(model, calib.samples(BATCH, 10_000 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 100 == 0:
            history.append(running / 100)
            print(f"step {step + 1}/{steps}: loss {running / 100:.4f}", flush=True)
            running = 0.0
    return history


def kohya_state_dict(model) -> dict[str, torch.Tensor]:
    """peft's factors under kohya's names (the module path with `_` for `.`), fp16, with alpha per module."""
    tensors = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().half().contiguous()
            tensors[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().half().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(ALPHA), dtype=torch.float16)
    return tensors


@torch.no_grad()
def calib_loss(model) -> float:
    return sum(float(calib.loss(model, b)) for b in calib.batches()) / calib.CALIB_BATCHES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = calib.load_model()
    base = {"calib_loss": calib_loss(model), **calib.evaluate(model)}
    torch.manual_seed(1)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=True)
    model = inject_adapter_in_model(config, model)
    start = time.perf_counter()
    history = train(model, args.steps, 3e-3)
    seconds = time.perf_counter() - start
    tensors = kohya_state_dict(model)
    save_file(tensors, str(HERE / "lora.safetensors"), metadata=METADATA)
    results = {
        "modules": len(tensors) // 3,
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "loss_per_100": history,
        "base": base,
        "adapter (fp32, as trained)": {"calib_loss": calib_loss(model), **calib.evaluate(model)},
        "torch": torch.__version__,
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "loss_per_100"}, indent=2))


if __name__ == "__main__":
    main()
