"""An SDXL-sized kohya LoRA pruned end to end by sublora, against the dense SVD per module of kohya's resize.

Run: python bench/sd_resize.py [--ranks 32 128] [--threads 2] [--json bench_out/sd_resize.json]

The file is built in code (random factors with a decaying spectrum, fp16, alpha = rank / 2) with kohya's key
names for the modules a default SDXL LoRA trains (see `sdxl_modules`). sublora's `inspect` (read + SVD form +
figures) and `prune --budget 50%` (magnitude: read, SVD form, selection, write with metadata and hashes, reports)
are timed end to end in-process, as the CLI runs them.

The baseline is what `networks/resize_lora.py` does per module: cast to fp32, W = up @ down, then
`torch.linalg.svd(W)` (full matrices). Its cost depends only on the module's shape (and, for the product, the
rank), so it is timed once for every distinct (out, in) shape (11 shapes) and multiplied by the number of modules
of that shape (the extrapolation);
loading and saving, which kohya's script also does, are left out of the baseline (so the speed-up is a lower bound).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.formats import read_adapter
from sublora_cli.pipeline.spectra import adapter_spectra, describe_adapter

CONTEXT_DIM = 2048  # SDXL's cross-attention context (CLIP-L 768 + OpenCLIP-bigG 1280)
# SGM block names as kohya writes them for SDXL: (block, channels, transformer blocks per Transformer2D)
UNET_TRANSFORMERS = (
    [(f"input_blocks_{i}_1", 640, 2) for i in (4, 5)]
    + [(f"input_blocks_{i}_1", 1280, 10) for i in (7, 8)]
    + [("middle_block_1", 1280, 10)]
    + [(f"output_blocks_{i}_1", 1280, 10) for i in (0, 1, 2)]
    + [(f"output_blocks_{i}_1", 640, 2) for i in (3, 4, 5)]
)


def sdxl_modules() -> dict[str, tuple[int, int]]:
    """{kohya module name: (out, in)} for kohya's default SDXL LoRA targets: every Transformer2D of the UNet
    (proj_in/proj_out and, per transformer block, attn1/attn2 q/k/v/out and the GEGLU feed-forward) — 722
    modules — and text encoder 1 (CLIP-L, 12 layers: q/k/v/out_proj, fc1, fc2) — 72 modules: 794 in all.
    Text encoder 2 (OpenCLIP-bigG) is left out, as in most SDXL LoRAs, which train the UNet and at most TE1."""
    modules = {}
    for block, c, depth in UNET_TRANSFORMERS:
        prefix = f"lora_unet_{block}"
        modules[f"{prefix}_proj_in"] = modules[f"{prefix}_proj_out"] = (c, c)
        for t in range(depth):
            tb = f"{prefix}_transformer_blocks_{t}"
            for attn in ("attn1", "attn2"):
                kv_in = c if attn == "attn1" else CONTEXT_DIM
                modules[f"{tb}_{attn}_to_q"] = modules[f"{tb}_{attn}_to_out_0"] = (c, c)
                modules[f"{tb}_{attn}_to_k"] = modules[f"{tb}_{attn}_to_v"] = (c, kv_in)
            modules[f"{tb}_ff_net_0_proj"] = (8 * c, c)  # GEGLU: value and gate, 4c each
            modules[f"{tb}_ff_net_2"] = (c, 4 * c)
    for layer in range(12):
        te = f"lora_te1_text_model_encoder_layers_{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            modules[f"{te}_self_attn_{proj}"] = (768, 768)
        modules[f"{te}_mlp_fc1"], modules[f"{te}_mlp_fc2"] = (3072, 768), (768, 3072)
    return modules


def build_file(path: Path, rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -2, rank)
    tensors = {}
    for name, (out, inp) in sdxl_modules().items():
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) * decay[:, None] / inp**0.5).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)}
    save_file(tensors, str(path), metadata=metadata)


@functools.cache
def dense_svd_seconds(out: int, inp: int) -> float:
    """resize_lora.py's `torch.linalg.svd(W)` (full matrices, fp32) of one out×in update; LAPACK's cost depends on
    the shape, not on the rank of W, so it is timed once per shape and shared by the ranks."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out, 32, generator=g) @ torch.randn(32, inp, generator=g)
    start = time.perf_counter()
    torch.linalg.svd(weight)
    return time.perf_counter() - start


def product_seconds(out: int, inp: int, rank: int) -> float:
    """resize_lora.py's cast to fp32 and W = up @ down at `rank`."""
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(out, rank, generator=g).half(), torch.randn(rank, inp, generator=g).half()
    start = time.perf_counter()
    up.float() @ down.float()
    return time.perf_counter() - start


def baseline(rank: int) -> dict:
    """kohya's per-module work (product + dense SVD) timed once per module shape, extrapolated to all modules."""
    counts = Counter(sdxl_modules().values())
    each = {shape: product_seconds(*shape, rank) + dense_svd_seconds(*shape) for shape in counts}
    return {
        "per_shape": {f"{o}x{i}": {"modules": counts[(o, i)], "seconds_each": each[(o, i)]} for o, i in counts},
        "timed_seconds": sum(each.values()),
        "extrapolated_seconds": sum(counts[shape] * each[shape] for shape in counts),
    }


def run(rank: int, work: Path) -> dict:
    path = work / f"sdxl_r{rank}.safetensors"
    build_file(path, rank)
    start = time.perf_counter()
    adapter = read_adapter(path)
    describe_adapter(adapter, adapter_spectra(adapter))
    inspect_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = prune(path, PruneOptions(budget="50%"), out_dir=work / f"out_r{rank}")
    prune_seconds = time.perf_counter() - start
    written = work / f"out_r{rank}" / path.name
    dense = baseline(rank)
    return {
        "rank": rank,
        "modules": len(adapter.modules),
        "input_bytes": path.stat().st_size,
        "output_bytes": written.stat().st_size,
        "inspect_seconds": inspect_seconds,
        "prune_seconds": prune_seconds,
        "prune_stages": dict(result.report["timings"]),
        "rank_after": result.report["totals"]["rank_after"],
        "dense_baseline": dense,
        "speedup": dense["extrapolated_seconds"] / prune_seconds,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; {len(sdxl_modules())} modules (SDXL UNet + TE1), fp16")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            r = run(rank, Path(tmp))
            results.append(r)
            d = r["dense_baseline"]
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["prune_stages"].items())
            print(
                f"rank {rank}: file {r['input_bytes'] / 2**20:.1f} MiB → {r['output_bytes'] / 2**20:.1f} MiB "
                f"(total rank {r['modules'] * rank} → {r['rank_after']}); inspect {r['inspect_seconds']:.2f} s; "
                f"prune {r['prune_seconds']:.2f} s ({stages}); kohya dense SVD {d['extrapolated_seconds']:.0f} s "
                f"(extrapolated from {len(d['per_shape'])} shapes timed in {d['timed_seconds']:.1f} s): "
                f"{r['speedup']:.0f}× faster; load average {r['load_average'][0]:.1f}"
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
