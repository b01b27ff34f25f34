"""The pipelines behind `prune`, `eval` and `sweep`:
read adapter → SVD form → (calibration → curvature) → select → write + report.

Each stage is a call into its own module; this file only wires them together and times them, so every
figure in the report can be traced to the stage that produced it (loss and metrics: calibrated.py;
curvature: curvature.py; kept sets, predicted increase and diagnostics: select.py; totals: report.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sublora_cli.adapters import Adapter, PrunedModule, read_adapter, write_adapter
from sublora_cli.budget import parse_budget, parse_tolerance
from sublora_cli.calibrated import Calibrated, open_calibration
from sublora_cli.calibration import DEFAULT_MAX_BATCHES
from sublora_cli.curvature import AUTO, Curvature, estimate_cost, resolve_kind
from sublora_cli.errors import SubloraError
from sublora_cli.output import atomic_output_dir, check_output_dir
from sublora_cli.report import build_report, non_finite_metric_warnings, provenance, write_reports
from sublora_cli.select import NEEDS_CALIBRATION, NEEDS_FULL_HESSIAN, RankBounds, Selection, select
from sublora_cli.spectra import adapter_spectra, stored_spectra
from sublora_cli.svd import Spectrum
from sublora_cli.sweep import SweepRow, parse_budgets, run_sweep, write_sweep

Progress = Callable[[str, int, int | None], None]  # (stage, done, total); total None: not known yet
Info = Callable[[str], None]  # one line of news for the user


@dataclass(frozen=True)
class PruneOptions:
    """Everything `sublora prune` can be told, by flags or by --config."""

    budget: str
    method: str | None = None  # None: "sublora" with a calibration script, "magnitude" without
    calib: Path | None = None
    curvature: str = AUTO
    min_rank: int = 0
    max_rank: int | None = None
    seed: int = 0
    max_loss_increase: str | None = None  # "0.05" or "5%", relative to the loss before pruning
    max_hessian_gb: float = 4.0
    max_batches: int = DEFAULT_MAX_BATCHES
    device: str = "cpu"
    dtype: str = "float32"

    def resolved_method(self) -> str:
        if self.method is not None:
            return self.method
        return "sublora" if self.calib is not None else "magnitude"


@dataclass
class PruneResult:
    report: dict
    out_dir: Path
    warnings: list[str] = field(default_factory=list)
    quality_failure: str | None = None  # set when --max-loss-increase was exceeded (the output is written)


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def default_out_dir(adapter_path: Path, suffix: str) -> Path:
    """A sibling of the input named after it (a single file without its extension), so the input directory is
    never written into."""
    path = adapter_path.resolve()
    return path.parent / f"{path.stem if path.is_file() else path.name}-{suffix}"


def rank_bounds(adapter: Adapter, min_rank: int, max_rank: int | None) -> RankBounds:
    if min_rank < 0:
        raise SubloraError(f"--min-rank {min_rank}: must be 0 or more.")
    if max_rank is not None and max_rank < max(min_rank, 0):
        raise SubloraError(f"--max-rank {max_rank} is below --min-rank {min_rank}.")
    if max_rank == 0:
        raise SubloraError(
            "--max-rank 0 leaves no component in any module: the pruned adapter would be empty, which peft cannot "
            "load. Use --max-rank 1 or more."
        )
    return RankBounds.from_ranks([m.rank for m in adapter.modules], min_rank=min_rank, max_rank=max_rank)


def pruned_modules(adapter: Adapter, spectra: list[Spectrum], kept_mask: torch.Tensor) -> list[PrunedModule]:
    """Split the global kept mask into modules, each with its kept spectrum (the format's writer factors it)."""
    result = []
    offset = 0
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        kept = torch.nonzero(kept_mask[offset : offset + module.rank]).flatten().tolist()
        offset += module.rank
        result.append(PrunedModule.keeping(module, spectrum, kept))
    return result


def _check_method(method: str, calib: Path | None, curvature: str) -> None:
    if method in NEEDS_CALIBRATION and calib is None:
        raise SubloraError(f"--method {method} needs a calibration script (--calib calib.py); magnitude does not.")
    if calib is not None and method not in NEEDS_CALIBRATION:
        raise SubloraError(f"--method {method} is data-free; drop --calib or choose a calibrated method.")
    _check_curvature(method, curvature)


def _check_curvature(method: str, curvature: str) -> None:
    if method in NEEDS_FULL_HESSIAN and curvature == "diag":
        raise SubloraError(
            f"--method {method} needs the full Hessian but --curvature diag computes only its diagonal; "
            "use --curvature exact, or --method diag / linear."
        )


def _announce_curvature(calibrated: Calibrated, kind: str, requested: str, reason: str, info: Info | None) -> None:
    """Say up front which curvature is computed, why, and what it will cost, before minutes of work start."""
    if info is None:
        return
    R, n = calibrated.sigma_model.size, len(calibrated.batches)
    cost = estimate_cost(R, n, kind, calibrated.steady_loss_seconds(kind))
    hvps, passes = cost["hvps"], cost["passes"]
    work = f"{hvps:,} Hessian-vector products" if hvps else f"{passes:,} forward+backward passes"
    info(
        f"curvature {kind}: {work} (R = {R}, {n} batches), {cost['hessian_bytes'] / 2**20:.1f} MiB for the matrix, "
        f"about {_duration(cost['seconds'])} (estimated from the loss evaluation; typically within 2×)"
    )
    if requested == AUTO:
        info(f"  chosen by --curvature auto: {reason}")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 0.1):.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _curvature(
    calibrated: Calibrated,
    requested: str,
    methods: list[str],
    max_hessian_gb: float,
    info: Info | None,
    progress: Progress | None,
) -> tuple[Curvature, str]:
    """The curvature `methods` need (resolving `auto`), with the reason for its kind."""
    kind, reason = resolve_kind(requested, calibrated.sigma_model.size, len(calibrated.batches), methods)
    _announce_curvature(calibrated, kind, requested, reason, info)
    return calibrated.curvature(kind, max_hessian_gb, progress), reason


