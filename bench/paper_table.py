"""The SubLoRA paper's training-free experiment (§5.1, Figures 1–3, Table 1) on the shipped PINN samples.

For each family × each of its three adapters × each budget, every method selects the components to keep; the
calibration loss (the training loss) and evaluate()'s relative L2 error are measured on the pruned model, with the
quadratic model's prediction next to them. Per method it also times what the method needs: magnitude nothing,
linear one gradient, diag the Hessian diagonal, hessian/sublora/sublora-random the exact σ-Hessian; plus the
selection itself. Besides the methods it records the diagnostics that explain the results: gradient norm, spectrum
of H, how much of H the submodular projection clips, the greedy gains at the empty set, measured losses of keeping
only a few top components, and a backward-elimination greedy on the raw H (a diagnostic, not a sublora method).

    python bench/paper_table.py                                   # everything, float32, into bench/results/
    python bench/paper_table.py --families elliptic --budgets 10,50 --seeds 0 --out /tmp/pt

Writes <out>/paper_table.json (every number), <out>/paper_table.md (generated tables; a hand-written discussion
below the DISCUSSION marker of an existing paper_table.md is kept) and <out>/<family>.png (loss and relative
error vs budget) plus <out>/quadratic_model.png (predicted vs measured loss increase).

Run time (shared 2-core machine, busy, 1 torch thread): the full default run (3 families, 9 adapters, budgets
10–90, 3 seeds, float32) takes 3–4 min (2.8 and 3.8 min measured under different loads); float64 took 6.2 min.
Per adapter the cost is the two curvature computations (exact and diagonal: 5–8 s each for elliptic, 2–3 s for
Allen–Cahn, 1 s for advection), ~90 measured losses and evaluations, and 450 extra sublora-random selections.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sublora_cli.commands.sweep import run_sweep
from sublora_cli.core.budget import Budget
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import predicted_increase, project_submodular, select
from sublora_cli.formats import read_adapter
from sublora_cli.model.calibrated import open_calibration
from sublora_cli.pipeline.spectra import adapter_spectra
from sublora_cli.pipeline.written import written_outcome

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
FAMILIES = {
    "elliptic": ["k2", "k3", "k4"],
    "allen_cahn": ["eps0p1", "eps0p15", "eps0p3"],
    "hyperbolic": ["beta2", "beta3", "beta4"],
}
METHODS = ["magnitude", "linear", "diag", "hessian", "sublora", "sublora-random"]
PAPER_NAMES = {
    "magnitude": "magnitude (not in paper)",
    "linear": "LinearLoRA",
    "diag": "DiagLoRA",
    "hessian": "HessLoRA-G",
    "sublora": "SubLoRA-G",
    "sublora-random": "SubLoRA-R (mean of seeds)",
}
CURVATURE_OF = {  # what each method needs computed before it can select
    "magnitude": None,
    "linear": "gradient",
    "diag": "diag",
    "hessian": "exact",
    "sublora": "exact",
    "sublora-random": "exact",
}
DISCUSSION = "<!-- DISCUSSION: hand-written below this line; paper_table.py keeps it across runs -->"
TIE = 0.05  # relative gap within which two numbers count as a tie in the claim checks


def table_header(first: str, columns) -> list[str]:
    """A markdown table's header and alignment rows: a label column, then right-aligned value columns."""
    label = f"| {first} | " if first else "| | "
    return [label + " | ".join(map(str, columns)) + " |", "|---|" + "---:|" * len(columns)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# measuring


def gradient_seconds(cal) -> float:
    """Time of what LinearLoRA needs: the gradient over σ (one backward pass per batch), nothing more."""
    start = time.perf_counter()
    with torch.enable_grad():
        s = cal.sigma.detach().clone().requires_grad_(True)
        for batch in cal.batches:
            (g,) = torch.autograd.grad(cal.sigma_model.loss(s, batch), s)
    del g
    return time.perf_counter() - start


def backward_elimination(sigma, gradient, hessian, budgets):
    """Start from everything kept and prune, one at a time, the component whose removal the raw quadratic model
    says costs least. Stays where the model is accurate (few components pruned) instead of starting from the
    base model as the forward greedy does. Returns {budget: kept mask}."""
    n = sigma.numel()
    kept = torch.ones(n, dtype=torch.bool)
    pruned = torch.zeros_like(sigma)  # σ on the pruned set P, 0 elsewhere
    out = {}
    for size in range(n, min(budgets) - 1, -1):
        if size in budgets:
            out[size] = kept.clone()
        if size == min(budgets):
            break
        # q(P ∪ {k}) − q(P) = −g_kσ_k + σ_k (H σ_P)_k + ½ H_kk σ_k²
        cost = -gradient * sigma + sigma * (hessian @ pruned) + 0.5 * hessian.diagonal() * sigma.square()
        cost[~kept] = math.inf
        k = int(torch.argmin(cost))
        kept[k] = False
        pruned[k] = sigma[k]
    return out


def module_ranks(kept: torch.Tensor, bounds: RankBounds) -> list[int]:
    return torch.bincount(bounds.group[kept], minlength=bounds.lower.numel()).tolist()


def run_adapter(family: str, name: str, args) -> dict:
    directory = SAMPLES / family
    adapter = read_adapter(directory / f"adapter_{name}")
    spectra = adapter_spectra(adapter)
    sigma = torch.cat([s.sigma for s in spectra])
    n = sigma.numel()
    bounds = RankBounds.from_ranks([m.rank for m in adapter.modules])
    budgets = [b for b in args.budgets if b <= n]
    cal = open_calibration(directory / f"calib_{name}.py", adapter, spectra, device="cpu", dtype=args.dtype)
    try:
        loss_before, metrics_before = cal.loss(), cal.metrics()
        log(f"  loss before {loss_before:.3e}, rel_l2 before {metrics_before['rel_l2']:.3e}")
        t_grad = gradient_seconds(cal)
        curv = cal.curvature("exact", max_hessian_gb=4.0)
        log(f"  exact curvature {curv.seconds:.1f} s")
        t_diag = cal.curvature("diag", max_hessian_gb=4.0).seconds if args.time_diag else curv.seconds
        log(f"  diagonal curvature {t_diag:.1f} s; sweep of {len(budgets)} budgets")
        curvature_seconds = {None: 0.0, "gradient": t_grad, "diag": t_diag, "exact": curv.seconds}

        def progress(_stage, done, total):
            if done % 12 == 0 or done == total:
                log(f"    sweep {done}/{total}")

        measure = written_outcome(cal, adapter, spectra, curv, refit_kept=False)  # the paper: no refit
        axis = [(b, Budget.ranks(b, sigma.numel())) for b in budgets]
        rows = run_sweep(measure, sigma, curv, bounds, axis, METHODS, args.seeds, loss_before, progress=progress)
        g, H = curv.gradient, curv.hessian
        projected, _, _ = project_submodular(H, sigma)
        none = torch.zeros(n, dtype=torch.bool)
        f_hat_all = predicted_increase(none, sigma, g, projected)  # f̂(N) − f̂(∅) on Ĥ: the most any set can gain
        records = []
        for row in rows:
            allowance = Budget.ranks(row.budget, sigma.numel())
            selection = select(row.method, sigma, allowance, bounds, gradient=g, hessian=H, seed=row.seed or 0)
            assert int(selection.kept.sum()) == row.rank_after
            records.append(
                {
                    **asdict(row),
                    "rel_l2": row.metrics_after["rel_l2"],
                    "module_ranks": module_ranks(selection.kept, bounds),
                    "curvature_seconds": curvature_seconds[CURVATURE_OF[row.method]],
                    # share of f̂(N) the kept set attains on the projected objective (what the guarantees are about)
                    "projected_objective_share": (f_hat_all - predicted_increase(selection.kept, sigma, g, projected))
                    / f_hat_all,
                }
            )

        # the randomized greedy against its own guarantee: E[f̂(S)] ≥ (1 − 1/e)·f̂(OPT) for monotone submodular f̂,
        # checked on many seeds (selection only, no loss evaluation)
        random_shares = {}
        for budget in budgets:
            shares = []
            for seed in range(args.guarantee_seeds):
                allowance = Budget.ranks(budget, sigma.numel())
                kept = select("sublora-random", sigma, allowance, bounds, gradient=g, hessian=H, seed=1000 + seed).kept
                shares.append((f_hat_all - predicted_increase(kept, sigma, g, projected)) / f_hat_all)
            random_shares[str(budget)] = {"mean": statistics.fmean(shares), "min": min(shares), "max": max(shares)}

        # diagnostics ---------------------------------------------------------------------------------------
        eig = torch.linalg.eigvalsh(H)
        off = H - torch.diag(H.diagonal())
        _, clipped_fraction, clipped_mass = project_submodular(H, sigma)
        base_loss = cal.loss(none)
        raw_gain0 = -g * sigma - 0.5 * H.diagonal() * sigma.square() + sigma * (H @ sigma)
        starts = [0] + torch.cumsum(torch.tensor([m.rank for m in adapter.modules]), 0).tolist()[:-1]
        tops = [s + i for s in starts for i in range(3)]  # top three components of each module

        def keep(indices):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[list(indices)] = True
            return mask

        subsets = {
            "none": [],
            "top1 of module 1": [starts[0]],
            "top1 of module 2": [starts[-1]],
            "top1 of both": [starts[0], starts[-1]],
            "top3 of module 1": tops[:3],
            "top3 of module 2": tops[-3:],
            "top3 of both": tops,
        }
        interactions = {}
        for label, indices in subsets.items():
            mask = keep(indices)
            measured = cal.loss(mask)
            interactions[label] = {
                "kept": indices,
                "predicted_increase": predicted_increase(mask, sigma, g, H),
                "increase": measured - loss_before,
                "rel_l2": cal.metrics(mask)["rel_l2"],
            }
        backward = []
        for budget, mask in sorted(backward_elimination(sigma, g, H, budgets).items()):
            measured = cal.loss(mask)
            backward.append(
                {
                    "budget": budget,
                    "predicted_increase": predicted_increase(mask, sigma, g, H),
                    "loss_after": measured,
                    "increase": measured - loss_before,
                    "rel_l2": cal.metrics(mask)["rel_l2"],
                    "module_ranks": module_ranks(mask, bounds),
                }
            )
        return {
            "family": family,
            "adapter": name,
            "modules": [m.name for m in adapter.modules],
            "ranks": [m.rank for m in adapter.modules],
            "sigma": [round(float(s), 6) for s in sigma],
            "loss_before": loss_before,
            "rel_l2_before": metrics_before["rel_l2"],
            "base_model": {"loss": base_loss, "rel_l2": cal.metrics(none)["rel_l2"]},
            "timings": {"gradient": t_grad, "diag_curvature": t_diag, "exact_curvature": curv.seconds},
            "curvature": {
                "grad_norm": float(g.norm()),
                "grad_sigma_norm": float((g * sigma).norm()),
                "hessian_eig_min": float(eig[0]),
                "hessian_eig_max": float(eig[-1]),
                "hessian_negative_eigs": int((eig < -1e-9 * eig[-1].abs()).sum()),
                "offdiag_over_diag_fro": float(off.norm() / H.diagonal().norm()),
                "clipped_fraction": clipped_fraction,
                "clipped_mass": clipped_mass,
                "predicted_increase_all_pruned": predicted_increase(none, sigma, g, H),
                "projected_increase_all_pruned": f_hat_all,
            },
            "raw_greedy_start": {
                "positive_gains": int((raw_gain0 > 0).sum()),
                "max_gain": float(raw_gain0.max()),
                "top_component_gains": {str(i): float(raw_gain0[i]) for i in tops},
            },
            "interactions": interactions,
            "random_greedy_projected_share": random_shares,
            "rows": records,
            "backward_elimination_raw_h": backward,
        }
    finally:
        cal.close()


# ---------------------------------------------------------------------------------------------------------------
# summarising


def cell(records: list[dict], key: str) -> float:
    """Mean over seeds (only sublora-random has several) of one budget × method."""
    return statistics.fmean(r[key] for r in records)


def by(adapter: dict) -> dict:
    """{(method, budget): [rows]} of one adapter."""
    out: dict = {}
    for r in adapter["rows"]:
        out.setdefault((r["method"], r["budget"]), []).append(r)
    return out


def fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def method_table(values: dict, budgets: list[int], methods: list[str]) -> list[str]:
    lines = table_header("method", budgets)
    for m in methods:
        cells = []
        for b in budgets:
            v = values.get((m, b))
            best = min(values.get((mm, b), math.inf) for mm in methods)
            cells.append(f"**{fmt(v)}**" if v is not None and v <= best * (1 + 1e-9) else fmt(v))
        lines.append(f"| {PAPER_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def compare(adapters: list[dict], a: str, b: str, key: str, budgets: list[int]) -> dict:
    """Over every (adapter, budget): how often method a beats b by more than TIE, ties, loses; and the geometric
    mean of the ratio a/b."""
    win = tie = lose = 0
    logs = []
    for ad in adapters:
        rows = by(ad)
        for bud in budgets:
            if (a, bud) not in rows or (b, bud) not in rows:
                continue
            va, vb = cell(rows[(a, bud)], key), cell(rows[(b, bud)], key)
            ratio = va / vb if vb > 0 else (1.0 if va == vb else math.inf)
            logs.append(math.log(max(ratio, 1e-300)))
            if ratio < 1 - TIE:
                win += 1
            elif ratio > 1 + TIE:
                lose += 1
            else:
                tie += 1
    gmean = math.exp(statistics.fmean(logs)) if logs else math.nan
    return {"a": a, "b": b, "key": key, "win": win, "tie": tie, "lose": lose, "geo_mean_ratio": gmean}


def model_accuracy(adapters: list[dict]) -> dict:
    """|predicted − measured| / measured loss increase of the quadratic model, per method, in three bands of the
    measured increase: below 1e-7 (at the level of the loss itself, where float32 rounding dominates), 1e-7 to 1e-2
    (the pruning regime), and 1e-2 and above (selections that wreck the adapter)."""
    bands = {"tiny": (-math.inf, 1e-7), "moderate": (1e-7, 1e-2), "large": (1e-2, math.inf)}
    out = {}
    for m in METHODS + ["backward (raw H)"]:
        errs: dict[str, list[float]] = {band: [] for band in bands}
        for ad in adapters:
            if m.startswith("backward"):
                rows = ad["backward_elimination_raw_h"]
            else:
                rows = [r for r in ad["rows"] if r["method"] == m]
            for r in rows:
                if r["predicted_increase"] is None or r["increase"] <= 0:
                    continue
                err = abs(r["predicted_increase"] - r["increase"]) / r["increase"]
                band = next(b for b, (lo, hi) in bands.items() if lo <= r["increase"] < hi)
                errs[band].append(err)
        out[m] = {
            band: {
                "n": len(v),
                "median_rel_err": statistics.median(v) if v else None,
                "max_rel_err": max(v) if v else None,
            }
            for band, v in errs.items()
        }
    return out


def write_markdown(result: dict, path: Path) -> None:
    budgets, adapters = result["meta"]["budgets"], result["adapters"]
    meta = result["meta"]
    keep = ""
    if path.exists() and DISCUSSION in path.read_text():
        keep = path.read_text().split(DISCUSSION, 1)[1]
    L = [
        "# SubLoRA paper table on the PINN samples",
        "",
        "Generated by `bench/paper_table.py` (everything above the discussion marker is regenerated on each run).",
        "",
        f"* Run: {meta['date']}, dtype {meta['dtype']}, {meta['threads']} torch thread(s), torch {meta['torch']}, "
        f"{meta['machine']}. **Wall time {meta['wall_seconds'] / 60:.1f} min** for {len(adapters)} adapters "
        f"({meta['wall_seconds'] / max(len(adapters), 1):.0f} s each: two curvature computations, "
        f"~{len(budgets) * 8 + 8 + len(budgets)} measured losses and evaluations).",
        f"* Budgets {budgets} (of R = 100: rank 50 on fc1 and fc2); sublora-random seeds {meta['seeds']} "
        "(tables show the mean over seeds). Loss = the calibration loss, which is the adapters' training loss; "
        "rel. error = evaluate()'s relative L2 error on a 101×101 grid. Bold = best in its column.",
        "* Paper names: LinearLoRA = `linear`, DiagLoRA = `diag`, HessLoRA-G = `hessian`, SubLoRA-G = `sublora`, "
        "SubLoRA-R = `sublora-random`; `magnitude` (largest σ, data-free) is an extra baseline.",
        "",
        "## The adapters and their curvature",
        "",
        "| adapter | loss | rel. error | base model rel. error | ‖g‖ | λmin(H) | λmax(H) | offdiag/diag | "
        "clipped share | clipped mass | exact H s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ad in adapters:
        c = ad["curvature"]
        L.append(
            f"| {ad['family']}/{ad['adapter']} | {fmt(ad['loss_before'])} | {fmt(ad['rel_l2_before'])} | "
            f"{ad['base_model']['rel_l2']:.2f} | {fmt(c['grad_norm'])} | {c['hessian_eig_min']:.1e} | "
            f"{c['hessian_eig_max']:.2f} | {c['offdiag_over_diag_fro']:.2f} | {c['clipped_fraction']:.2f} | "
            f"{c['clipped_mass']:.2f} | {ad['timings']['exact_curvature']:.1f} |"
        )
    L += [
        "",
        "‖g‖, λ: gradient and Hessian of the loss over the 100 singular values σ. clipped share / mass: the share of "
        "off-diagonal entries the submodular projection zeroes and their Frobenius norm relative to all off-diagonal "
        "entries.",
        "",
    ]
    families = list(dict.fromkeys(ad["family"] for ad in adapters))
    for key, title in (("rel_l2", "Relative L2 error"), ("loss_after", "Training loss")):
        L += [f"## {title} after pruning, mean over each family's three adapters", ""]
        for fam in families:
            group = [ad for ad in adapters if ad["family"] == fam]
            values = {}
            for m in METHODS:
                for b in budgets:
                    vals = [cell(by(ad)[(m, b)], key) for ad in group if (m, b) in by(ad)]
                    if vals:
                        values[(m, b)] = statistics.fmean(vals)
            ref = "rel_l2_before" if key == "rel_l2" else "loss_before"
            before = statistics.fmean(ad[ref] for ad in group)
            L += [f"### {fam} (before pruning: {fmt(before)})", ""] + method_table(values, budgets, METHODS) + [""]
    L += ["## Per adapter", ""]
    for ad in adapters:
        rows = by(ad)
        L += [f"<details><summary>{ad['family']}/{ad['adapter']}</summary>", ""]
        for key, title in (("rel_l2", "rel. error"), ("loss_after", "training loss")):
            values = {k: cell(v, key) for k, v in rows.items()}
            L += [f"{title} (before: {fmt(ad['rel_l2_before'] if key == 'rel_l2' else ad['loss_before'])})", ""]
            L += method_table(values, budgets, METHODS) + [""]
        ranks = {k: v[0]["module_ranks"] for k, v in rows.items() if k[0] != "sublora-random"}
        L += ["ranks kept per module (fc1/fc2)", "", *table_header("method", budgets)]
        for m in METHODS[:-1]:
            L.append(f"| {m} | " + " | ".join("/".join(map(str, ranks[(m, b)])) for b in budgets) + " |")
        L += ["", "</details>", ""]
    L += [
        "## Time per method (seconds, mean over adapters)",
        "",
        "What the method needs computed (magnitude nothing; linear one gradient over σ; diag the exact Hessian "
        "diagonal, which costs R Hessian-vector products like the full Hessian; the greedy methods the exact H) "
        "plus the selection, mean over budgets. Shared, busy 2-core machine: expect ±30 %.",
        "",
        "| method | curvature | selection (mean) | selection (max) | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, t in result["summary"]["timing"].items():
        L.append(
            f"| {PAPER_NAMES[m]} | {t['curvature']:.2f} | {t['select_mean'] * 1e3:.1f} ms | "
            f"{t['select_max'] * 1e3:.1f} ms | {t['total']:.2f} |"
        )
    L += [
        "",
        "## Claim checks (generated)",
        "",
        f"Every (adapter, budget) pair; A beats B when A's number is more than {TIE:.0%} lower. Geometric mean "
        "of A/B over the pairs (< 1: A better).",
        "",
        "| claim | A vs B | on | A better | tie | B better | geo. mean A/B |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for c in result["summary"]["claims"]:
        L.append(
            f"| {c['claim']} | {c['a']} vs {c['b']} | {c['key']} | {c['win']} | {c['tie']} | {c['lose']} | "
            f"{c['geo_mean_ratio']:.3g} |"
        )
    L += [
        "",
        "## Accuracy of the quadratic model",
        "",
        "|predicted − measured| / measured loss increase per method, median (max) and count, in three bands of "
        "the measured increase: < 1e-7 (the size of the loss itself, where float32 rounding of the loss dominates), "
        "1e-7 to 1e-2 (the pruning regime) and ≥ 1e-2 (selections that undo the adapter).",
        "",
        "| method | < 1e-7 | 1e-7 – 1e-2 | ≥ 1e-2 |",
        "|---|---:|---:|---:|",
    ]
    for m, a in result["summary"]["model_accuracy"].items():
        cells = [
            f"{fmt(b['median_rel_err'])} ({fmt(b['max_rel_err'])}), n = {b['n']}" if b["n"] else "—" for b in a.values()
        ]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += [
        "",
        "## Why the raw-Hessian greedy fails: diagnostics",
        "",
        "Gains of the forward greedy on the raw H at the empty set (keep nothing = the base model), for the top "
        "three components of each module, and how many of the 100 gains are positive:",
        "",
        "| adapter | positive gains | max gain | gains of the top 3 of fc1 | gains of the top 3 of fc2 |",
        "|---|---:|---:|---|---|",
    ]
    for ad in adapters:
        s = ad["raw_greedy_start"]
        gains = list(s["top_component_gains"].values())
        L.append(
            f"| {ad['family']}/{ad['adapter']} | {s['positive_gains']} | {s['max_gain']:.1e} | "
            + ", ".join(f"{v:.2g}" for v in gains[:3])
            + " | "
            + ", ".join(f"{v:.2g}" for v in gains[3:])
            + " |"
        )
    shown = [b for b in (10, 30, 50) if b in budgets] or budgets[:3]
    L += [
        "",
        "The quadratic model's own objective reached by each optimizer: predicted increase q(P) on the **raw** H, "
        "median over all adapters (a forward greedy that ends orders of magnitude above the sorted rules "
        "and backward elimination has failed at optimisation, not at modelling):",
        "",
        *table_header("optimizer", shown),
    ]
    for m in METHODS + ["backward (raw H)"]:
        cells = []
        for b in shown:
            if m.startswith("backward"):
                vals = [
                    r["predicted_increase"]
                    for ad in adapters
                    for r in ad["backward_elimination_raw_h"]
                    if r["budget"] == b
                ]
            else:
                vals = [cell(by(ad)[(m, b)], "predicted_increase") for ad in adapters]
            cells.append(fmt(statistics.median(vals)))
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += [
        "",
        "Share of the projected objective f̂(N) = q̂(all pruned) that the kept set attains, f̂(S)/f̂(N) (the "
        "(1−1/e) and 1/e guarantees are relative to this scale), min over adapters (and seeds):",
        "",
        *table_header("method", shown),
    ]
    for m in ("sublora", "sublora-random", "diag", "magnitude"):
        cells = []
        for b in shown:
            vals = [r["projected_objective_share"] for ad in adapters for r in by(ad)[(m, b)]]
            cells.append(f"{min(vals):.6f}")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += [
        "",
        f"The randomized greedy on many seeds ({result['meta']['guarantee_seeds']} per adapter and budget, selection "
        "only): share f̂(S)/f̂(N), mean over seeds (min over adapters of that mean) and the worst seed. Its "
        "guarantee for a monotone submodular f̂ is E[f̂(S)] ≥ (1 − 1/e)·f̂(OPT) ≥ 0.632·f̂(S_greedy) ≈ 0.632·f̂(N) "
        "here (f̂(OPT) ≤ f̂(N) for a monotone f̂, and the greedy's share is ≈ 1, table above):",
        "",
        *table_header("", shown),
        "| mean over seeds (worst adapter) | "
        + " | ".join(
            f"{min(ad['random_greedy_projected_share'][str(b)]['mean'] for ad in adapters):.3f}" for b in shown
        )
        + " |",
        "| worst seed | "
        + " | ".join(f"{min(ad['random_greedy_projected_share'][str(b)]['min'] for ad in adapters):.3f}" for b in shown)
        + " |",
    ]
    labels = list(adapters[0]["interactions"]) if adapters else []
    L += [
        "",
        "Measured (and predicted) loss increase when keeping only a few top components, vs keeping none:",
        "",
        *table_header("adapter", labels),
    ]
    for ad in adapters:
        L.append(
            f"| {ad['family']}/{ad['adapter']} | "
            + " | ".join(f"{v['increase']:.2g} ({v['predicted_increase']:.2g})" for v in ad["interactions"].values())
            + " |"
        )
    L += [
        "",
        "Backward elimination on the **raw** H (a diagnostic, not a sublora method: start from the full adapter and "
        "prune the component the quadratic model says costs least, one at a time), rel. error, mean per family:",
        "",
        *table_header("family", budgets),
    ]
    for fam in families:
        group = [ad for ad in adapters if ad["family"] == fam]
        means = []
        for b in budgets:
            vals = [r["rel_l2"] for ad in group for r in ad["backward_elimination_raw_h"] if r["budget"] == b]
            means.append(fmt(statistics.fmean(vals)) if vals else "—")
        L.append(f"| {fam} | " + " | ".join(means) + " |")
    L += [""]
    text = "\n".join(L) + "\n" + DISCUSSION + (keep if keep else "\n\n## Discussion\n\n(not written yet)\n")
    path.write_text(text)


def summarise(adapters: list[dict], budgets: list[int]) -> dict:
    timing = {}
    for m in METHODS:
        rows = [r for ad in adapters for r in ad["rows"] if r["method"] == m]
        per_adapter = [next(r for r in ad["rows"] if r["method"] == m)["curvature_seconds"] for ad in adapters]
        sel = [r["select_seconds"] for r in rows]
        curv = statistics.fmean(per_adapter)
        timing[m] = {
            "curvature": curv,
            "select_mean": statistics.fmean(sel),
            "select_max": max(sel),
            "total": curv + statistics.fmean(sel),
        }
    pairs = [
        ("second-order ≫ linear", "diag", "linear"),
        ("second-order ≫ linear", "sublora", "linear"),
        ("second-order ≫ linear", "hessian", "linear"),
        ("SubLoRA-G ≥ DiagLoRA", "sublora", "diag"),
        ("SubLoRA-G ≈ HessLoRA-G", "sublora", "hessian"),
        ("greedy ≥ randomized greedy", "sublora", "sublora-random"),
        ("(extra) vs magnitude", "sublora", "magnitude"),
        ("(extra) vs magnitude", "diag", "magnitude"),
    ]
    claims = []
    for claim, a, b in pairs:
        for key in ("loss_after", "rel_l2"):
            claims.append({"claim": claim, **compare(adapters, a, b, key, budgets)})
    return {"timing": timing, "claims": claims, "model_accuracy": model_accuracy(adapters)}


def plot(adapters: list[dict], budgets: list[int], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = dict(
        zip(METHODS, ["tab:gray", "tab:orange", "tab:green", "tab:red", "tab:blue", "tab:purple"], strict=True)
    )
    for fam in dict.fromkeys(ad["family"] for ad in adapters):
        group = [ad for ad in adapters if ad["family"] == fam]
        fig, axes = plt.subplots(2, len(group), figsize=(4.2 * len(group), 6.4), squeeze=False)
        for col, ad in enumerate(group):
            rows = by(ad)
            for row, (key, label, before) in enumerate(
                (("loss_after", "training loss", ad["loss_before"]), ("rel_l2", "rel. L2 error", ad["rel_l2_before"]))
            ):
                ax = axes[row][col]
                for m in METHODS:
                    xs = [b for b in budgets if (m, b) in rows]
                    ax.plot(xs, [cell(rows[(m, b)], key) for b in xs], marker="o", ms=3, color=colors[m], label=m)
                    if m == "sublora-random":
                        for b in xs:
                            ax.scatter([b] * len(rows[(m, b)]), [r[key] for r in rows[(m, b)]], s=6, color=colors[m])
                bw = ad["backward_elimination_raw_h"]
                ax.plot(
                    [r["budget"] for r in bw], [r[key] for r in bw], ls=":", color="k", label="raw-H backward elim."
                )
                ax.axhline(before, ls="--", color="grey", lw=0.8, label="before pruning")
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
                ax.set_xlabel("budget (total rank kept of 100)")
                if col == 0:
                    ax.set_ylabel(label)
                if row == 0:
                    ax.set_title(f"{fam}/{ad['adapter']}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{fam}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m in METHODS:
        pts = [(r["increase"], r["predicted_increase"]) for ad in adapters for r in ad["rows"] if r["method"] == m]
        pts = [(x, y) for x, y in pts if x > 0 and y is not None and y > 0]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, color=colors[m], label=m, alpha=0.7)
    lo, hi = 1e-9, 1e2
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured loss increase")
    ax.set_ylabel("predicted by the quadratic model")
    ax.set_title("quadratic model vs measurement, all adapters")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "quadratic_model.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------


def rounded(value):
    """Floats to 6 significant digits for the JSON file (plenty for losses and timings; keeps the file small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES)
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budgets", default="10:90:10", help="list (10,20) or range start:stop:step (stop included)")
    parser.add_argument("--seeds", default="0,1,2", help="sublora-random seeds, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument(
        "--guarantee-seeds", type=int, default=50, help="extra sublora-random seeds for the guarantee check"
    )
    parser.add_argument("--no-time-diag", dest="time_diag", action="store_false", help="skip timing the diagonal")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        parser.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    if ":" in args.budgets:
        start, stop, step = (int(x) for x in args.budgets.split(":"))
        args.budgets = list(range(start, stop + 1, step))
    else:
        args.budgets = sorted({int(x) for x in args.budgets.split(",") if x.strip()})
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adapters = []
    todo = [(f, a) for f in args.families for a in FAMILIES[f]]
    for i, (family, name) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {family}/adapter_{name} ({time.perf_counter() - start:.0f} s elapsed)")
        adapters.append(run_adapter(family, name, args))
    wall = time.perf_counter() - start
    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "dtype": args.dtype,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "budgets": args.budgets,
            "seeds": args.seeds,
            "guarantee_seeds": args.guarantee_seeds,
            "methods": METHODS,
            "wall_seconds": wall,
        },
        "adapters": adapters,
    }
    result["summary"] = summarise(adapters, args.budgets)
    (args.out / "paper_table.json").write_text(json.dumps(rounded(result), indent=1) + "\n")
    write_markdown(result, args.out / "paper_table.md")
    pngs = plot(adapters, args.budgets, args.out)
    log(
        f"done in {wall / 60:.1f} min: {args.out / 'paper_table.json'}, {args.out / 'paper_table.md'}, {len(pngs)} PNGs"
    )


if __name__ == "__main__":
    main()
