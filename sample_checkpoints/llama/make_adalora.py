"""Regenerate the AdaLoRA sample: an AdaLoRA adapter (peft `AdaLoraConfig`, init_r 8 → target_r 4 on all seven
projections) on the Llama sample's base model, fine-tuned on the same shifted task as `adapter/` with peft's rank
allocator pruning it as it trains. Its calibration script is the Llama sample's calib.py.

    python sample_checkpoints/llama/make_adalora.py      # writes adalora/ and adalora_results.json here (~5 min)

Deterministic on one machine (fixed seeds, one thread).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from peft import AdaLoraConfig, get_peft_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import calib  # noqa: E402
from make_llama import BATCH, PROJECTIONS, calib_loss  # noqa: E402

STEPS, LR = 400, 3e-3
INIT_R, TARGET_R = 8, 4


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(2)
    config = AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, lora_alpha=16, target_modules=PROJECTIONS, total_step=STEPS,
        tinit=STEPS // 10, tfinal=STEPS // 4, deltaT=10, lora_dropout=0.0,
    )  # fmt: skip
    model = get_peft_model(calib.load_model(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    history, running, start = [], 0.0, time.perf_counter()
    for step in range(STEPS):
        loss = calib.loss(model, calib.sequences(BATCH, "shift", 30_000 + step))
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)  # AdaLoRA's budget schedule: masks the least important ranks
        opt.zero_grad()
        running += float(loss.detach())
        if (step + 1) % 100 == 0:
            history.append(running / 100)
            print(f"step {step + 1}/{STEPS}: loss {running / 100:.4f}", flush=True)
            running = 0.0
    model.eval()
    model.save_pretrained(str(HERE / "adalora"))
    (HERE / "adalora" / "README.md").unlink(missing_ok=True)  # peft's empty model card
    ranks = model.peft_config["default"].rank_pattern
    results = {
        "steps": STEPS,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_per_100": history,
        "kept_rank": sum(sum(mask) for mask in ranks.values()),
        "init_rank": INIT_R * len(ranks),
        "adapter": {"shift": calib.evaluate(model, "shift"), "calib_loss": calib_loss(model)},
        "torch": torch.__version__,
    }
    (HERE / "adalora_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "loss_per_100"}, indent=2))


if __name__ == "__main__":
    main()
