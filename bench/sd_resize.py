"""An SD-sized kohya LoRA resized end to end by kohya's own `networks/resize_lora.py` and pruned by sublora to the
same bytes: wall time of each whole run (start, load, resize/prune, save) and the Frobenius error of what each wrote.

Run: python bench/sd_resize.py [--model sd15|sdxl] [--rank 16] [--new-ranks 4 8] [--threads 1]
                               [--kohya PATH/TO/sd-scripts] [--kohya-pythonpath DIRS] [--sublora-src DIR] [--json F]

The file is built in code (random factors with a decaying spectrum whose decay and norm vary by module, fp16,
alpha = rank / 2) with kohya's key names for the modules a default LoRA of that model trains (`MODULES`).

For every `--new-ranks` n: with `--kohya` (a copy of kohya-ss/sd-scripts; the project does not depend on it, and
`--kohya-pythonpath` may name where its dependencies are installed), `resize_lora.py --new_rank n --save_precision
fp16 --device cpu` runs in a subprocess (`KOHYA_RUNNER`: imports, then `resize()`, timed); sublora's `prune`
runs in a subprocess too (`python -m sublora_cli.cli.app`, `--sublora-src` runs another checkout, e.g. an older
commit) at a bytes budget equal to the tensors kohya wrote (without `--kohya`: the tensors of a rank-n file), with
`--method magnitude` and `--method balanced`. Each written file's error against the input is measured from the
factors: ‖ΔW − ΔW'‖F / ‖ΔW‖F over the whole file, and the largest per-module relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONTEXT = {"sd15": 768, "sdxl": 2048}  # cross-attention context width
# (kohya block name, channels, transformer blocks per Transformer2D); SD 1.5 as kohya names its diffusers UNet,
# SDXL in the SGM names kohya uses for it
TRANSFORMERS = {
    "sd15": [(f"down_blocks_{b}_attentions_{a}", c, 1) for b, c in enumerate((320, 640, 1280)) for a in (0, 1)]
    + [("mid_block_attentions_0", 1280, 1)]
    + [(f"up_blocks_{b}_attentions_{a}", c, 1) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)],
    "sdxl": [(f"input_blocks_{i}_1", 640, 2) for i in (4, 5)]
    + [(f"input_blocks_{i}_1", 1280, 10) for i in (7, 8)]
    + [("middle_block_1", 1280, 10)]
    + [(f"output_blocks_{i}_1", 1280, 10) for i in (0, 1, 2)]
    + [(f"output_blocks_{i}_1", 640, 2) for i in (3, 4, 5)],
}
TEXT_ENCODER = {"sd15": "lora_te", "sdxl": "lora_te1"}  # CLIP-L, 12 layers, width 768
KOHYA_RUNNER = """
import importlib.util, json, sys, time, types
start = time.perf_counter()
sd_scripts, argv = sys.argv[1], sys.argv[2:]
import transformers.modeling_utils, diffusers  # before the stub below, so they see no torchvision
if importlib.util.find_spec("torchvision") is None:  # resize_lora.py never uses it; library/utils.py imports it
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")
    stub.transforms.__getattr__ = lambda name: lambda *args, **kwargs: None  # Compose(...) at import time
    sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms})
sys.path.insert(0, sd_scripts)
from networks import resize_lora
imported = time.perf_counter()
resize_lora.resize(resize_lora.setup_parser().parse_args(argv))
print(json.dumps({"import_seconds": imported - start, "resize_seconds": time.perf_counter() - imported}))
"""


def modules(model: str) -> dict[str, tuple[int, int]]:
    """{kohya module name: (out, in)}: every Transformer2D of the UNet (proj_in/proj_out; per transformer block
    attn1/attn2 q/k/v/out and the GEGLU feed-forward) and the CLIP-L text encoder (q/k/v/out_proj, fc1, fc2).
    SD 1.5: 192 + 72 = 264 modules; SDXL: 722 + 72 = 794 (text encoder 2 left out, as most SDXL LoRAs do)."""
    found = {}
    for block, c, depth in TRANSFORMERS[model]:
        prefix = f"lora_unet_{block}"
        found[f"{prefix}_proj_in"] = found[f"{prefix}_proj_out"] = (c, c)
        for t in range(depth):
            tb = f"{prefix}_transformer_blocks_{t}"
            for attn in ("attn1", "attn2"):
                kv_in = c if attn == "attn1" else CONTEXT[model]
                found[f"{tb}_{attn}_to_q"] = found[f"{tb}_{attn}_to_out_0"] = (c, c)
                found[f"{tb}_{attn}_to_k"] = found[f"{tb}_{attn}_to_v"] = (c, kv_in)
            found[f"{tb}_ff_net_0_proj"] = (8 * c, c)  # GEGLU: value and gate, 4c each
            found[f"{tb}_ff_net_2"] = (c, 4 * c)
    for layer in range(12):
        te = f"{TEXT_ENCODER[model]}_text_model_encoder_layers_{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            found[f"{te}_self_attn_{proj}"] = (768, 768)
        found[f"{te}_mlp_fc1"], found[f"{te}_mlp_fc2"] = (3072, 768), (768, 3072)
    return found


def build_file(path: Path, model: str, rank: int) -> None:
    """Random factors in fp16, alpha = rank / 2; each module's spectrum decays at its own rate (from 10× to 1000×
    over the rank) and its norm varies over two orders of magnitude, as trained LoRAs' do."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp) in modules(model).items():
        fall = float(torch.empty(1).uniform_(1, 3, generator=g))
        size = 10 ** float(torch.empty(1).uniform_(-1, 1, generator=g))
        decay = torch.logspace(0, -fall, rank) * size
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) * decay[:, None] / inp**0.5).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)}
    save_file(tensors, str(path), metadata=metadata)