def _select(method: str, sigma: torch.Tensor, budget: int, bounds: RankBounds, curvature: Curvature | None, seed: int):
    inputs = curvature.selection_inputs(method) if curvature is not None else {}
    try:
        selection = select(method, sigma, budget, bounds, seed=seed, **inputs)
    except ValueError as e:
        raise SubloraError(f"{e}.") from e
    _check_not_empty(selection, method)
    return selection


def _check_not_empty(selection: Selection, method: str) -> None:
    """An adapter with no component left is one peft cannot load: refuse it rather than write it."""
    if not bool(selection.kept.any()):
        raise SubloraError(
            f"--method {method} kept no component at all (its model predicts that every component increases the "
            "loss): the pruned adapter would be empty, which peft cannot load. Raise --min-rank to 1 to keep "
            "at least one component per module, or choose another --method."
        )


def _shortfall(selection: Selection, budget: int, method: str) -> list[str]:
    """A warning when fewer components are kept than the budget allows, so a smaller file is not a surprise."""
    kept = int(selection.kept.sum())
    if kept >= budget:
        return []
    why = {
        "sublora-random": "the randomized greedy picks a zero-gain 'dummy' in a step when that is among its draws "
        "(by design, for its guarantee on non-monotone objectives); use --method sublora for the full budget",
        "exhaustive": "a smaller set has a lower predicted loss under the quadratic model",
    }.get(method, "--max-rank caps the modules below it")
    return [f"{method} kept {kept} of the {budget} components the budget allows: {why}."]


