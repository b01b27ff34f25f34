"""How `sublora prune --calib --curvature fisher` scales on Llama-shaped adapters (docs/scale.md).

    python bench/llm_scale.py                                   # the default sizes, CPU
    python bench/llm_scale.py --sizes 256x4,512x8 --sequences 16 --tokens 64
    python bench/llm_scale.py --device cuda --sizes 1024x16     # on a GPU machine

For each size (hidden × layers) a Llama model is built in code (random weights, seeded; vocabulary 1024,
intermediate 8/3 × hidden, heads of 64) with a peft LoRA adapter, r = 16 on all seven projections (q, k, v, o,
gate, up, down; R = 112 × layers), and a calibration script with a per-sequence next-token cross-entropy over
`--sequences` random sequences of `--tokens` tokens in batches of 8. Each measurement runs in its own process,
so its peak RSS (ru_maxrss) is its own:
  baseline  one forward+backward pass over the calibration set (peft model, gradients into the LoRA factors),
            timed after one warm-up batch: the median of REPEATS passes;
  prune     `sublora prune --calib --curvature fisher --budget 50%` end to end, in-process through the CLI's
            entry point; time = the sum of the report's stage timings (load, svd, eval, curvature, select,
            write) without `calibrate` (importing the script, load_model() building the model, batches()), which
            the baseline does untimed too; `calibrate` is listed with the stages.
The ratios are prune/baseline time (target ≤ 3×) and prune peak RSS / (baseline peak RSS + 8R² bytes, the
float64 Fisher) (target ≤ 1.5×). The growth exponents are least-squares slopes of log(seconds) and log(extra
MiB) against log(R). Results go to bench/results/llm_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, VOCAB, BATCH = 16, 1024, 8
REPEATS = 3  # baseline passes; the median is the unit (busy shared cores make single timings noisy)

CALIB = '''
"""Calibration script written by bench/llm_scale.py for one model size."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
SETUP = json.loads((HERE / "setup.json").read_text())


def load_model():
    model = LlamaForCausalLM(LlamaConfig(**SETUP["config"]))
    model.load_state_dict(load_file(str(HERE / "base.safetensors")), strict=False)
    return model.to(SETUP["device"])


def batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SETUP["config"]["vocab_size"], (SETUP["sequences"], SETUP["tokens"]), generator=g)
    return list(ids.split(SETUP["batch"]))


def per_sample_loss(model, batch):
    logits = model(input_ids=batch).logits[:, :-1].float()
    target = batch[:, 1:].to(logits.device)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
