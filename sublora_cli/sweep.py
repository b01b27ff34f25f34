"""`sublora sweep`: one curvature computation, then every (budget, method, seed) selection with its predicted
and measured loss. Selections are cheap next to the curvature, so a whole trade-off curve costs about as
much as one `prune`.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sublora_cli.budget import Budget, parse_budget
from sublora_cli.calibrated import Calibrated
from sublora_cli.curvature import Curvature
from sublora_cli.errors import SubloraError
from sublora_cli.methods import METHODS, REGISTRY
from sublora_cli.report import strict_json
from sublora_cli.select import RankBounds, select

SWEEP_CSV, SWEEP_JSON, SWEEP_PNG = "sweep.csv", "sweep.json", "sweep.png"
DEFAULT_METHODS = tuple(m.name for m in REGISTRY.values() if m.in_default_sweep)


@dataclass(frozen=True)
class SweepRow:
    budget: int
    method: str
    seed: int | None  # sublora-random only
    rank_after: int
    predicted_increase: float | None  # from the method's own model of the loss (as prune reports it), else None
    loss_after: float  # measured on the calibration batches with the pruned σ
    increase: float  # loss_after − loss before
    metrics_after: dict[str, float] | None
    select_seconds: float


def parse_budgets(text: str, total_rank: int) -> list[int]:
    """`10,20,40`, `25%,50%` or a range `start:stop:step` (stop included) → sorted distinct budgets."""
    raw = str(text).strip()
    if ":" in raw:
        parts = raw.split(":")
        try:
            start, stop, step = (int(p) for p in parts) if len(parts) == 3 else (None, None, None)
        except ValueError:
            start = None
        if start is None or step <= 0 or start <= 0 or stop < start:
            raise SubloraError(
                f"--budgets {raw!r}: a range is start:stop:step with positive whole numbers and stop ≥ start, "
                "e.g. 10:100:10."
            )
        budgets = list(range(start, stop + 1, step))
    else:
        items = [item for item in raw.split(",") if item.strip()]
        if not items:
            raise SubloraError(f"--budgets {raw!r}: give a list (10,20,40) or a range (10:100:10).")
        budgets = [parse_budget(item, total_rank) for item in items]
    return sorted({min(b, total_rank) for b in budgets})


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SubloraError(f"--methods {text!r}: choose from {', '.join(METHODS)} (comma-separated).")
    return methods


def run_sweep(
    calibrated: Calibrated,
    sigma: torch.Tensor,
    curvature: Curvature | None,
    bounds: RankBounds,
    budgets: list[int],
    methods: list[str],
    seeds: list[int],
    loss_before: float,
    evaluate: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SweepRow]:
    """Every budget × method (× seed for sublora-random), measured on the re-parametrised model.

    `sigma` is the float64 σ of the SVD form (as `prune` selects on), not the model-dtype copy; `curvature` is
    None when every method is data-free. The predicted increase is the selection's own, as in `prune`.
    """
    if curvature is not None and curvature.hessian is None:
        needing = [m for m in methods if REGISTRY[m].needs == "matrix"]
        if needing:
            raise SubloraError(
                f"--curvature {curvature.kind} gives no full Hessian, which {', '.join(needing)} need; "
                "use --curvature exact (or fisher) or drop those methods."
            )
    runs = [
        (m, s if m == "sublora-random" else None) for m in methods for s in (seeds if m == "sublora-random" else [0])
    ]
    total, done = len(budgets) * len(runs), 0
    rows = []
    for budget in budgets:
        for method, seed in runs:
            start = time.perf_counter()
            try:
                inputs = curvature.selection_inputs(method) if curvature is not None else {}
                allowance = Budget.ranks(budget, sigma.numel())
                selection = select(method, sigma, allowance, bounds, seed=seed or 0, **inputs)
            except ValueError as e:
                raise SubloraError(f"{method} at budget {budget}: {e}") from e
            seconds = time.perf_counter() - start
            loss_after = calibrated.loss(selection.kept)
            rows.append(
                SweepRow(
                    budget=budget,
                    method=method,
                    seed=seed,
                    rank_after=int(selection.kept.sum()),
                    predicted_increase=selection.predicted_increase,
                    loss_after=loss_after,
                    increase=loss_after - loss_before,
                    metrics_after=calibrated.metrics(selection.kept) if evaluate else None,
                    select_seconds=seconds,
                )
            )
            done += 1
            if progress:
                progress("sweep", done, total)
    return rows


def write_sweep(rows: list[SweepRow], meta: dict, out_dir: Path) -> list[Path]:
    """sweep.csv (one row per selection), sweep.json (meta + rows) and, with matplotlib, sweep.png."""
    metric_names = sorted({k for r in rows for k in (r.metrics_after or {})})
    with open(out_dir / SWEEP_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["budget", "method", "seed", "rank_after", "predicted_increase", "loss_after", "increase"]
            + [f"{m}_after" for m in metric_names]
            + ["select_seconds"]
        )
        for r in rows:
            writer.writerow(
                [r.budget, r.method, "" if r.seed is None else r.seed, r.rank_after, _num(r.predicted_increase)]
                + [_num(r.loss_after), _num(r.increase)]
                + [_num((r.metrics_after or {}).get(m)) for m in metric_names]
                + [f"{r.select_seconds:.6f}"]
            )
    (out_dir / SWEEP_JSON).write_text(strict_json({**meta, "rows": [asdict(r) for r in rows]}) + "\n")
    written = [out_dir / SWEEP_CSV, out_dir / SWEEP_JSON]
    if plot_sweep(rows, meta, out_dir / SWEEP_PNG, metric_names):
        written.append(out_dir / SWEEP_PNG)
    return written


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _log_plottable(value: float | None) -> bool:
    """A value a log axis can show (a metric that is NaN, Inf or ≤ 0 everywhere gets no panel)."""
    return value is not None and math.isfinite(value) and value > 0


def plot_sweep(rows: list[SweepRow], meta: dict, path: Path, metric_names: list[str]) -> bool:
    """Measured loss (and the first evaluate() metric) vs budget, one line per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    plottable = [m for m in metric_names if any(_log_plottable((r.metrics_after or {}).get(m)) for r in rows)]
    panels = [("loss_after", "calibration loss after pruning")] + [(m, m) for m in plottable[:1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for method in dict.fromkeys(r.method for r in rows):
            by_budget: dict[int, list[float]] = {}
            for r in rows:
                if r.method == method:
                    value = r.loss_after if key == "loss_after" else (r.metrics_after or {}).get(key, math.nan)
                    by_budget.setdefault(r.budget, []).append(value)
            budgets = sorted(by_budget)
            ax.plot(budgets, [sum(by_budget[b]) / len(by_budget[b]) for b in budgets], marker="o", label=method)
        ax.axhline(
            meta["loss_before"] if key == "loss_after" else (meta.get("metrics_before") or {}).get(key, math.nan),
            ls="--",
            color="grey",
            label="before pruning",
        )
        ax.set_xlabel("budget (total rank kept)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{Path(meta['adapter']).name}: curvature {meta['curvature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