def prune(
    adapter_path: Path,
    options: PruneOptions,
    out_dir: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    info: Info | None = None,
) -> PruneResult:
    method = options.resolved_method()
    _check_method(method, options.calib, options.curvature)
    threshold = None
    if options.max_loss_increase is not None:
        if options.calib is None:
            raise SubloraError("--max-loss-increase needs --calib: without data there is no loss to measure.")
        threshold = parse_tolerance(options.max_loss_increase, "--max-loss-increase")
    timings = Timings()
    warnings: list[str] = []

    with timings.stage("load"):
        adapter = read_adapter(adapter_path)
    budget = parse_budget(options.budget, adapter.total_rank)
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    out_dir = out_dir if out_dir is not None else default_out_dir(adapter_path, f"pruned-{budget}")
    check_output_dir(out_dir, adapter_path, overwrite)
    if budget >= adapter.total_rank:
        warnings.append(
            f"--budget {options.budget} resolves to {budget}, at least the adapter's total rank "
            f"{adapter.total_rank}: nothing to prune, the adapter is written unchanged."
        )
    budget = min(budget, adapter.total_rank)

    with timings.stage("svd"):
        spectra = adapter_spectra(adapter)
    sigma = torch.cat([s.sigma for s in spectra])

    curvature = loss = metrics = reason = None
    if options.calib is None:
        with timings.stage("select"):
            selection: Selection = _select(method, sigma, budget, bounds, None, options.seed)
        warnings.extend(_shortfall(selection, budget, method))
        pruned = pruned_modules(adapter, spectra, selection.kept)
    else:
        with timings.stage("calibrate"):
            calibrated = open_calibration(
                options.calib, adapter, spectra, options.device, options.dtype, options.max_batches, progress
            )
        try:
            with timings.stage("eval"):
                loss_before = calibrated.loss()
                metrics_before = calibrated.metrics()
            with timings.stage("curvature"):
                curvature, reason = _curvature(
                    calibrated, options.curvature, [method], options.max_hessian_gb, info, progress
                )
            warnings.extend(curvature.notes_for([method]))
            with timings.stage("select"):
                selection = _select(method, sigma, budget, bounds, curvature, options.seed)
            warnings.extend(_shortfall(selection, budget, method))
            pruned = pruned_modules(adapter, spectra, selection.kept)
            with timings.stage("eval"):
                written = stored_spectra(adapter, pruned)
                loss_after, metrics_after = calibrated.loss_of(written), calibrated.metrics_of(written)
        finally:
            calibrated.close()
        loss = loss_summary(loss_before, loss_after, selection.predicted_increase)
        metrics = {"before": metrics_before, "after": metrics_after} if metrics_before is not None else None
        warnings.extend(non_finite_metric_warnings(metrics_before, "before pruning"))
        warnings.extend(non_finite_metric_warnings(metrics_after, "after pruning"))

    quality = None
    if threshold is not None:
        passed = loss["relative_increase"] <= threshold
        quality = {"max_loss_increase": str(options.max_loss_increase), "threshold": threshold, "passed": passed}
    report = build_report(
        adapter=adapter,
        spectra=spectra,
        pruned=pruned,
        method=method,
        curvature=curvature.kind if curvature is not None else None,
        budget_requested=options.budget,
        budget_resolved=budget,
        bounds={"min_rank": options.min_rank, "max_rank": options.max_rank},
        selection=selection,
        seed=options.seed,
        timings=timings,
        loss=loss,
        metrics=metrics,
        calibration=_calibration_info(options, curvature, reason),
        quality=quality,
    )
    with atomic_output_dir(out_dir) as tmp:
        with timings.stage("write"):
            write_adapter(adapter, pruned, tmp, provenance(report))
        write_reports(report, tmp)
    failure = None
    if quality is not None and not quality["passed"]:
        failure = (
            f"the measured loss increase {loss['relative_increase']:.2%} (loss {loss['before']:.6g} → "
            f"{loss['after']:.6g}) exceeds --max-loss-increase {options.max_loss_increase}; the pruned adapter "
            f"and report were written to {out_dir} anyway."
        )
    return PruneResult(report=report, out_dir=out_dir, warnings=warnings, quality_failure=failure)