'''


def config(hidden: int, layers: int, tokens: int) -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": (8 * hidden // 3 + 63) // 64 * 64,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 64),
        "max_position_embeddings": tokens,
        "tie_word_embeddings": False,
    }


def build(root: Path, hidden: int, layers: int, sequences: int, tokens: int, device: str) -> None:
    """base.safetensors, adapter/ (peft, random non-zero B) and calib.py + setup.json under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    setup = {"config": config(hidden, layers, tokens), "sequences": sequences, "tokens": tokens, "batch": BATCH}
    (root / "setup.json").write_text(json.dumps({**setup, "device": device}))
    (root / "calib.py").write_text(textwrap.dedent(CALIB))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**setup["config"]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "base.safetensors"))
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=PROJECTIONS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(root / "adapter"))


def child_baseline(root: Path) -> dict:
    """One forward+backward pass over all batches of the peft model, timed after a warm-up batch."""
    import torch
    from peft import PeftModel

    sys.path.insert(0, str(root))
    import calib

    model = PeftModel.from_pretrained(calib.load_model(), str(root / "adapter"), is_trainable=True)
    data = calib.batches()
    calib.per_sample_loss(model, data[0]).mean().backward()
    times = []
    for _ in range(REPEATS):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for batch in data:
            calib.per_sample_loss(model, batch).mean().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2], "all_seconds": times}


def child_prune(root: Path) -> dict:
    from sublora_cli.cli.app import main

    report = root / "out" / "sublora_report.json"
    sys.argv = ["sublora", "prune", str(root / "adapter"), "--calib", str(root / "calib.py"), "--curvature",
                "fisher", "--budget", "50%", "--out", str(root / "out"), "--overwrite", "--json"]  # fmt: skip
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    timings = json.loads(report.read_text())["timings"]
    stages = {k: v for k, v in timings.items() if isinstance(v, (int, float)) and k != "total"}
    return {"seconds": sum(v for k, v in stages.items() if k != "calibrate"), "stages": stages}


def run_child(kind: str, root: Path) -> dict:
    """`kind` measured in a fresh process; its result with the process's peak RSS (and peak GPU memory)."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(kind: str, root: Path) -> None:
    import torch

    result = child_baseline(root) if kind == "baseline" else child_prune(root)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (the growth exponent); None with fewer than two usable points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    var = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else None


def measure(hidden: int, layers: int, sequences: int, tokens: int, device: str, work: Path) -> dict:
    root = work / f"h{hidden}_l{layers}"
    build(root, hidden, layers, sequences, tokens, device)
    R = RANK * len(PROJECTIONS) * layers
    baseline, prune = run_child("baseline", root), run_child("prune", root)
    matrix_mib = 8 * R * R / 2**20
    row = {
        "hidden": hidden,
        "layers": layers,
        "R": R,
        "baseline_s": baseline["seconds"],
        "baseline_all_s": baseline["all_seconds"],
        "prune_s": prune["seconds"],
        "time_ratio": prune["seconds"] / baseline["seconds"],
        "stages_s": prune["stages"],
        "baseline_rss_mib": baseline["peak_rss_mib"],
        "prune_rss_mib": prune["peak_rss_mib"],
        "fisher_mib": matrix_mib,
        "memory_ratio": prune["peak_rss_mib"] / (baseline["peak_rss_mib"] + matrix_mib),
    }
    if "peak_cuda_mib" in prune:
        row["baseline_cuda_mib"], row["prune_cuda_mib"] = baseline["peak_cuda_mib"], prune["peak_cuda_mib"]
    print(json.dumps(row), file=sys.stderr)
    return row


def markdown(meta: dict, rows: list[dict], growth: dict) -> str:
    lines = [
        "# `prune --calib --curvature fisher` on Llama-shaped adapters (bench/llm_scale.py)",
        "",
        f"{meta['machine']}; device {meta['device']}; {meta['sequences']} sequences × {meta['tokens']} tokens in "
        f"batches of {BATCH}; LoRA r = {RANK} on all seven projections; torch threads {meta['threads']}.",
        "",
        "prune s: the stages after `calibrate` (script import and load_model(), untimed in the baseline too).",
        "",
        "| hidden | layers | R | fwd+bwd s | prune s | time × | fwd+bwd RSS MiB | prune RSS MiB | F MiB | memory × |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['layers']} | {r['R']} | {r['baseline_s']:.2f} | {r['prune_s']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['baseline_rss_mib']:.0f} | {r['prune_rss_mib']:.0f} | "
            f"{r['fisher_mib']:.1f} | {r['memory_ratio']:.2f} |"
        )
    lines += ["", "Stage seconds of prune:", ""]
    for r in rows:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
        lines.append(f"- {r['hidden']}×{r['layers']} (R = {r['R']}): {stages}")
    lines += ["", "Growth exponents (slope of log y on log R over the sizes above): " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in growth.items()
    ), ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x4,512x8,768x12,1024x16", help="hidden×layers, comma separated")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_scale")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for hidden, layers in sizes:  # the results are rewritten after each size: a run cut short keeps them
            rows.append(measure(hidden, layers, args.sequences, args.tokens, args.device, Path(work)))
            write(args, rows)
    print(args.out.with_suffix(".md").read_text())


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    import torch

    Rs = [r["R"] for r in rows]
    growth = {
        "prune seconds": slope(Rs, [r["prune_s"] for r in rows]),
        "fwd+bwd seconds": slope(Rs, [r["baseline_s"] for r in rows]),
        "prune RSS": slope(Rs, [r["prune_rss_mib"] for r in rows]),
    }
    meta = {
        "machine": f"{os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""),
        "device": args.device,
        "sequences": args.sequences,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows, "growth": growth}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(meta, rows, growth))


if __name__ == "__main__":
    main()
