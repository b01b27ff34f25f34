"""Stage 5, select: the per-module rank bounds from the flags, the kept set of a method under a budget
(core/select.py), and the warnings a kept set can raise (empty, short of the budget, uncompensated)."""

from __future__ import annotations

from dataclasses import replace

import torch

from sublora_cli.core.budget import (
    Budget,
)
from sublora_cli.core.methods import lookup
from sublora_cli.core.rank_bounds import RankBounds, per_module
from sublora_cli.core.select import Selection, check_selectable, select
from sublora_cli.core.svd import Spectrum
from sublora_cli.errors import SubloraError
from sublora_cli.formats import Adapter, PrunedModule
from sublora_cli.model.curvature import Curvature


def rank_bounds(adapter: Adapter, min_rank: int | str, max_rank: int | str | None) -> RankBounds:
    """Per-module bounds from --min-rank/--max-rank (one number or glob patterns, bounds.py)."""
    names = [m.name for m in adapter.modules]
    lower = per_module(names, min_rank, "--min-rank", 0)
    upper = per_module(names, max_rank, "--max-rank", None)
    for name, lo, hi in zip(names, lower, upper, strict=True):
        if hi is not None and hi < lo:
            where = "" if isinstance(max_rank, int) and isinstance(min_rank, int) else f" for {name}"
            raise SubloraError(f"--max-rank {hi} is below --min-rank {lo}{where}.")
    if upper and all(hi == 0 for hi in upper):
        raise SubloraError(
            "--max-rank 0 leaves no component in any module: the pruned adapter would be empty, which peft cannot "
            "load. Use --max-rank 1 or more."
        )
    ranks = [m.rank for m in adapter.modules]
    sizes = torch.tensor(ranks, dtype=torch.long)
    caps = torch.tensor([r if hi is None else hi for r, hi in zip(ranks, upper, strict=True)], dtype=torch.long)
    return replace(
        RankBounds.from_ranks(ranks),
        lower=torch.minimum(sizes, torch.tensor(lower, dtype=torch.long)),
        upper=torch.minimum(sizes, caps),
    )


def pruned_modules(adapter: Adapter, spectra: list[Spectrum], kept_mask: torch.Tensor) -> list[PrunedModule]:
    """Split the global kept mask into modules, each with its kept spectrum (the format's writer factors it)."""
    result = []
    offset = 0
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        kept = torch.nonzero(kept_mask[offset : offset + module.rank]).flatten().tolist()
        offset += module.rank
        result.append(PrunedModule.keeping(module, spectrum, kept))
    return result


def refuse_unselectable(method: str, budget: Budget, bounds: RankBounds, where: str = "") -> None:
    """Refuse a method the budget rules out (exhaustive over too many subsets, a search by number of picks under
    a bytes budget) before the calibration and curvature are computed."""
    try:
        check_selectable(method, budget, bounds)
    except ValueError as e:
        raise SubloraError(f"{where}{e}.") from e


def select_kept(
    method: str, sigma: torch.Tensor, budget: Budget, bounds: RankBounds, curvature: Curvature | None, seed: int
) -> Selection:
    inputs = curvature.selection_inputs(method) if curvature is not None else {}
    try:
        selection = select(method, sigma, budget, bounds, seed=seed, **inputs)
    except ValueError as e:
        raise SubloraError(f"{e}.") from e
    check_not_empty(selection, method)
    return selection


def check_not_empty(selection: Selection, method: str) -> None:
    """An adapter with no component left is one peft cannot load: refuse it rather than write it."""
    if not bool(selection.kept.any()):
        raise SubloraError(
            f"--method {method} kept no component at all (its model predicts that every component increases the "
            "loss): the pruned adapter would be empty, which peft cannot load. Raise --min-rank to 1 to keep "
            "at least one component per module, or choose another --method."
        )


def shortfall(selection: Selection, budget: Budget, method: str) -> list[str]:
    """A warning when less is kept than the budget allows, so a smaller file is not a surprise. What is left
    after the kept set is no shortfall when no component left out fits in it (bytes rarely add up exactly)."""
    kept = selection.kept.cpu()
    spent = float(budget.cost[kept].sum())
    left_out = budget.cost[~kept]
    if spent >= budget.capacity or not bool((left_out <= budget.capacity - spent).any()):
        return []
    why = {
        "sublora-random": "the randomized greedy picks a zero-gain 'dummy' in a step when that is among its draws "
        "(by design, for its guarantee on non-monotone objectives); use --method sublora for the full budget",
        "exhaustive": "a smaller set has a lower predicted loss under the quadratic model",
    }.get(method, "--max-rank caps the modules below it")
    return [f"{method} kept {spent:g} of the {budget.amount(budget.capacity)} the budget allows: {why}."]


def uncompensated(method: str, refit_kept: bool) -> list[str]:
    """A compensating method's kept set and prediction assume the refit: say so when it is turned off."""
    if refit_kept or not lookup(method).compensates:
        return []
    return [
        f"--method {method} chose its kept set, and predicts its loss, counting on the refit of the kept σ, "
        "which --no-refit turns off: the kept σ are written as trained."
    ]

