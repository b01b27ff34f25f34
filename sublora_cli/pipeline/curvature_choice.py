"""Stage 4, curvature: which kind the methods need (resolving `auto`), announced with its estimated cost before
minutes of work start, then computed (model/curvature.py). The method × curvature rule is checked here once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sublora_cli.core.methods import Need, check_pair, lookup
from sublora_cli.errors import SubloraError
from sublora_cli.model.calibrated import Calibrated
from sublora_cli.model.curvature import AUTO, Curvature, estimate_cost
from sublora_cli.pipeline.timings import Info, Progress, Timings, duration

Estimated = Callable[[float], None]  # told the curvature's estimated seconds before it is computed


def check_method(method: str, calib: Path | None, curvature: str) -> None:
    """A data-free method may be given --calib (the loss before and after is then measured); the others need it."""
    if lookup(method).needs_calibration and calib is None:
        raise SubloraError(f"--method {method} needs a calibration script (--calib calib.py); magnitude does not.")
    check_curvature(method, curvature)


def check_curvature(method: str, curvature: str) -> None:
    """core/methods.check_pair as the user's error, before any work starts."""
    try:
        check_pair(method, curvature)
    except ValueError as e:
        raise SubloraError(f"{e}.") from None


def announce_curvature(
    calibrated: Calibrated, kind: str, requested: str, reason: str, info: Info | None, estimated: Estimated | None
) -> None:
    """Say up front which curvature is computed, why, and what it will cost, before minutes of work start (and
    pass the estimated seconds to `estimated`, for a total of the work that follows)."""
    if info is None:
        return
    R, n = calibrated.sigma_model.size, len(calibrated.batches)
    cost = estimate_cost(R, n, kind, calibrated.steady_loss_seconds(kind))
    hvps, passes = cost["hvps"], cost["passes"]
    work = f"{hvps:,} Hessian-vector products" if hvps else f"{passes:,} forward+backward passes"
    info(
        f"curvature {kind}: {work} (R = {R}, {n} batches), {cost['hessian_bytes'] / 2**20:.1f} MiB for the matrix, "
        f"about {duration(cost['seconds'])} (estimated from the loss evaluation; typically within 2×)"
    )
    if requested == AUTO:
        info(f"  chosen by --curvature auto: {reason}")
    if estimated is not None:
        estimated(cost["seconds"])


def choose_and_compute(
    calibrated: Calibrated,
    requested: str,
    methods: list[str],
    max_hessian_gb: float,
    info: Info | None,
    progress: Progress | None,
    at_least: Need = "none",
    estimated: Estimated | None = None,
) -> tuple[Curvature | None, str]:
    """The curvature `methods` (and `at_least`: the refit's need) ask for, resolving `auto` (which never picks a
    kind the model cannot run), with the reason for its kind; None when nothing asks (data-free, no refit)."""
    kind, reason = calibrated.choose_curvature(requested, methods, at_least)
    if kind == "none":
        return None, reason
    announce_curvature(calibrated, kind, requested, reason, info, estimated)
    return calibrated.curvature(kind, max_hessian_gb, progress), reason


def timed_curvature(
    calibrated: Calibrated,
    requested: str,
    methods: list[str],
    max_hessian_gb: float,
    timings: Timings,
    info: Info | None,
    progress: Progress | None,
    refit: bool = False,
    estimated: Estimated | None = None,
) -> tuple[Curvature, str]:
    """`choose_and_compute`, timed; with `refit` at least the matrix under `auto` (the refit steps with it)."""
    with timings.stage("curvature"):
        at_least: Need = "matrix" if refit else "none"
        return choose_and_compute(calibrated, requested, methods, max_hessian_gb, info, progress, at_least, estimated)

