"""Budgets: what selection may spend (`Budget`), and budgets and tolerances as users write them: a count (`50`),
a percentage (`25%`) or a fraction (`0.25`).

`read_*` check the syntax only (nothing depends on the adapter), so the CLI can report a malformed flag as a
usage error; `parse_*` add the flag name and, for budgets, resolve against the adapter's total rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sublora_cli.errors import SubloraError

BUDGET_FORMS = "give a total rank (50), a percentage (25%) or a fraction below 1 (0.25) of the adapter's total rank"


@dataclass(frozen=True)
class Budget:
    """What a selection may spend: keeping component k costs cost[k] (float64, length R), the kept set's total
    cost is at most capacity, both in `unit`. A rank budget costs 1 per component ("rank"); later kinds (bytes,
    parameters) cost the same within a module, which keeps the lower-bound reasoning of select.py exact.
    """

    cost: torch.Tensor
    capacity: float
    unit: str = "rank"

    def __post_init__(self) -> None:
        if self.cost.dim() != 1 or self.cost.dtype != torch.float64:
            raise ValueError("a budget's costs are one float64 per component")
        if not bool(torch.isfinite(self.cost).all()) or bool((self.cost <= 0).any()):
            raise ValueError("a budget's costs must be positive and finite")
        if not math.isfinite(self.capacity) or self.capacity < 0:
            raise ValueError(f"budget {self.capacity:g}: must be 0 or more")

    @staticmethod
    def ranks(count: int, total_rank: int) -> Budget:
        """Keep at most `count` of `total_rank` components."""
        return Budget(torch.ones(total_rank, dtype=torch.float64), float(count))

    def amount(self, value: float) -> str:
        """`value` in this budget's unit, as messages print it ("12 components", "1.5e+06 bytes")."""
        return f"{value:g} components" if self.unit == "rank" else f"{value:g} {self.unit}"


@dataclass(frozen=True)
class BudgetSpec:
    """A budget as written: `reading` is "rank", "percentage" or "fraction"; `value` a count or a share in (0, 1]."""

    reading: str
    value: float

    def resolve(self, total_rank: int) -> int:
        """Number of kept components (may exceed total_rank; callers warn)."""
        return int(self.value) if self.reading == "rank" else max(1, round(self.value * total_rank))


def _number(number: str, raw: str) -> float:
    """`number` (the part of `raw` before any %) as a positive finite float; errors quote all of `raw`."""
    try:
        value = float(number)
    except ValueError:
        raise SubloraError(f"{raw!r} is not a budget: {BUDGET_FORMS}.") from None
    if not math.isfinite(value) or value <= 0:
        raise SubloraError(f"{raw!r}: a budget must be a positive number.")
    return value


def read_budget(text: str | int | float) -> BudgetSpec:
    """Read a budget's syntax. A number of 1 or more is a rank even when written with a decimal point (`50.0`),
    so it must be whole; only numbers below 1 are fractions."""
    raw = str(text).strip()
    if raw.endswith("%"):
        share = _number(raw[:-1], raw) / 100.0
        if share > 1:
            raise SubloraError(f"{raw!r}: a percentage of the total rank must be at most 100%.")
        return BudgetSpec("percentage", share)
    value = _number(raw, raw)
    if value < 1:
        return BudgetSpec("fraction", value)
    if not value.is_integer():
        raise SubloraError(f"{raw!r}: a number of 1 or more is read as a rank and must be whole; {BUDGET_FORMS}.")
    return BudgetSpec("rank", value)


def parse_budget(text: str, total_rank: int) -> int:
    """Resolve a budget string to a number of kept components (may exceed total_rank; callers warn)."""
    try:
        return read_budget(text).resolve(total_rank)
    except SubloraError as e:
        raise SubloraError(f"--budget {e}") from None


def read_tolerance(text: str | int | float) -> float:
    """A relative tolerance such as `0.05` or `5%` → 0.05 (≥ 0; above 100 % is allowed)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SubloraError(f"{raw!r} is not a number: give a fraction (0.05) or a percentage (5%).") from None
    if not math.isfinite(value) or value < 0:
        raise SubloraError(f"{raw!r}: must be 0 or more.")
    return value


def parse_tolerance(text: str, flag: str) -> float:
    """read_tolerance with the flag named in its error."""
    try:
        return read_tolerance(text)
    except SubloraError as e:
        raise SubloraError(f"{flag} {e}") from None
