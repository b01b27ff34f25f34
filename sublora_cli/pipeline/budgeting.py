"""The budget policy: the written --budget read into a `Budget` priced for this adapter (design §5), capped at the
whole adapter, the --max-loss-increase search for the smallest one, and the report's budget block."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from sublora_cli.core.autobudget import AutoBudget, smallest_within
from sublora_cli.core.budget import (
    UNIT_TABLE,
    Budget,
    BudgetSpec,
    Pricing,
    parse_tolerance,
    read_budget,
    resolve_budget,
)
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.select import Selection
from sublora_cli.errors import SubloraError, UsageError
from sublora_cli.formats import Adapter
from sublora_cli.model.curvature import Curvature
from sublora_cli.pipeline.choose import select_kept


def budget_spec(budget: str | None, max_loss_increase: str | None) -> BudgetSpec:
    """The written budget; none with --max-loss-increase is auto, none without it a usage error."""
    if budget is None:
        if max_loss_increase is None:
            raise UsageError(
                "--budget is required (a rank, a share, a size such as 12MiB or a parameter count such as 2.5M), "
                "unless --max-loss-increase is given: then sublora finds the smallest adapter within it."
            )
        return BudgetSpec("auto", 0.0)
    try:
        spec = read_budget(budget)
    except SubloraError as e:
        raise SubloraError(f"--budget {e}") from None
    if spec.reading == "auto" and max_loss_increase is None:
        raise UsageError("--budget auto needs --max-loss-increase: the loss increase the smallest adapter may have.")
    return spec


def adapter_pricing(adapter: Adapter) -> Pricing:
    """What every component and the carried tensors cost (design §5), in the adapter's stored dtype."""
    return Pricing(
        ranks=[m.rank for m in adapter.modules],
        widths=[sum(m.shape) for m in adapter.modules],
        element_sizes=[m.element_size for m in adapter.modules],
        carried_bytes=sum(t.numel() * t.element_size() for t in adapter.carried.values()),
    )


def allowance_for(spec: BudgetSpec, unit: str, pricing: Pricing) -> tuple[Budget, bool]:
    """A written (non-auto) budget priced for this adapter and capped at the whole of it, and whether the cap was
    reached (nothing to prune): what `prune` spends, and what every row of a `sweep` spends."""
    return whole_adapter_cap(resolve_budget(spec, unit, pricing))


def whole_adapter_cap(allowance: Budget) -> tuple[Budget, bool]:
    """The budget capped at the whole adapter, and whether it reached it (nothing to prune)."""
    whole = float(allowance.cost.sum())
    if allowance.capacity < whole:
        return allowance, False
    return replace(allowance, capacity=whole), True


def nothing_to_prune(requested: str | None, allowance: Budget, unpruned: bool, fixed: int) -> list[str]:
    if not unpruned:
        return []
    whole = allowance.amount(allowance.capacity + fixed)
    if allowance.unit == "rank":
        whole = f"total rank {allowance.capacity:g}"
    return [f"--budget {requested} is at least the adapter's {whole}: nothing to prune, the adapter is written as is."]


def out_suffix(method: str, budget: str | None) -> str:
    """The default output directory's name after the adapter's: `pruned-<method>-<budget as written>`, so runs of
    the README's examples with other methods or budgets never collide."""
    return f"pruned-{method}-{in_folder_name(str(budget or 'auto'))}"


def in_folder_name(written: str) -> str:
    """A budget or a list of budgets as written, safe in a folder name: 25% → 25pct, 0.25 → 0p25, 12MiB,
    10:90:10 → 10-90-10."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", written.replace("%", "pct").replace(".", "p")).strip("-")


def resolved(allowance: Budget) -> int | float:
    """The report's `budget.resolved`: the kept count of a rank budget, else what the components may spend."""
    return int(allowance.capacity) if UNIT_TABLE[allowance.unit].whole else allowance.capacity


def budget_block(
    allowance: Budget, pricing: Pricing, selection: Selection, search: AutoBudget | None, tolerance: float | None
) -> dict:
    """unit, capacity and used (the carried tensors included for bytes), what they carry, and the auto search."""
    fixed = pricing.fixed(allowance.unit)
    block = {
        "unit": allowance.unit,
        "capacity": allowance.capacity + fixed,
        "used": allowance.spent(selection.kept) + fixed,
        "carried": fixed,
        "whole": float(allowance.cost.sum()) + fixed,
    }
    if search is not None:
        block["search"] = search.summary(tolerance)
    return block


def auto_budget(
    tolerance: float,
    unit: str,
    pricing: Pricing,
    method: str,
    sigma: torch.Tensor,
    bounds: RankBounds,
    curvature: Curvature | None,
    seed: int,
    loss_before: float,
    measure: Callable[[torch.Tensor], float],
) -> AutoBudget:
    """The smallest budget in `unit` whose selection's measured increase is within `tolerance` (autobudget.py)."""
    floor = sum(lo * c for lo, c in zip(bounds.lower.tolist(), pricing.per_module(unit), strict=True))
    return smallest_within(
        tolerance,
        pricing.costs(unit),
        floor,
        lambda budget: select_kept(method, sigma, budget, bounds, curvature, seed),
        measure,
        loss_before,
        unit,
    )


def auto_news(search: AutoBudget, allowance: Budget, evaluations: int) -> str:
    return (
        f"--budget auto: {allowance.amount(search.capacity)} (rank {int(search.selection.kept.sum())}) after "
        f"{evaluations} loss evaluations"
    )


def quality_threshold(max_loss_increase: str | None, calib: Path | None) -> float | None:
    if max_loss_increase is None:
        return None
    if calib is None:
        raise SubloraError("--max-loss-increase needs --calib: without data there is no loss to measure.")
    return parse_tolerance(max_loss_increase, "--max-loss-increase")

