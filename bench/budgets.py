"""Budgets with costs (issue 15): knapsack selection against a rank count at the same bytes, and `--budget auto`.

    python bench/budgets.py llama      # Llama-shaped adapter built in code: bytes budgets 25/50/75 %
    python bench/budgets.py pinn       # --max-loss-increase 1% on the 9 PINN adapters
    python bench/budgets.py llama --layers 4 --hidden 256 --out /tmp/b   # a smaller model

`llama`: a random-weight Llama (all 7 projections adapted, r = 16) whose adapter has decaying spectra of
per-module scales; the calibration loss is the cross-entropy against next tokens sampled from the full adapted
model (distillation with hard targets, so the empirical Fisher is informative). One Fisher curvature; then, for
each bytes budget, sublora with the bytes budget (knapsack) vs sublora with the largest rank count whose kept set fits
in the same bytes, and magnitude by σ per cost vs by σ, each measured as written.
`pinn`: `prune` with --max-loss-increase 1% and no --budget on each adapter: the chosen size, the measured
increase and the number of loss evaluations. Results are JSON under --out (default bench_out/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from paper_table import FAMILIES  # noqa: E402  (bench/ is on sys.path when run as a script)

from sublora_cli.commands.options import CalibrationOptions
from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.core import methods
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import select
from sublora_cli.pipeline.budgeting import adapter_pricing
from sublora_cli.pipeline.calibrate import calibration
from sublora_cli.pipeline.curvature_choice import timed_curvature
from sublora_cli.pipeline.spectra import svd_form
from sublora_cli.pipeline.timings import Timings
from sublora_cli.pipeline.written import selected_loss

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
SHARES = (0.25, 0.5, 0.75)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CALIB = '''
import torch
from pathlib import Path
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
CONFIG = {config}

def load_model():
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.load_state_dict(load_file(str(HERE / "base.safetensors")), strict=False)
    return model

def batches():
    data = load_file(str(HERE / "data.safetensors"))
    return [(data[f"tokens{{i}}"], data[f"targets{{i}}"]) for i in range({n_batches})]

def per_sample_loss(model, batch):
    tokens, targets = batch
    logits = model(input_ids=tokens).logits.float()
    cross = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return cross.mean(-1)

def loss(model, batch):
    return per_sample_loss(model, batch).mean()
'''


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)



def build_llama(
    root: Path, layers: int, hidden: int, rank: int, n_batches: int, seq: int, per_batch: int, scale: float
) -> Path:
    """Base model, adapter (decaying spectra, per-module scales) and distillation data, all in `root`."""
    import peft
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {
        "hidden_size": hidden, "intermediate_size": int(hidden * 2.6875), "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": 256, "max_position_embeddings": 64,
    }  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config)).eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, init_lora_weights=False)
    )
    g = torch.Generator().manual_seed(1)
    decay = torch.exp(-torch.arange(rank, dtype=torch.float32) / 4)
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            importance = float(torch.exp(torch.randn(1, generator=g) * 0.7))  # modules matter unequally
            with torch.no_grad():
                A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g) * decay * importance * scale)
    model.save_pretrained(str(root / "adapter"))
    data = {}
    with torch.no_grad():
        for i in range(n_batches):
            tokens = torch.randint(0, config["vocab_size"], (per_batch, seq), generator=g)
            probs = model(input_ids=tokens).logits.float().softmax(-1)
            data[f"tokens{i}"] = tokens
            targets = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g)
            data[f"targets{i}"] = targets.view(tokens.shape)
    save_file(data, str(root / "data.safetensors"))
    (root / "calib.py").write_text(textwrap.dedent(CALIB.format(config=config, n_batches=n_batches)))
    return root


def with_magnitude_by_sigma() -> None:
    """Register `magnitude-sigma`: magnitude ranked by σ alone under a cost budget (the alternative measured)."""
    entry = dataclasses.replace(methods.REGISTRY["magnitude"], name="magnitude-sigma", per_cost=False)
    methods.REGISTRY[entry.name] = entry


def largest_fitting_rank(sigma, bounds, curvature, method, costs: torch.Tensor, capacity: float) -> int:
    """The largest rank count whose selection's bytes fit in `capacity` (bisection: bytes grow with the count)."""
    low, high = 1, sigma.numel()
    inputs = curvature.selection_inputs(method) if curvature is not None else {}

    def fits(count: int) -> bool:
        kept = select(method, sigma, budget_of(torch.ones_like(costs), count), bounds, **inputs).kept
        return float(costs[kept].sum()) <= capacity

    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def budget_of(costs: torch.Tensor, capacity: float, unit: str = "rank"):
    from sublora_cli.core.budget import Budget

    return Budget(costs, float(capacity), unit)


