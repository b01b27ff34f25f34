"""Curvature benchmarks (docs/curvature.md): every ratio is measured side by side in one run.

    python bench/curvature.py                      # all sections
    python bench/curvature.py --sections exact,greedy --quick
    python bench/curvature.py --json /tmp/curvature.json

Sections:
  exact      exact H over σ on a PINN sample vs torch.autograd.functional.hessian (time ratio, agreement)
  fisher     --curvature fisher vs one forward+backward pass over the same data, GPT-2-small shape
             (12 layers, width 768, random weights, LoRA r=16 on c_attn/attn.c_proj/c_fc/mlp.c_proj: R=768,
             64 sequences of 128 tokens in 8 batches); --quick shrinks it to 4 layers and 16 sequences
  greedy     select() timings at R=20,000, b=10,000 (random symmetric H)
  memory     peak resident memory of the Fisher at R=8,192 (F alone: 512 MiB) and of the exact H on the sample
  agreement  fisher vs exact: kept-set overlap and measured loss after pruning, on PINN samples and a small LM

Peak memory is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS
before the stage (Linux only). Nothing is downloaded: all models are built in code or read from
sample_checkpoints/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_checkpoints"))

from sublora_cli.core.budget import Budget  # noqa: E402
from sublora_cli.core.rank_bounds import RankBounds  # noqa: E402
from sublora_cli.core.select import select  # noqa: E402
from sublora_cli.core.svd import factor_svd  # noqa: E402
from sublora_cli.formats import read_adapter  # noqa: E402
from sublora_cli.formats.base import LoraModule  # noqa: E402
from sublora_cli.model.calibrated import open_calibration  # noqa: E402
from sublora_cli.model.curvature import compute_curvature, symmetrize_  # noqa: E402
from sublora_cli.model.reparam import SigmaModel  # noqa: E402
from sublora_cli.pipeline.spectra import adapter_spectra  # noqa: E402

SAMPLES = ROOT / "sample_checkpoints"


# ----------------------------------------------------------------------------- helpers


def _status(key: str) -> int:
    """A VmRSS/VmHWM figure of this process in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Rise of the peak RSS over the RSS at entry, in bytes."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = max(0, _status("VmHWM") - self.before)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def pinn_sample(family: str, name: str, dtype: str = "float64", device: str = "cpu"):
    directory = SAMPLES / family
    adapter = read_adapter(directory / f"adapter_{name}")
    spectra = adapter_spectra(adapter)
    calibrated = open_calibration(directory / f"calib_{name}.py", adapter, spectra, device, dtype)
    return adapter, calibrated


# ----------------------------------------------------------------------------- exact


