"""Regenerate the shipped PINN samples: per family a base MLP pre-trained on one parameter value and three
rank-50 LoRA adapters (peft) fine-tuned to other values, each trained with Adam then L-BFGS on exactly the
calibration set and loss of its calib_*.py, so that the adapter sits at a stationary point of that loss.

    .venv/bin/python sample_checkpoints/make_pinn.py                   # all families, width 128
    .venv/bin/python sample_checkpoints/make_pinn.py --family elliptic --out /tmp/samples

Writes <out>/<family>/{base.safetensors, adapter_<name>/, calib_<name>.py} and <out>/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch
from pinn import FAMILIES, HIDDEN, MLP, N_BATCHES, N_BC, N_RES, SEED, pinn_loss, rel_l2, sample
from safetensors.torch import save_file

# family -> (parameter name, base value, {adapter name: value}); the names are the directory suffixes
SETUPS = {
    "elliptic": ("k", 1.0, {"k2": 2.0, "k3": 3.0, "k4": 4.0}),
    "allen_cahn": ("eps", 0.2, {"eps0p1": 0.1, "eps0p15": 0.15, "eps0p3": 0.3}),
    "hyperbolic": ("beta", 1.0, {"beta2": 2.0, "beta3": 3.0, "beta4": 4.0}),
}

CALIB_TEMPLATE = '''r"""Calibration script for adapter_{name} ({family}, {param} = {value}); see ../pinn.py.

    sublora prune sample_checkpoints/{family}/adapter_{name} \\
        --calib sample_checkpoints/{family}/calib_{name}.py --budget 50 --out /tmp/{family}_{name}_b50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tool loads this file by path
from pinn import calibration  # noqa: E402

load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, exact = calibration(
    "{family}", Path(__file__).parent, {param}={value}
)
'''


def calib_set(problem):
    """The union of the calibration batches as one batch (equal-sized batches: same mean loss)."""
    g = torch.Generator().manual_seed(SEED)
    parts = [sample(problem, N_RES, N_BC, g) for _ in range(N_BATCHES)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def fit(model, params, problem, batch, adam_steps, lbfgs_steps, lr):
    """Adam to get into the basin, then full-batch L-BFGS to converge (the usual PINN recipe). L-BFGS runs
    in rounds of at most 1000 iterations with a fresh history (float32 line searches stall otherwise),
    until a round gains less than 10 % or lbfgs_steps are spent."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, adam_steps, eta_min=lr / 20)
    for _ in range(adam_steps):
        opt.zero_grad()
        pinn_loss(problem, model, batch).backward()
        opt.step()
        sched.step()

    def closure():
        lbfgs.zero_grad()
        loss = pinn_loss(problem, model, batch)
        loss.backward()
        return loss

    loss = pinn_loss(problem, model, batch).item()
    for _ in range(0, lbfgs_steps, 1000):
        lbfgs = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=1000,
            max_eval=1250,
            history_size=50,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )
        lbfgs.step(closure)
        loss, before = pinn_loss(problem, model, batch).item(), loss
        if loss > 0.9 * before:
            break


def summary(model, params, problem, batch):
    """Final loss, gradient norm w.r.t. the trained parameters, relative L2 error on the test grid."""
    loss = pinn_loss(problem, model, batch)
    g = torch.autograd.grad(loss, params)
    return {
        "loss": loss.item(),
        "grad_norm": torch.cat([x.flatten() for x in g]).norm().item(),
        "rel_l2": rel_l2(problem, model),
    }


def make_family(family, out, width, args):
    from peft import LoraConfig, get_peft_model

    param, base_value, adapters = SETUPS[family]
    out = out / family
    out.mkdir(parents=True, exist_ok=True)
    results = {}

    t0 = time.time()
    torch.manual_seed(0)
    problem = FAMILIES[family](**{param: base_value})
    batch = calib_set(problem)
    base = MLP(problem.d_in, width)
    fit(base, list(base.parameters()), problem, batch, args.base_adam, args.base_lbfgs, 1e-3)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(out / "base.safetensors"))
    results["base"] = {
        param: base_value,
        **summary(base, list(base.parameters()), problem, batch),
        "seconds": round(time.time() - t0, 1),
    }
    print(family, "base", results["base"], flush=True)

    for name, value in adapters.items():
        t0 = time.time()
        torch.manual_seed(1)
        problem = FAMILIES[family](**{param: value})
        batch = calib_set(problem)
        config = LoraConfig(r=50, lora_alpha=50, target_modules=HIDDEN, init_lora_weights=True)
        model = get_peft_model(copy.deepcopy(base), config)
        params = [p for p in model.parameters() if p.requires_grad]
        before = rel_l2(problem, model)
        fit(model, params, problem, batch, args.adam, args.lbfgs, 1e-3)
        model.save_pretrained(str(out / f"adapter_{name}"))
        (out / f"adapter_{name}" / "README.md").unlink(missing_ok=True)  # peft's empty model card
        (out / f"calib_{name}.py").write_text(CALIB_TEMPLATE.format(family=family, name=name, param=param, value=value))
        results[name] = {
            param: value,
            "rel_l2_base_model": before,
            **summary(model, params, problem, batch),
            "seconds": round(time.time() - t0, 1),
        }
        print(family, name, results[name], flush=True)
    return results


def main():
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--family", choices=[*SETUPS, "all"], default="all")
    parser.add_argument("--width", type=int, default=128, help="hidden width (>= 50: the LoRA rank is 50)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--base-adam", type=int, default=3000)
    parser.add_argument("--base-lbfgs", type=int, default=3000)
    parser.add_argument("--adam", type=int, default=1000)
    parser.add_argument("--lbfgs", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    assert args.width >= 50, "LoRA rank 50 needs a hidden width of at least 50"
    torch.set_num_threads(args.threads)

    t0 = time.time()
    families = list(SETUPS) if args.family == "all" else [args.family]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != Path(__file__).parent.resolve():  # the calib scripts import ../pinn.py
        shutil.copy(Path(__file__).parent / "pinn.py", args.out / "pinn.py")
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for family in families:
        results[family] = {"width": args.width, **make_family(family, args.out, args.width, args)}
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
