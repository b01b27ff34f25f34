"""One prune of an adapter to its budget — curvature → selection (or the --max-loss-increase search) → refit →
measured as written — as a plain function of a `Plan` (what the user asked for) and a `Run` (where it happens).

`prune` decides once; each round of `--rounds` (training/rounds.py) decides once on its trained adapter, and the
last decision is the result. Nothing here calls back into a command or the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sublora_cli.core.autobudget import AutoBudget
from sublora_cli.core.budget import Budget, Pricing
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import Selection
from sublora_cli.core.svd import Spectrum
from sublora_cli.formats import Adapter
from sublora_cli.model.calibrated import Calibrated
from sublora_cli.model.curvature import Curvature
from sublora_cli.pipeline.budgeting import auto_budget, auto_news
from sublora_cli.pipeline.choose import select_kept, shortfall, uncompensated
from sublora_cli.pipeline.curvature_choice import timed_curvature
from sublora_cli.pipeline.timings import Info, Progress, Timings
from sublora_cli.pipeline.written import Written, selected_loss, time_refit, written_outcome


@dataclass(frozen=True)
class Plan:
    """What to decide: the method and its curvature, the budget (`allowance`; None: search the smallest one within
    `tolerance` in `unit`), the per-module bounds, the refit switch and the randomized greedy's seed."""

    method: str
    curvature: str
    max_hessian_gb: float
    allowance: Budget | None
    tolerance: float | None
    unit: str
    pricing: Pricing
    bounds: RankBounds
    refit: bool
    seed: int


@dataclass(frozen=True)
class Run:
    """Where a decision is made: the calibrated model, the loss before pruning (the search's reference), and the
    clock and callbacks of the command."""

    calibrated: Calibrated
    loss_before: float
    timings: Timings
    info: Info | None = None
    progress: Progress | None = None


@dataclass(frozen=True)
class Decision:
    """One prune of a (possibly trained) adapter: the curvature it used and why, the selection, the budget it spent
    (found by the search when the plan had none), the kept set as written, and the warnings it raised."""

    curvature: Curvature | None
    reason: str | None
    selection: Selection
    allowance: Budget
    search: AutoBudget | None
    written: Written | None
    warnings: list[str] = field(default_factory=list)


def decide(plan: Plan, run: Run, adapter: Adapter, spectra: list[Spectrum], evaluate: bool) -> Decision:
    """Prune `adapter` (in SVD form `spectra`) as `plan` says; `evaluate`: also run the script's evaluate() on the
    result (only the last round needs it)."""
    sigma = torch.cat([s.sigma for s in spectra])
    timings, calibrated = run.timings, run.calibrated
    curvature, reason = timed_curvature(
        calibrated, plan.curvature, [plan.method], plan.max_hessian_gb, timings, run.info, run.progress, plan.refit
    )
    warnings = curvature.notes_for([plan.method]) if curvature is not None else []
    search = None
    budget = plan.allowance
    if budget is None:
        assert plan.tolerance is not None, "a plan without a budget searches within a tolerance"
        with timings.stage("auto budget"):
            search = auto_budget(
                plan.tolerance, plan.unit, plan.pricing, plan.method, sigma, plan.bounds, curvature, plan.seed,
                run.loss_before, selected_loss(calibrated, adapter, spectra),
            )  # fmt: skip
        budget, selection = Budget(plan.pricing.costs(plan.unit), search.capacity, plan.unit), search.selection
        if run.info is not None:
            run.info(auto_news(search, budget, len(search.evaluations)))
    else:
        with timings.stage("select"):
            selection = select_kept(plan.method, sigma, budget, plan.bounds, curvature, plan.seed)
    warnings += shortfall(selection, budget, plan.method) + uncompensated(plan.method, plan.refit)
    finish = written_outcome(calibrated, adapter, spectra, curvature, plan.refit, evaluate)
    with timings.stage("eval"):
        written = finish(selection.kept)
    time_refit(timings, written.refit)
    return Decision(curvature, reason, selection, budget, search, written, warnings)
