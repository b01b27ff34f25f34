r"""Calibration script for the Llama sample's adapter (sample_checkpoints/llama/adapter), and the synthetic
language both the base model and the adapter were trained on (make_llama.py imports it from here).

    sublora prune sample_checkpoints/llama/adapter --calib sample_checkpoints/llama/calib.py \
        --budget 50% --out /tmp/llama_b50

The language: BOS x₁…xₙ SEP y₁…yₙ EOS, right-padded with PAD. The source x is a walk of n = 3…8 steps
through a fixed random Markov chain over 60 symbols (each symbol has 4 possible successors), so it is
partly predictable. The base task copies it (y = x); the shifted task the adapter learned answers with
every symbol's successor in the symbol alphabet (yᵢ = xᵢ + 1, wrapping around). The answer is
deterministic given the source, so a model that knows the rule predicts it exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_SYMBOL, N_SYMBOLS = 4, 60
VOCAB = FIRST_SYMBOL + N_SYMBOLS
MIN_LEN, MAX_LEN = 3, 8
SUCCESSORS = 4  # Markov successors per symbol: log(4) nats per source token after the first
GRAMMAR_SEED = 7
CALIB_SEED, EVAL_SEED, HELDOUT_SEED = 1234, 4321, 5678
CALIB_BATCHES, CALIB_BATCH_SIZE = 2, 8
HELDOUT_BATCHES = 2  # of CALIB_BATCH_SIZE sequences: the tool measures them, never fits them
EVAL_SEQUENCES = 256


def successor_table() -> torch.Tensor:
    """(N_SYMBOLS, SUCCESSORS) symbol indices: the Markov chain the sources walk through (fixed seed)."""
    g = torch.Generator().manual_seed(GRAMMAR_SEED)
    return torch.stack([torch.randperm(N_SYMBOLS, generator=g)[:SUCCESSORS] for _ in range(N_SYMBOLS)])


def answer(source: list[int], task: str) -> list[int]:
    """The answer tokens for a source (symbol indices): copied ("copy") or shifted by one ("shift")."""
    if task == "copy":
        return list(source)
    if task == "shift":
        return [(s + 1) % N_SYMBOLS for s in source]
    raise ValueError(f"unknown task {task!r}")


def sequences(n: int, task: str, seed: int) -> dict[str, torch.Tensor]:
    """n sequences of `task`: input_ids (n, T) right-padded, and answer_mask marking the answer and EOS."""
    g = torch.Generator().manual_seed(seed)
    table = successor_table()
    rows = []
    for _ in range(n):
        length = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=g))
        source = [int(torch.randint(N_SYMBOLS, (1,), generator=g))]
        while len(source) < length:
            source.append(int(table[source[-1], torch.randint(SUCCESSORS, (1,), generator=g)]))
        tokens = [s + FIRST_SYMBOL for s in source]
        rows.append(([BOS, *tokens, SEP], [t + FIRST_SYMBOL for t in answer(source, task)] + [EOS]))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((n, width), PAD, dtype=torch.long)
    answer_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (prompt, ans) in enumerate(rows):
        input_ids[i, : len(prompt) + len(ans)] = torch.tensor(prompt + ans)
        answer_mask[i, len(prompt) : len(prompt) + len(ans)] = True
    return {"input_ids": input_ids, "answer_mask": answer_mask}


def model_config() -> LlamaConfig:
    return LlamaConfig.from_json_file(HERE / "config.json")


def load_model() -> LlamaForCausalLM:
    """The base model from config.json + base.safetensors (offline; transformers' default attention)."""
    model = LlamaForCausalLM(model_config())
    model.load_state_dict(load_file(HERE / "base.safetensors"))
    return model


def batches() -> list[dict[str, torch.Tensor]]:
    """CALIB_BATCHES batches of CALIB_BATCH_SIZE shifted-task sequences (fixed seed: the same on every call)."""
    return batched(CALIB_BATCHES, CALIB_SEED)


def heldout_batches() -> list[dict[str, torch.Tensor]]:
    """HELDOUT_BATCHES more batches of the same task from another seed: the tool checks its decisions on them."""
    return batched(HELDOUT_BATCHES, HELDOUT_SEED)


def batched(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    data = sequences(count * CALIB_BATCH_SIZE, "shift", seed)
    return [
        {k: v[i : i + CALIB_BATCH_SIZE] for k, v in data.items()}
        for i in range(0, count * CALIB_BATCH_SIZE, CALIB_BATCH_SIZE)
    ]


def next_token(model, input_ids: torch.Tensor):
    """Logits (float32 whatever the model's dtype), targets, cross-entropy and the non-padding mask, all
    (N, T-1): position t predicts token t+1."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    mask = targets != PAD
    return logits, targets, ce * mask, mask


def per_sample_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its non-padding targets."""
    _, _, ce, mask = next_token(model, batch["input_ids"])
    return ce.sum(1) / mask.sum(1)


def loss(model, batch) -> torch.Tensor:
    return per_sample_loss(model, batch).mean()


@torch.no_grad()
def evaluate(model, task: str = "shift", seed: int = EVAL_SEED) -> dict[str, float]:
    """Perplexity over all non-padding tokens and exact-match accuracy of the answers (argmax of every answer
    token and the EOS, teacher-forced) on EVAL_SEQUENCES held-out sequences."""
    batch = sequences(EVAL_SEQUENCES, task, seed)
    logits, targets, ce, mask = next_token(model, batch["input_ids"])
    answer = batch["answer_mask"][:, 1:].to(logits.device)
    correct = (logits.argmax(-1) == targets) | ~answer
    return {
        "perplexity": math.exp(float((ce * mask).sum() / mask.sum())),
        "accuracy": float(correct.all(1).float().mean()),
    }