def factors(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (up, down, scale)} in float64, as kohya's loaders read a file (scale = alpha / rank)."""
    tensors = load_file(str(path))
    found = {}
    for key in (k for k in tensors if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        down = tensors[key].double().flatten(1)
        up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
        found[name] = (up, down, alpha / down.shape[0])
    return found


def errors(original: Path, written: Path) -> dict[str, float]:
    """‖ΔW − ΔW'‖F / ‖ΔW‖F over the whole file and the largest per module, from the factors alone:
    ⟨s·B·A, s'·B'·A'⟩ = s s' Σ (BᵀB') ⊙ (A A'ᵀ), never the dense update."""
    before, after = factors(original), factors(written)

    def inner(x, y):
        return x[2] * y[2] * float(((x[0].T @ y[0]) * (x[1] @ y[1].T)).sum())

    squared, norms, worst = 0.0, 0.0, 0.0
    for name, x in before.items():
        norm = inner(x, x)
        error = norm - 2 * inner(x, after[name]) + inner(after[name], after[name]) if name in after else norm
        squared, norms, worst = squared + error, norms + norm, max(worst, (max(error, 0.0) / norm) ** 0.5)
    return {"relative_error": (max(squared, 0.0) / norms) ** 0.5, "worst_module_error": worst}


def tensor_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def timed(command: list[str], env: dict) -> tuple[dict, str]:
    """Run a command: its wall and CPU seconds (user + system: what the shared machine's load inflates less) and
    its stdout."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … failed:\n{done.stderr[-3000:]}")
    return {"wall_seconds": time.perf_counter() - start, "cpu_seconds": _children_cpu() - cpu}, done.stdout


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_kohya(args, source: Path, out: Path, new_rank: int, env: dict) -> dict:
    kohya_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [args.kohya_pythonpath, env.get("PYTHONPATH")])))
    command = [sys.executable, "-c", KOHYA_RUNNER, str(args.kohya), "--model", str(source), "--save_to", str(out)]
    command += ["--new_rank", str(new_rank), "--save_precision", "fp16", "--device", "cpu"]
    seconds, stdout = timed(command, kohya_env)
    return {**seconds, **json.loads(stdout.strip().splitlines()[-1])}


def run_sublora(args, source: Path, out: Path, budget: int, method: str, env: dict) -> dict:
    sublora_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [args.sublora_src, env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "sublora_cli", "prune", str(source), "--budget", f"{budget}B", "--method", method]
    command += ["--out", str(out), "--json"]
    seconds, stdout = timed(command, sublora_env)
    report = json.loads(stdout)
    return {**seconds, "stages": report["timings"], "rank_after": report["totals"]["rank_after"]}


def uniform_bytes(source: Path, new_rank: int) -> int:
    """The tensors of the file at rank `new_rank` everywhere (fp16 factors, the alphas)."""
    tensors = load_file(str(source))
    total = 0
    for key, t in tensors.items():
        rank = t.shape[0] if key.endswith(".lora_down.weight") else t.shape[1] if key.endswith("up.weight") else 0
        total += t.numel() * t.element_size() * new_rank // rank if rank else t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TRANSFORMERS), default="sd15")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-ranks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kohya", type=Path, default=None, help="a copy of kohya-ss/sd-scripts")
    parser.add_argument("--kohya-pythonpath", default=None, help="where kohya's dependencies are installed")
    parser.add_argument("--sublora-src", default=None, help="run the sublora package found in this directory")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "balanced"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    results = {"model": args.model, "rank": args.rank, "threads": args.threads, "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / f"{args.model}_r{args.rank}.safetensors"
        build_file(source, args.model, args.rank)
        results.update(modules=len(modules(args.model)), input_bytes=tensor_bytes(source))
        print(f"{args.model}: {results['modules']} modules, rank {args.rank}, {results['input_bytes'] / 2**20:.1f} MiB")
        for new_rank in args.new_ranks:
            row = {"new_rank": new_rank}
            if args.kohya is not None:
                kohya_out = work / f"kohya_{new_rank}.safetensors"
                row["kohya"] = run_kohya(args, source, kohya_out, new_rank, env)
                row["kohya"].update(bytes=tensor_bytes(kohya_out), **errors(source, kohya_out))
                budget = row["kohya"]["bytes"]
            else:
                budget = uniform_bytes(source, new_rank)
            row["budget_bytes"] = budget
            for method in args.methods:
                out = work / f"{method}_{new_rank}"
                row[method] = run_sublora(args, source, out, budget, method, env)
                row[method].update(bytes=tensor_bytes(out / source.name), **errors(source, out / source.name))
            results["rows"].append(row)
            print(json.dumps(row))
    results["load_average"] = os.getloadavg()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