def loss_summary(before: float, after: float, predicted: float | None) -> dict:
    """Loss before/after with the measured and predicted increases (relative to |before|, 0 → inf-safe)."""
    increase = after - before
    relative = increase / abs(before) if before != 0 else (0.0 if increase == 0 else float("inf"))
    return {
        "before": before,
        "after": after,
        "predicted_increase": predicted,
        "increase": increase,
        "relative_increase": relative,
    }


def _calibration_info(options: PruneOptions, curvature: Curvature | None, reason: str | None) -> dict | None:
    if options.calib is None:
        return None
    return {
        "script": str(options.calib),
        "batches": curvature.n_batches if curvature is not None else None,
        "samples": curvature.n_samples or None if curvature is not None else None,
        "device": options.device,
        "dtype": options.dtype,
        "curvature_requested": options.curvature,
        "curvature_reason": reason,
        "curvature_strategy": curvature.strategy if curvature is not None else None,
        "curvature_notes": curvature.notes_for([options.resolved_method()]) if curvature is not None else [],
    }


def evaluate_adapter(
    adapter_path: Path,
    calib: Path,
    device: str = "cpu",
    dtype: str = "float32",
    max_batches: int = DEFAULT_MAX_BATCHES,
    progress: Progress | None = None,
) -> dict:
    """`sublora eval`: the calibration loss and evaluate() metrics of an adapter as it is."""
    adapter = read_adapter(adapter_path)
    calibrated = open_calibration(calib, adapter, adapter_spectra(adapter), device, dtype, max_batches, progress)
    try:
        return {
            "adapter": str(adapter_path),
            "calib": str(calib),
            "total_rank": adapter.total_rank,
            "batches": len(calibrated.batches),
            "loss": calibrated.loss(),
            "metrics": calibrated.metrics(),
        }
    finally:
        calibrated.close()


@dataclass(frozen=True)
class SweepOptions:
    budgets: str
    methods: list[str]
    seeds: list[int]
    calib: Path
    curvature: str = AUTO
    min_rank: int = 0
    max_rank: int | None = None
    max_hessian_gb: float = 4.0
    max_batches: int = DEFAULT_MAX_BATCHES
    device: str = "cpu"
    dtype: str = "float32"
    evaluate: bool = True


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
    for method in options.methods:
        _check_curvature(method, options.curvature)
    timings = Timings()
    with timings.stage("load"):
        adapter = read_adapter(adapter_path)
    budgets = parse_budgets(options.budgets, adapter.total_rank)
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    out_dir = out_dir if out_dir is not None else default_out_dir(adapter_path, "sweep")
    check_output_dir(out_dir, adapter_path, overwrite)
    with timings.stage("svd"):
        spectra = adapter_spectra(adapter)
    with timings.stage("calibrate"):
        calibrated = open_calibration(
            options.calib, adapter, spectra, options.device, options.dtype, options.max_batches, progress
        )
    try:
        with timings.stage("eval"):
            loss_before = calibrated.loss()
            metrics_before = calibrated.metrics() if options.evaluate else None
        with timings.stage("curvature"):
            curvature, reason = _curvature(
                calibrated, options.curvature, options.methods, options.max_hessian_gb, info, progress
            )
        with timings.stage("sweep"):
            rows = run_sweep(
                calibrated,
                torch.cat([s.sigma for s in spectra]),
                curvature,
                bounds,
                budgets,
                options.methods,
                options.seeds,
                loss_before,
                evaluate=options.evaluate,
                progress=progress,
            )
    finally:
        calibrated.close()
    meta = {
        "adapter": str(adapter_path),
        "sha256": adapter.sha256,
        "calib": str(options.calib),
        "curvature": curvature.kind,
        "curvature_reason": reason,
        "curvature_notes": curvature.notes_for(options.methods),
        "total_rank": adapter.total_rank,
        "budgets": budgets,
        "methods": options.methods,
        "seeds": options.seeds,
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