def bench_exact(args) -> dict:
    _, cal = pinn_sample("elliptic", "k2", "float64", args.device)
    sm, batches = cal.sigma_model, cal.batches

    def mean_loss(s):
        return sum(sm.loss(s, b) for b in batches) / len(batches)

    def reference():
        with torch.enable_grad():
            return torch.autograd.functional.hessian(mean_loss, sm.sigma.detach().clone())

    rows = {"functional.hessian": [], "sublora exact": [], "sublora exact, 1 thread": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so machine load hits all alike
        t, H_ref = timed(reference)
        rows["functional.hessian"].append(t)
        t, curv = timed(compute_curvature, sm, batches, "exact")
        rows["sublora exact"].append(t)
        results["strategy"] = curv.strategy
        t, curv1 = timed(compute_curvature, sm, batches, "exact", threads=1)
        rows["sublora exact, 1 thread"].append(t)
    H_ref = H_ref.double().cpu()
    H_ref = (H_ref + H_ref.T) / 2
    rel = float((curv.hessian - H_ref).norm() / H_ref.norm())
    best = {k: min(v) for k, v in rows.items()}
    results.update(
        {
            "workload": "elliptic/adapter_k2, R = 100, 4 batches of 320 points, float64",
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "seconds": rows,
            "best_seconds": best,
            "speedup": best["functional.hessian"] / best["sublora exact"],
            "speedup_1_thread": best["functional.hessian"] / best["sublora exact, 1 thread"],
            "relative_difference": rel,
            "relative_difference_1_thread": float((curv1.hessian - H_ref).norm() / H_ref.norm()),
        }
    )
    print(
        f"exact H (elliptic k2, R=100, float64): functional.hessian {best['functional.hessian']:.2f} s, "
        f"sublora {best['sublora exact']:.2f} s ({results['strategy']}) -> {results['speedup']:.2f}x; "
        f"1 thread {best['sublora exact, 1 thread']:.2f} s -> {results['speedup_1_thread']:.2f}x; "
        f"relative Frobenius difference {rel:.1e}",
        flush=True,
    )
    cal.close()
    return results


# ----------------------------------------------------------------------------- GPT-2 shape


GPT2_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_lora(model, rank: int, seed: int = 0, targets=GPT2_TARGETS) -> list[LoraModule]:
    """LoRA factors (B nonzero, as after training) on every targeted Conv1D of a GPT-2 model."""
    g = torch.Generator().manual_seed(seed)
    modules = []
    for name, layer in model.named_modules():
        if any(name.endswith(t) for t in targets):
            inp, out = layer.weight.shape  # Conv1D stores (in, out)
            A = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
            B = torch.randn(out, rank, generator=g) * 0.02
            modules.append(LoraModule(name, "linear", A, B, 2.0 * rank, 2.0, (rank, inp), (out, rank)))
    return modules


def lm_per_sample_loss(model, batch):
    """Per-sequence mean next-token cross-entropy."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
    return ce.reshape(ids.shape[0], -1).mean(1)


def lm_loss(model, batch):
    return lm_per_sample_loss(model, batch).mean()


def gpt2_sigma_model(n_layer, n_embd, n_head, vocab, positions, rank, dtype=torch.float32, device="cpu"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=positions, attn_pdrop=0.0
    )
    config.resid_pdrop = config.embd_pdrop = 0.0
    model = GPT2LMHeadModel(config).eval()
    modules = gpt2_lora(model, rank)
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]
    return SigmaModel(
        model, modules, spectra, lm_loss, device=device, dtype=dtype, per_sample_loss_fn=lm_per_sample_loss
    )


def bench_fisher(args) -> dict:
    if args.quick:
        shape = {"n_layer": 4, "n_embd": 768, "n_head": 12, "vocab": 50257, "positions": 128, "rank": 16}
        n_seq, per_batch = 16, 8
    else:
        shape = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "positions": 128, "rank": 16}
        n_seq, per_batch = 64, 8
    sm = gpt2_sigma_model(**shape, device=args.device)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, shape["vocab"], (per_batch, 128), generator=g)}
        for _ in range(n_seq // per_batch)
    ]

    def forward_backward():
        """The baseline: mean loss over the batches and its σ-gradient, one forward+backward per batch."""
        grad = torch.zeros(sm.size, dtype=torch.float64)
        with torch.enable_grad():
            for batch in batches:
                s = sm.sigma.detach().clone().requires_grad_(True)
                grad += torch.autograd.grad(sm.loss(s, batch), s)[0].double().cpu()
        return grad / len(batches)

    times = {"forward+backward": [], "fisher": []}
    peaks = {}
    for _ in range(args.repeats):
        with PeakMemory() as mem:
            t, grad = timed(forward_backward)
        times["forward+backward"].append(t)
        peaks["forward+backward"] = mem.peak
        with PeakMemory() as mem:
            t, curv = timed(compute_curvature, sm, batches, "fisher")
        times["fisher"].append(t)
        peaks["fisher"] = mem.peak
    best = {k: min(v) for k, v in times.items()}
    rel_grad = float((curv.gradient - grad).norm() / grad.norm())
    result = {
        "workload": f"GPT-2 shape {shape}, R = {sm.size}, {n_seq} sequences x 128 tokens in {len(batches)} batches",
        "device": args.device,
        "seconds": times,
        "best_seconds": best,
        "ratio": best["fisher"] / best["forward+backward"],
        "peak_rss_bytes": peaks,
        "gradient_relative_difference": rel_grad,
    }
    print(
        f"fisher (GPT-2 shape, {shape['n_layer']} layers, R={sm.size}, {n_seq}x128 tokens): forward+backward "
        f"{best['forward+backward']:.1f} s, fisher {best['fisher']:.1f} s -> {result['ratio']:.2f}x; peak RSS rise "
        f"{mib(peaks['forward+backward'])} / {mib(peaks['fisher'])}; mean per-sample gradient vs batch gradient "
        f"{rel_grad:.1e}",
        flush=True,
    )
    sm.remove()
    return result


# ----------------------------------------------------------------------------- greedy


def bench_greedy(args) -> dict:
    R, b = (20_000, 10_000) if not args.quick else (5_000, 2_500)
    torch.manual_seed(0)
    H = torch.randn(R, R, dtype=torch.float64)
    symmetrize_(H)
    H.diagonal().abs_().add_(math.sqrt(R))
    sigma = torch.rand(R, dtype=torch.float64) + 0.1
    grad = torch.randn(R, dtype=torch.float64) * 1e-3
    bounds = RankBounds.from_ranks([R // 200] * 200)
    result = {"R": R, "budget": b, "seconds": {}}
    for method in ("sublora", "hessian", "diag", "linear", "sublora-random"):
        t, _ = timed(select, method, sigma, Budget.ranks(b, sigma.numel()), bounds, gradient=grad, hessian=H)
        result["seconds"][method] = t
    print(
        f"greedy R={R}, b={b}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["seconds"].items()),
        flush=True,
    )
    return result


# ----------------------------------------------------------------------------- memory


def bench_memory(args) -> dict:
    """Peak RSS of the Fisher where F dominates: R = 8,192 on a small wide MLP (per-sample work is tiny)."""
    width, layers, rank = 1024, 8, 1024
    if args.quick:
        layers = 2
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])
    g = torch.Generator().manual_seed(0)
    modules = []
    for i in range(layers):
        A = torch.randn(rank, width, generator=g) / math.sqrt(width)
        B = torch.randn(width, rank, generator=g) * 0.01
        modules.append(LoraModule(str(2 * i), "linear", A, B, float(rank), 1.0, (rank, width), (width, rank)))
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]

    def per_sample(m, b):
        return m(b).pow(2).mean(1)

    sm = SigmaModel(model, modules, spectra, lambda m, b: per_sample(m, b).mean(), per_sample_loss_fn=per_sample)
    batches = [torch.randn(16, width, generator=g) for _ in range(4)]
    R = sm.size
    with PeakMemory() as mem:
        t, curv = timed(compute_curvature, sm, batches, "fisher", max_hessian_gb=8)
    result = {
        "fisher": {"R": R, "matrix_bytes": 8 * R * R, "peak_rss_rise_bytes": mem.peak, "seconds": t},
    }
    print(f"memory: fisher R={R}: F alone {mib(8 * R * R)}, peak RSS rise {mib(mem.peak)} ({t:.1f} s)", flush=True)
    del curv
    _, cal = pinn_sample("elliptic", "k2", "float64")
    with PeakMemory() as mem:
        compute_curvature(cal.sigma_model, cal.batches, "exact")
    result["exact_pinn"] = {"R": cal.sigma_model.size, "peak_rss_rise_bytes": mem.peak}
    print(f"memory: exact H on elliptic k2 (R=100): peak RSS rise {mib(mem.peak)} (graph of one batch)", flush=True)
    cal.close()
    return result


# ----------------------------------------------------------------------------- agreement


def compare(sm, batches, kept_loss, R_bounds, budgets, method="sublora") -> list[dict]:
    """Kept sets of `method` under exact and fisher curvature (as the tool selects: Curvature.selection_inputs,
    i.e. the Fisher without the gradient term), their overlap and measured losses; plus the Fisher with the
    true gradient kept, the variant the tool does not use (F's scale tracks the residuals, g's does not)."""
    t_exact, exact = timed(compute_curvature, sm, batches, "exact")
    t_fisher, fisher = timed(compute_curvature, sm, batches, "fisher")
    sigma = sm.sigma.detach().double().cpu()
    rows = []
    for budget in budgets:
        row = {"budget": budget, "exact_seconds": t_exact, "fisher_seconds": t_fisher}
        kept = {}
        for name, curv in (("exact", exact), ("fisher", fisher)):
            sel = select(method, sigma, Budget.ranks(budget, sigma.numel()), R_bounds, **curv.selection_inputs(method))
            kept[name] = sel.kept
            row[f"loss_after_{name}"] = kept_loss(sel.kept)
        allowance = Budget.ranks(budget, sigma.numel())
        sel = select(method, sigma, allowance, R_bounds, gradient=fisher.gradient, hessian=fisher.hessian)
        row["loss_after_fisher_with_gradient"] = kept_loss(sel.kept)
        row["overlap_with_gradient"] = int((kept["exact"] & sel.kept).sum()) / budget
        kept["magnitude"] = select("magnitude", sigma, Budget.ranks(budget, sigma.numel()), R_bounds).kept
        row["loss_after_magnitude"] = kept_loss(kept["magnitude"])
        row["overlap"] = int((kept["exact"] & kept["fisher"]).sum()) / budget
        row["loss_before"] = exact.loss
        rows.append(row)
    return rows


def print_agreement(label: str, row: dict) -> None:
    print(
        f"agreement {label} b={row['budget']}: overlap {row['overlap']:.2f}, loss after exact "
        f"{row['loss_after_exact']:.3g} / fisher {row['loss_after_fisher']:.3g} / magnitude "
        f"{row['loss_after_magnitude']:.3g}, fisher with g {row['loss_after_fisher_with_gradient']:.3g} "
        f"(overlap {row['overlap_with_gradient']:.2f}) (before {row['loss_before']:.3g})",
        flush=True,
    )


def bench_agreement(args) -> dict:
    samples = [("elliptic", "k2"), ("allen_cahn", "eps0p1"), ("hyperbolic", "beta3")]
    if args.all_samples:
        samples = [
            (family, d.name.removeprefix("adapter_"))
            for family in ("elliptic", "allen_cahn", "hyperbolic")
            for d in sorted((SAMPLES / family).glob("adapter_*"))
        ]
    result = {"pinn": {}, "lm": None}
    for family, name in samples:
        adapter, cal = pinn_sample(family, name, "float64")
        bounds = RankBounds.from_ranks([m.rank for m in adapter.modules])
        rows = compare(cal.sigma_model, cal.batches, cal.loss, bounds, args.budgets)
        result["pinn"][f"{family}/{name}"] = rows
        for row in rows:
            print_agreement(f"{family}/{name}", row)
        cal.close()
    result["lm"] = small_lm_agreement(args)
    return result


def _progression_batch(n, length, vocab, g, direction):
    """Sequences a, a+d, a+2d, … mod vocab with a random step d; `direction` flips the step (the new task)."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g) * direction
    return {"input_ids": (start + step * torch.arange(length)) % vocab}


def small_lm_agreement(args) -> dict:
    """A 2-layer GPT-2 trained on one synthetic task, a LoRA adapter (r=8, R=64) trained with peft on a
    related one, then sublora with exact vs fisher curvature."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, length = 32, 24
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=vocab,
        n_positions=length,
        bos_token_id=0,
        attn_implementation="eager",
    )  # eager: SDPA attention has no second derivative on the CPU
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    base = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    optim = torch.optim.Adam(base.parameters(), lr=3e-3)
    for _ in range(300 if not args.quick else 100):  # the base task: ascending progressions
        optim.zero_grad()
        lm_loss(base, _progression_batch(32, length, vocab, g, 1)).backward()
        optim.step()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(GPT2_TARGETS), fan_in_fan_out=True, lora_dropout=0.0)
    model = get_peft_model(base, lora)
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(400 if not args.quick else 100):  # the adapter's task: descending progressions
        optim.zero_grad()
        lm_loss(model, _progression_batch(32, length, vocab, g, -1)).backward()
        optim.step()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        adapter = read_adapter(Path(tmp))
    fresh = GPT2LMHeadModel(config)
    fresh.load_state_dict(state)
    spectra = adapter_spectra(adapter)
    sm = SigmaModel(
        fresh.eval(), adapter.modules, spectra, lm_loss, dtype=torch.float64, per_sample_loss_fn=lm_per_sample_loss
    )
    g = torch.Generator().manual_seed(1)
    batches = [_progression_batch(16, length, vocab, g, -1) for _ in range(4)]
    bounds = RankBounds.from_ranks([m.rank for m in adapter.modules])

    def kept_loss(kept):
        return sm.mean_loss(torch.where(kept, sm.sigma, torch.zeros_like(sm.sigma)), batches)

    rows = compare(sm, batches, kept_loss, bounds, [b for b in (8, 16, 32) if b < sm.size])
    for row in rows:
        print_agreement(f"small LM (R={sm.size})", row)
    sm.remove()
    return {"R": sm.size, "rows": rows}


# ----------------------------------------------------------------------------- main

SECTIONS = {  # memory first: its peak-RSS figures are cleanest in a fresh process
    "memory": bench_memory,
    "exact": bench_exact,
    "fisher": bench_fisher,
    "greedy": bench_greedy,
    "agreement": bench_agreement,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke test, not the figures)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the best time counts")
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20])
    parser.add_argument("--all-samples", action="store_true", help="agreement on all 9 PINN adapters, not 3")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--device", default="cpu", help="device of the exact and fisher sections (e.g. cuda)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    for name in args.sections.split(","):
        results[name] = SECTIONS[name](args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