def cell(selection, costs: torch.Tensor, measure) -> dict:
    kept = selection.kept
    return {"bytes": float(costs[kept].sum()), "rank": int(kept.sum()), "predicted": selection.predicted_increase,
            "loss": measure(kept)}  # fmt: skip


def run_llama(args) -> dict:
    from sublora_cli.formats import read_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = build_llama(
            Path(tmp), args.layers, args.hidden, args.rank, args.batches, args.seq, args.per_batch, args.scale
        )
        with_magnitude_by_sigma()
        timings = Timings()
        adapter = read_adapter(root / "adapter")
        spectra = svd_form(adapter, timings)
        sigma = torch.cat([s.sigma for s in spectra])
        costs = adapter_pricing(adapter).costs("bytes")
        bounds = RankBounds.from_ranks([m.rank for m in adapter.modules])
        whole = float(costs.sum())
        log(f"adapter: {len(adapter.modules)} modules, R = {sigma.numel()}, {whole:,.0f} bytes")
        rows = []
        settings = CalibrationOptions(calib=root / "calib.py", max_batches=100, holdout=0.0)  # parsed, as the CLI does
        with calibration(settings, adapter, spectra, timings, None) as calibrated:
            before = calibrated.loss()
            curvature, reason = timed_curvature(
                calibrated, args.curvature, ["sublora"], 8.0, timings, log, None
            )
            measure = selected_loss(calibrated, adapter, spectra)
            for share in SHARES:
                capacity = share * whole
                row = {"share": share, "capacity_bytes": capacity}
                for method in ("sublora", "magnitude", "magnitude-sigma"):
                    inputs = curvature.selection_inputs(method) if method == "sublora" else {}
                    chosen = select(method, sigma, budget_of(costs, capacity, "bytes"), bounds, **inputs)
                    row[method] = cell(chosen, costs, measure)
                count = largest_fitting_rank(sigma, bounds, curvature, "sublora", costs, capacity)
                chosen = select("sublora", sigma, budget_of(torch.ones_like(costs), count), bounds,
                                **curvature.selection_inputs("sublora"))  # fmt: skip
                row["sublora-rank-count"] = cell(chosen, costs, measure)
                log(json.dumps(row))
                rows.append(row)
        return {
            "model": {"layers": args.layers, "hidden": args.hidden, "rank": args.rank, "batches": args.batches,
                      "seq": args.seq, "per_batch": args.per_batch},  # fmt: skip
            "R": sigma.numel(),
            "whole_bytes": whole,
            "curvature": curvature.kind,
            "curvature_reason": reason,
            "loss_before": before,
            "rows": rows,
            "timings": dict(timings),
        }


def run_pinn(args) -> dict:
    results = []
    for family, names in FAMILIES.items():
        for name in names:
            adapter = SAMPLES / family / f"adapter_{name}"
            options = PruneOptions(calib=SAMPLES / family / f"calib_{name}.py", max_loss_increase=args.tolerance)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                report = prune(adapter, options, out_dir=Path(tmp) / "out").report
            search = report["budget"]["search"]
            row = {
                "adapter": f"{family}/{name}",
                "rank_before": report["totals"]["rank_before"],
                "rank_after": report["totals"]["rank_after"],
                "bytes_before": report["totals"]["bytes_before"],
                "bytes_after": report["totals"]["bytes_after"],
                "relative_increase": report["loss"]["relative_increase"],
                "evaluations": len(search["evaluations"]),
                "probes": [(e["rank"], round(e["measured"], 5)) for e in search["evaluations"]],
                "seconds": time.perf_counter() - start,
            }
            log(json.dumps(row))
            results.append(row)
    return {"tolerance": args.tolerance, "adapters": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("llama", "pinn"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--per-batch", type=int, default=8)
    parser.add_argument("--curvature", default="fisher")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the adapter's update")
    parser.add_argument("--tolerance", default="1%")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = run_llama(args) if args.part == "llama" else run_pinn(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"budgets_{args.part}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
