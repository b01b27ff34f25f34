"""`sublora sweep`: one curvature computation, then every (budget, method, seed) selection with its predicted
and measured loss, with the kept σ as trained and after the refit (as `prune` writes them). Selections are cheap
next to the curvature, so a whole trade-off curve costs about as much as one `prune`.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sublora_cli.commands.options import (
    CALIB,
    Option,
    SelectionOptions,
    option,
    seed_range,
)
from sublora_cli.core.budget import Budget, BudgetSpec, Pricing, parse_budget, read_budget, resolve_budget
from sublora_cli.core.methods import METHODS, REGISTRY
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import select
from sublora_cli.errors import SubloraError
from sublora_cli.model.curvature import Curvature
from sublora_cli.pipeline.budgeting import adapter_pricing
from sublora_cli.pipeline.calibrate import calibration, measure_before
from sublora_cli.pipeline.choose import rank_bounds
from sublora_cli.pipeline.curvature_choice import check_curvature, timed_curvature
from sublora_cli.pipeline.output import atomic_output_dir, pyplot
from sublora_cli.pipeline.read import load_adapter, output_dir
from sublora_cli.pipeline.report import non_finite_metric_warnings, strict_json
from sublora_cli.pipeline.spectra import svd_form
from sublora_cli.pipeline.timings import Info, Progress, Timings
from sublora_cli.pipeline.written import Finish, written_outcome

SWEEP_CSV, SWEEP_JSON, SWEEP_PNG = "sweep.csv", "sweep.json", "sweep.png"
DEFAULT_METHODS = tuple(m.name for m in REGISTRY.values() if m.in_default_sweep)


@dataclass(frozen=True)
class SweepRow:
    budget: int
    method: str
    seed: int | None  # sublora-random only
    rank_after: int
    predicted_increase: float | None  # from the method's own model of the loss (as prune reports it), else None
    loss_after_selection: float  # measured with the kept σ as trained
    loss_after: float  # measured on the calibration batches with the pruned adapter as `prune` writes it (refit)
    increase: float  # loss_after − loss before
    refit_accepted: bool | None  # None: the refit did not run (--no-refit)
    metrics_after: dict[str, float] | None
    select_seconds: float
    unit: str = "rank"  # what `budget` counts: rank, or bytes / params of the written adapter (carried included)


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


def parse_sizes(text: str) -> tuple[str, list[int]] | None:
    """A bytes or parameters axis, `100KB:1MB:100KB` or `200KB,1MiB` (one unit), as (unit, sorted amounts); None
    for a rank axis (parse_budgets reads those)."""
    raw = str(text).strip()
    range_ = ":" in raw
    items = [item.strip() for item in raw.split(":" if range_ else ",") if item.strip()]
    if not any(item[-1:].isalpha() for item in items):
        return None
    specs = [read_budget(item) for item in items]
    units = {spec.unit for spec in specs}
    if len(units) != 1 or None in units or "rank" in units or (range_ and len(specs) != 3):
        raise SubloraError(
            f"--budgets {raw!r}: a size axis is a list (200KB,1MiB) or a range start:stop:step (100KB:1MB:100KB) "
            "whose every entry is a size in bytes, or every one a parameter count (300k:3M:300k)."
        )
    amounts = [int(spec.value) for spec in specs]
    if range_:
        start, stop, step = amounts
        if stop < start:
            raise SubloraError(f"--budgets {raw!r}: a range needs stop ≥ start.")
        amounts = list(range(start, stop + 1, step))
    return units.pop(), sorted(set(amounts))


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SubloraError(f"--methods {text!r}: choose from {', '.join(METHODS)} (comma-separated).")
    return methods


def budgets_syntax(text: str) -> None:
    """--budgets errors never depend on the adapter's total rank, so any rank checks the syntax."""
    if parse_sizes(text) is None:
        parse_budgets(text, total_rank=1)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0,1,2` → (0, 1, 2); nothing given means seed 0."""
    try:
        seeds = tuple(int(s) for s in str(text).split(",") if s.strip()) or (0,)
    except ValueError:
        raise SubloraError(f"{text!r} is not a comma-separated list of integers.") from None
    for seed in seeds:
        seed_range(seed)
    return seeds


@dataclass(frozen=True, kw_only=True)
class SweepOptions(SelectionOptions):
    """Everything `sublora sweep` can be told (the schema: see options.py): the shared calibration and selection
    groups, with the script required, and the grid of budgets, methods and seeds."""

    calib: Path = option(CALIB)
    budgets: str = option(
        Option(
            ("--budgets",),
            "A list (10,20,40 or 10%,25%) or a range start:stop:step (10:100:10) of ranks; or of sizes of the "
            "written adapter (200KB,1MiB or 100KB:1MB:100KB) or parameter counts (300k:3M:300k).",
            budgets_syntax,
        ),
        "10:90:10",
    )
    methods: tuple[str, ...] = option(
        Option(
            ("--methods",),
            f"Comma-separated, from: {', '.join(METHODS)}.",
            parse=lambda text: tuple(parse_methods(text)),
        ),
        DEFAULT_METHODS,
    )
    seeds: tuple[int, ...] = option(
        Option(("--seeds",), "Seeds of sublora-random, comma-separated.", parse=parse_seeds), (0, 1, 2)
    )
    evaluate: bool = option(
        Option(("--evaluate/--no-evaluate",), "Run the script's evaluate() for every selection."), True
    )


@dataclass
class SweepResult:
    rows: list[SweepRow]
    meta: dict
    written: list[Path]
    warnings: list[str] = field(default_factory=list)


def sweep(
    adapter_path: Path,
    options: SweepOptions,
    out_dir: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    info: Info | None = None,
) -> SweepResult:
    """One curvature computation, then every budget × method measured; writes sweep.csv/json/png."""
    methods = list(options.methods)
    for method in methods:
        check_curvature(method, options.curvature)
    timings = Timings()
    adapter = load_adapter(adapter_path, timings)
    pricing = adapter_pricing(adapter)
    unit, budgets = parse_sizes(options.budgets) or ("rank", parse_budgets(options.budgets, adapter.total_rank))
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    out_dir = output_dir(adapter_path, out_dir, "sweep", overwrite, {"the calibration script": options.calib})
    spectra = svd_form(adapter, timings)
    with calibration(options, adapter, spectra, timings, progress) as calibrated:
        loss_before, metrics_before = measure_before(calibrated, timings, options.evaluate)
        curvature, reason = timed_curvature(
            calibrated, options.curvature, methods, options.max_hessian_gb, timings, info, progress, options.refit
        )
        with timings.stage("sweep"):
            rows = run_sweep(
                written_outcome(calibrated, adapter, spectra, curvature, options.refit, options.evaluate),
                torch.cat([s.sigma for s in spectra]),
                curvature,
                bounds,
                budgets,
                methods,
                list(options.seeds),
                loss_before,
                progress=progress,
                pricing=pricing,
                unit=unit,
            )
    meta = {
        "adapter": str(adapter_path),
        "sha256": adapter.sha256,
        "calib": str(options.calib),
        "curvature": curvature.kind if curvature is not None else None,
        "curvature_reason": reason,
        "curvature_notes": curvature.notes_for(methods) if curvature is not None else [],
        "total_rank": adapter.total_rank,
        "budgets": budgets,
        "budget_unit": unit,
        "methods": methods,
        "seeds": list(options.seeds),
        "loss_before": loss_before,
        "metrics_before": metrics_before,
        "timings": timings,
    }
    with atomic_output_dir(out_dir) as tmp:
        names = [p.name for p in write_sweep(rows, meta, tmp)]
    written = [out_dir / name for name in names]
    diverged = {k: v for r in rows for k, v in (r.metrics_after or {}).items() if not math.isfinite(v)}
    warnings = non_finite_metric_warnings(metrics_before, "before pruning") + non_finite_metric_warnings(
        diverged, "after pruning in some selections"
    )
    return SweepResult(rows=rows, meta=meta, written=written, warnings=meta["curvature_notes"] + warnings)


def run_sweep(
    finish: Finish,
    sigma: torch.Tensor,
    curvature: Curvature | None,
    bounds: RankBounds,
    budgets: list[int],
    methods: list[str],
    seeds: list[int],
    loss_before: float,
    progress: Callable[[str, int, int], None] | None = None,
    pricing: Pricing | None = None,
    unit: str = "rank",
) -> list[SweepRow]:
    """Every budget × method (× seed for sublora-random), each kept set refit and measured by `finish` (as written).

    `sigma` is the float64 σ of the SVD form (as `prune` selects on), not the model-dtype copy; `curvature` is
    None when every method is data-free. The predicted increase is the selection's own, as in `prune`.
    """
    if curvature is not None:
        for method in methods:
            check_curvature(method, curvature.kind)
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
                allowance = Budget.ranks(budget, sigma.numel()) if unit == "rank" else _sized(budget, unit, pricing)
                selection = select(method, sigma, allowance, bounds, seed=seed or 0, **inputs)
            except ValueError as e:
                raise SubloraError(f"{method} at budget {budget}: {e}") from e
            seconds = time.perf_counter() - start
            written = finish(selection.kept)
            rows.append(
                SweepRow(
                    budget=budget,
                    method=method,
                    seed=seed,
                    rank_after=int(selection.kept.sum()),
                    predicted_increase=selection.predicted_increase,
                    loss_after_selection=written.loss_after_selection,
                    loss_after=written.loss_after,
                    increase=written.loss_after - loss_before,
                    refit_accepted=None if written.refit is None else written.refit.accepted,
                    metrics_after=written.metrics,
                    select_seconds=seconds,
                    unit=unit,
                )
            )
            done += 1
            if progress:
                progress("sweep", done, total)
    return rows


def _sized(amount: int, unit: str, pricing: Pricing) -> Budget:
    """A bytes or parameters budget for the whole written adapter, capped at all of it."""
    budget = resolve_budget(BudgetSpec(unit, amount), unit, pricing)
    return replace(budget, capacity=min(budget.capacity, float(budget.cost.sum())))


def write_sweep(rows: list[SweepRow], meta: dict, out_dir: Path) -> list[Path]:
    """sweep.csv (one row per selection), sweep.json (meta + rows) and, with matplotlib, sweep.png."""
    metric_names = sorted({k for r in rows for k in (r.metrics_after or {})})
    with open(out_dir / SWEEP_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["budget", "method", "seed", "rank_after", "predicted_increase", "loss_after_selection", "loss_after"]
            + ["increase", "refit_accepted"]
            + [f"{m}_after" for m in metric_names]
            + ["select_seconds"]
        )
        for r in rows:
            writer.writerow(
                [r.budget, r.method, "" if r.seed is None else r.seed, r.rank_after, _num(r.predicted_increase)]
                + [_num(r.loss_after_selection), _num(r.loss_after), _num(r.increase)]
                + ["" if r.refit_accepted is None else r.refit_accepted]
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _log_plottable(value: float | None) -> bool:
    """A value a log axis can show (a metric that is NaN, Inf or ≤ 0 everywhere gets no panel)."""
    return value is not None and math.isfinite(value) and value > 0


def plot_sweep(rows: list[SweepRow], meta: dict, path: Path, metric_names: list[str]) -> bool:
    """Measured loss (and the first evaluate() metric) vs budget, one line per method (dotted: the loss before the
    refit); False without matplotlib."""
    plt = pyplot()
    if plt is None:
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
            line = ax.plot(budgets, [_mean(by_budget[b]) for b in budgets], marker="o", label=method)[0]
            selected = [r for r in rows if r.method == method and r.refit_accepted is not None]
            if key == "loss_after" and selected:  # the same kept sets with the σ as trained: what the refit buys
                trained = {b: _mean([r.loss_after_selection for r in selected if r.budget == b]) for b in budgets}
                label = f"{method}, no refit"
                ax.plot(budgets, [trained[b] for b in budgets], ls=":", color=line.get_color(), label=label)
        ax.axhline(
            meta["loss_before"] if key == "loss_after" else (meta.get("metrics_before") or {}).get(key, math.nan),
            ls="--",
            color="grey",
            label="before pruning",
        )
        unit = rows[0].unit if rows else "rank"
        ax.set_xlabel("budget (total rank kept)" if unit == "rank" else f"size of the written adapter ({unit})")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{Path(meta['adapter']).name}: curvature {meta['curvature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
