"""`sublora sweep`: one curvature computation, then every (budget, method, seed) selection with its predicted
and measured loss, with the kept σ as trained and after the refit (as `prune` writes them). Selections are cheap
next to the curvature, so a whole trade-off curve costs about as much as one `prune`.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sublora_cli.commands.options import (
    CALIB,
    Option,
    SelectionOptions,
    option,
    seed_range,
)
from sublora_cli.commands.sweep_plot import plot_sweep
from sublora_cli.core.budget import UNIT_TABLE, Budget, Pricing, budget_unit, in_unit, read_budget_axis, stated_unit
from sublora_cli.core.methods import METHODS, REGISTRY
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.refit import DAMPINGS, MAX_EVALUATIONS
from sublora_cli.core.select import select
from sublora_cli.errors import SubloraError
from sublora_cli.model.curvature import Curvature
from sublora_cli.pipeline.budgeting import adapter_pricing, allowance_for, in_folder_name
from sublora_cli.pipeline.calibrate import calibration, heldout_before
from sublora_cli.pipeline.choose import rank_bounds, refuse_unselectable
from sublora_cli.pipeline.curvature_choice import check_curvature, timed_curvature
from sublora_cli.pipeline.output import atomic_output_dir
from sublora_cli.pipeline.read import in_dtype, load_adapter, output_dir
from sublora_cli.pipeline.report import non_finite_metric_warnings, strict_json
from sublora_cli.pipeline.spectra import svd_form
from sublora_cli.pipeline.timings import Info, Progress, Timings, duration
from sublora_cli.pipeline.written import Finish, written_outcome

SWEEP_CSV, SWEEP_JSON, SWEEP_PNG = "sweep.csv", "sweep.json", "sweep.png"
DEFAULT_METHODS = tuple(m.name for m in REGISTRY.values() if m.in_default_sweep)


@dataclass(frozen=True)
class SweepRow:
    budget: int | float  # the kept count (ranks), else the written adapter's size (carried tensors included)
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
    heldout_after: float | None = None  # the held-out loss as written (None without held-out batches)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SubloraError(f"--methods {text!r}: choose from {', '.join(METHODS)} (comma-separated).")
    return methods


def budgets_syntax(text: str) -> None:
    """--budgets errors never depend on the adapter, so the syntax is checked with the flags."""
    read_budget_axis(text)


def budget_axis(text: str, unit_flag: str | None, pricing: Pricing) -> tuple[str, list[tuple[int | float, Budget]]]:
    """The sweep's budgets, each resolved exactly as `prune --budget` resolves it (pipeline/budgeting.py), as
    (unit, [(what the row reports, the Budget)]): the row's figure is the kept count for whole units (ranks), else
    the size of the written adapter, carried tensors included, capped at the whole adapter; duplicates after the
    cap are measured once."""
    specs = read_budget_axis(text)
    units = {budget_unit(spec, unit_flag) for spec in specs}
    if len(units) != 1:
        raise SubloraError(f"--budgets {text!r} mixes {' and '.join(sorted(units))}: a sweep's axis has one unit.")
    unit = units.pop()
    axis: dict[int | float, Budget] = {}
    for spec in specs:
        allowance, _ = allowance_for(spec, unit, pricing)
        figure = int(allowance.capacity) if UNIT_TABLE[unit].whole else allowance.capacity + pricing.fixed(unit)
        axis.setdefault(figure, allowance)
    return unit, sorted(axis.items(), key=lambda item: item[0])


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
    adapter = in_dtype(load_adapter(adapter_path, timings), options.dtype_out)
    pricing = adapter_pricing(adapter)
    unit, axis = budget_axis(options.budgets, options.budget_unit, pricing)
    first = options.budgets.replace(":", ",").split(",")[0]
    shown_in = stated_unit(first) if unit != "rank" else None
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    for budget, allowance in axis:
        for method in methods:
            where = f"--methods {method} at budget {budget if shown_in is None else in_unit(budget, shown_in)}: "
            refuse_unselectable(method, allowance, bounds, where)
    reads = {"the calibration script": options.calib}
    out_dir = output_dir(adapter_path, out_dir, f"sweep-{in_folder_name(options.budgets)}", overwrite, reads)
    spectra = svd_form(adapter, timings)
    with calibration(options, adapter, spectra, timings, progress) as calibrated:
        with timings.stage("eval"):
            loss_seconds, loss_before = _timed(calibrated.loss)
            metrics_seconds, metrics_before = _timed(calibrated.metrics) if options.evaluate else (0.0, None)
        count = len(axis) * sum(len(options.seeds) if m == "sublora-random" else 1 for m in methods)
        estimate = SweepEstimate(count, loss_seconds, metrics_seconds, options.refit, info)
        heldout_loss_before = heldout_before(calibrated, timings)
        if info is not None:
            info(calibrated.holdout_note)
        curvature, reason = timed_curvature(
            calibrated, options.curvature, methods, options.max_hessian_gb, timings, info, progress, options.refit,
            estimated=estimate,
        )  # fmt: skip
        if not estimate.told:  # no curvature was computed: the selections are all there is
            estimate(0.0)
        with timings.stage("sweep"):
            rows = run_sweep(
                written_outcome(calibrated, adapter, spectra, curvature, options.refit, options.evaluate),
                torch.cat([s.sigma for s in spectra]),
                curvature,
                bounds,
                axis,
                methods,
                list(options.seeds),
                loss_before,
                progress=progress,
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
        "budgets": [figure for figure, _ in axis],
        "budget_unit": unit,
        "budget_shown_in": shown_in,  # the unit the user wrote the sizes in (KB, MiB, M), None for ranks
        "methods": methods,
        "seeds": list(options.seeds),
        "loss_before": loss_before,
        "heldout_before": heldout_loss_before,
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
    warnings += _whole_adapter_budgets(rows, adapter.total_rank, shown_in)
    return SweepResult(rows=rows, meta=meta, written=written, warnings=meta["curvature_notes"] + warnings)


@dataclass
class SweepEstimate:
    """Says up front how long the whole sweep takes: the curvature's estimate plus every selection measured as
    written, each costing what measuring the adapter before took (its loss, its evaluate()) plus the refit's loss
    evaluations (one per damping when its first step is accepted, at most refit.MAX_EVALUATIONS)."""

    count: int  # selections: budgets × methods (× seeds of sublora-random)
    loss_seconds: float  # one loss evaluation over the calibration batches (the adapter before pruning)
    metrics_seconds: float  # its evaluate() (0 with --no-evaluate)
    refit: bool
    info: Info | None
    told: bool = False

    def __call__(self, curvature_seconds: float) -> None:
        self.told = True
        if self.info is None:
            return
        refits = (len(DAMPINGS), MAX_EVALUATIONS) if self.refit else (0, 0)
        each = [self.metrics_seconds + self.loss_seconds * (1 + n) for n in refits]
        low, high = (curvature_seconds + self.count * seconds for seconds in each)
        what = "its loss" + (", the refit's losses" if self.refit else "")
        what += ", evaluate()" if self.metrics_seconds else ""
        span = duration(low) if low == high else f"{duration(low)} to {duration(high)}"
        self.info(f"sweep: {self.count} selections, each measured as written ({what}): about {span} in all")


def _timed(measure: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = measure()
    return time.perf_counter() - start, value


def _whole_adapter_budgets(rows: list[SweepRow], total_rank: int, shown_in: str | None) -> list[str]:
    """Say which budgets reach the whole adapter (a rank above it is read as all of it): those rows prune nothing."""
    whole = sorted({r.budget for r in rows if r.rank_after == total_rank})
    if not whole:
        return []
    listed = ", ".join(str(b) if shown_in is None else in_unit(b, shown_in) for b in whole)
    return [f"--budgets {listed}: at least the whole adapter (total rank {total_rank}), so nothing is pruned there."]


def run_sweep(
    finish: Finish,
    sigma: torch.Tensor,
    curvature: Curvature | None,
    bounds: RankBounds,
    axis: list[tuple[int | float, Budget]],
    methods: list[str],
    seeds: list[int],
    loss_before: float,
    progress: Callable[[str, int, int], None] | None = None,
    unit: str = "rank",
) -> list[SweepRow]:
    """Every budget × method (× seed for sublora-random), each kept set refit and measured by `finish` (as written).
    `axis`: (the row's budget figure, the Budget it spends), as `budget_axis` resolves them.

    `sigma` is the float64 σ of the SVD form (as `prune` selects on), not the model-dtype copy; `curvature` is
    None when every method is data-free. The predicted increase is the selection's own, as in `prune`.
    """
    if curvature is not None:
        for method in methods:
            check_curvature(method, curvature.kind)
    runs = [
        (m, s if m == "sublora-random" else None) for m in methods for s in (seeds if m == "sublora-random" else [0])
    ]
    total, done = len(axis) * len(runs), 0
    rows = []
    for budget, allowance in axis:
        for method, seed in runs:
            start = time.perf_counter()
            try:
                inputs = curvature.selection_inputs(method) if curvature is not None else {}
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
                    heldout_after=written.heldout_after,
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
            ["budget", "method", "seed", "rank_after", "predicted_increase", "loss_after_selection", "loss_after"]
            + ["increase", "refit_accepted", "heldout_after"]
            + [f"{m}_after" for m in metric_names]
            + ["select_seconds"]
        )
        for r in rows:
            writer.writerow(
                [r.budget, r.method, "" if r.seed is None else r.seed, r.rank_after, _num(r.predicted_increase)]
                + [_num(r.loss_after_selection), _num(r.loss_after), _num(r.increase)]
                + ["" if r.refit_accepted is None else r.refit_accepted, _num(r.heldout_after)]
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
