"""Regenerate the Llama sample: a small Llama-architecture causal LM pre-trained on the synthetic language of
calib.py (copy task), then a LoRA adapter (peft, r = 16 on all seven projections) fine-tuned on the shifted task.

    python sample_checkpoints/llama/make_llama.py               # writes config.json, base.safetensors, adapter/,
                                                               # results.json next to this file (~10 min on one
                                                               # thread of a busy 2-core machine)
    python sample_checkpoints/llama/make_llama.py --out /tmp/llama

Deterministic on one machine (fixed seeds, one thread by default); `--out` elsewhere copies calib.py along.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import calib  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 32


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=calib.VOCAB,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=calib.BOS,
        eos_token_id=calib.EOS,
        pad_token_id=calib.PAD,
        tie_word_embeddings=False,
    )


def train(model, task: str, steps: int, lr: float, seed: int, label: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay on fresh `task` batches (seed + step); the losses per 100 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    model.train()
    history, running = [], 0.0
    for step in range(steps):
        batch = calib.sequences(BATCH, task, seed + step)
        loss = calib.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 100 == 0:
            history.append(running / 100)
            print(f"{label} step {step + 1}/{steps}: loss {running / 100:.4f}", flush=True)
            running = 0.0
    model.eval()
    return history


@torch.no_grad()
def calib_loss(model) -> float:
    return sum(float(calib.loss(model, b)) for b in calib.batches()) / calib.CALIB_BATCHES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if out != HERE:
        shutil.copy(HERE / "calib.py", out / "calib.py")

    torch.manual_seed(0)
    config = llama_config()
    model = LlamaForCausalLM(config)
    n_parameters = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    pretrain = train(model, "copy", args.pretrain_steps, 3e-3, seed=10_000, label="pre-train")
    pretrain_s = time.perf_counter() - t0
    config.to_json_file(out / "config.json", use_diff=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "base.safetensors")
    base_copy, base_shift = calib.evaluate(model, "copy"), calib.evaluate(model, "shift")
    base_calib_loss = calib_loss(model)

    torch.manual_seed(1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, init_lora_weights=True)
    peft_model = get_peft_model(model, lora)
    t0 = time.perf_counter()
    finetune = train(peft_model, "shift", args.finetune_steps, 3e-3, seed=20_000, label="fine-tune")
    finetune_s = time.perf_counter() - t0
    peft_model.save_pretrained(str(out / "adapter"))
    (out / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model card

    results = {
        "parameters": n_parameters,
        "lora_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "pretrain": {"steps": args.pretrain_steps, "seconds": round(pretrain_s, 1), "loss_per_100": pretrain},
        "finetune": {"steps": args.finetune_steps, "seconds": round(finetune_s, 1), "loss_per_100": finetune},
        "base": {"copy": base_copy, "shift": base_shift, "calib_loss": base_calib_loss},
        "adapter": {"shift": calib.evaluate(peft_model, "shift"), "calib_loss": calib_loss(peft_model)},
        "threads": args.threads,
        "torch": torch.__version__,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("pretrain", "finetune")}, indent=2))


if __name__ == "__main__":
    main()
