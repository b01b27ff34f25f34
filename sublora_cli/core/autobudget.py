"""`--budget auto`: the smallest adapter whose *measured* loss increase stays within --max-loss-increase.

The curvature is computed once; the method's quadratic model (when it has one) brackets the answer cheaply (a
selection costs microseconds to milliseconds, a loss evaluation a pass over the calibration batches), and a
bisection on the measured loss of the factors as written settles it, within a fixed number of evaluations
(design §5). The full adapter needs no evaluation: its increase is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from sublora_cli.core.budget import UNIT_TABLE, Budget
from sublora_cli.core.select import Selection

MAX_EVALUATIONS = 12
CURVE_POINTS = 16


@dataclass(frozen=True)
class Evaluation:
    """One measured point: the capacity asked for, what the kept set spends and its rank, its relative increase
    predicted by the method's model (None without one) and measured on the written factors."""

    capacity: float
    used: float
    rank: int
    predicted: float | None
    measured: float
    passed: bool


@dataclass(frozen=True)
class AutoBudget:
    capacity: float
    selection: Selection
    evaluations: list[Evaluation]
    curve: list[dict]  # the model's relative increase on a grid of capacities: {"capacity", "rank", "predicted"}

    def summary(self, tolerance: float) -> dict:
        return {
            "max_loss_increase": tolerance,
            "chosen_capacity": self.capacity,
            "evaluations": [asdict(e) for e in self.evaluations],
            "curve": self.curve,
        }


def smallest_within(
    tolerance: float,
    costs: torch.Tensor,
    floor: float,
    choose: Callable[[Budget], Selection],
    measure: Callable[[torch.Tensor], float],
    loss_before: float,
    unit: str,
    max_evaluations: int = MAX_EVALUATIONS,
) -> AutoBudget:
    """The smallest capacity (to within the cheapest component's cost) whose selection's measured relative
    increase is ≤ tolerance. `floor`: the least capacity selection accepts (the lower bounds' reserve); `choose`
    selects under a Budget, `measure` gives the loss of a kept mask as written."""
    whole = float(costs.sum())
    step = float(costs.min())
    scale = abs(loss_before) if loss_before != 0 else 1.0
    least = max(floor, step)
    selections: dict[float, Selection] = {}

    def select_at(capacity: float) -> Selection:
        capacity = min(max(capacity, least), whole)
        if capacity not in selections:
            selections[capacity] = choose(Budget(costs, capacity, unit))
        return selections[capacity]

    def predicted(capacity: float) -> float | None:
        increase = select_at(capacity).predicted_increase
        return None if increase is None else increase / scale

    model = _model_answer(predicted, tolerance, least, whole, step)
    measured: dict[tuple, Evaluation] = {}
    evaluations: list[Evaluation] = []

    def passes(capacity: float) -> bool:
        selection = select_at(capacity)
        key = tuple(torch.nonzero(selection.kept).flatten().tolist())
        if key not in measured:  # a capacity that keeps the same set as an earlier one costs no evaluation
            relative = (measure(selection.kept) - loss_before) / scale
            kept = selection.kept.cpu()
            measured[key] = Evaluation(
                capacity=capacity,
                used=float(costs[kept].sum()),
                rank=int(kept.sum()),
                predicted=predicted(capacity),
                measured=relative,
                passed=relative <= tolerance,
            )
            evaluations.append(measured[key])
        return measured[key].passed

    low, high = least - step, whole  # invariant: high passes (the whole adapter: no increase), low fails or is void
    probe, width = _snap(model, unit), step  # from the model's answer, steps of 1, 2, 4, … until bracketed
    while high - low > step and len(evaluations) < max_evaluations:
        if passes(probe):
            high, probe = probe, probe - width
        else:
            low, probe = probe, probe + width
        bracketed = low >= least and high < whole  # a measured failure below a measured pass: bisect
        width *= 2
        probe = _snap((low + high) / 2 if bracketed else probe, unit)
        if not low < probe < high:
            probe = _snap((low + high) / 2, unit)
    curve = [
        {"capacity": c, "rank": int(select_at(c).kept.sum()), "predicted": predicted(c)}
        for c in _grid(least, whole, unit)
    ]
    return AutoBudget(capacity=high, selection=select_at(high), evaluations=evaluations, curve=curve)


def _snap(capacity: float, unit: str) -> float:
    """Whole units (ranks) are snapped down; others are kept as they are."""
    return float(math.floor(capacity)) if UNIT_TABLE[unit].whole else capacity


def _model_answer(
    predicted: Callable[[float], float | None], tolerance: float, least: float, whole: float, step: float
) -> float:
    """The smallest capacity whose *predicted* relative increase is ≤ tolerance, by bisection on the model
    (selections only, no loss evaluation); the middle of the range for a method without a model."""
    if predicted(least) is None:
        return (least + whole) / 2
    if predicted(least) <= tolerance:
        return least
    low, high = least, whole
    while high - low > step:
        middle = (low + high) / 2
        if predicted(middle) <= tolerance:
            high = middle
        else:
            low = middle
    return high


def _grid(least: float, whole: float, unit: str) -> list[float]:
    points = [least + (whole - least) * i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]
    return sorted({_snap(p, unit) for p in points})
