"""Budgets: what selection may spend (`Budget`), and budgets and tolerances as users write them: a total rank
(`50`), a percentage (`25%`) or a fraction (`0.25`) of the adapter, a size in bytes (`12MiB`, `500KB`), a
parameter count (`2.5M`, `300k`), or `auto` (the smallest adapter that --max-loss-increase allows).

`read_*` check the syntax only (nothing depends on the adapter), so the CLI can report a malformed flag as a
usage error; `resolve_budget` prices every component and turns the written budget into a `Budget`.

The units a budget can count are one table, `UNIT_TABLE`: how an amount is written (its suffixes), what one
component of each module costs, what is spent whatever is kept, whether capacities are whole, and the noun of a
message. A new unit is one entry (design §5).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sublora_cli.errors import SubloraError

BUDGET_FORMS = (
    "give a total rank (50), a percentage (25%) or a fraction below 1 (0.25) of the adapter, a size in bytes "
    "(500KB, 12MiB, 1.5GB: SI units kB/KB, MB, GB, TB are powers of 1000, IEC units KiB, MiB, GiB, TiB powers of "
    "1024, B is bytes), a parameter count (300k, 2.5M, 1G: powers of 1000, no B), or auto (with "
    "--max-loss-increase)"
)
SIZE_UNITS = {
    "B": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
COUNT_UNITS = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
LARGEST = 2**63  # no adapter holds more ranks, parameters or bytes; a larger budget is a typo, not a no-op
_WRITTEN = re.compile(r"(?P<number>[0-9.eE+-]+?)\s*(?P<suffix>[A-Za-z]*)")


@dataclass(frozen=True)
class Budget:
    """What a selection may spend: keeping component k costs cost[k] (float64, length R), the kept set's total
    cost is at most capacity, both in `unit` ("rank", "params" or "bytes"). Every component of a module costs
    the same (its rank-1 slice of B and A), which keeps the lower-bound reasoning of select.py exact.
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

    @property
    def uniform(self) -> bool:
        """Whether every component costs the same (then a budget is a count, whatever its unit)."""
        return not self.cost.numel() or bool((self.cost == self.cost[0]).all())

    def spent(self, kept: torch.Tensor) -> float:
        """The cost of a kept mask."""
        return float(self.cost[kept.cpu()].sum())

    def amount(self, value: float) -> str:
        """`value` in this budget's unit, as messages print it ("12 components", "1.5e+06 bytes")."""
        return f"{value:g} {UNIT_TABLE[self.unit].noun}"


@dataclass(frozen=True)
class BudgetSpec:
    """A budget as written. `reading`: "rank", "percentage", "fraction", "bytes", "params" or "auto"; `value` a
    count, an amount of bytes or parameters, or a share in (0, 1] (0 for auto)."""

    reading: str
    value: float

    @property
    def unit(self) -> str | None:
        """The unit the budget states itself (a share or auto takes --budget-unit's)."""
        return self.reading if self.reading in UNIT_TABLE else None

    @property
    def is_share(self) -> bool:
        return self.reading in ("percentage", "fraction")

    def resolve(self, total_rank: int) -> int:
        """Number of kept components of a rank budget (may exceed total_rank; callers warn)."""
        return int(self.value) if self.reading == "rank" else max(1, round(self.value * total_rank))


def _number(number: str, raw: str) -> float:
    """`number` (the part of `raw` before any unit) as a positive finite float; errors quote all of `raw`."""
    try:
        value = float(number)
    except ValueError:
        raise SubloraError(f"{raw!r} is not a budget: {BUDGET_FORMS}.") from None
    if not math.isfinite(value) or value <= 0:
        raise SubloraError(f"{raw!r}: a budget must be a positive number.")
    return value


def _below_largest(value: float, raw: str) -> float:
    """A budget past 2⁶³ of anything (1e300TB) is larger than any adapter can be: refused, naming the forms."""
    if value >= LARGEST:
        raise SubloraError(
            f"{raw!r} is larger than any adapter can be (2^63 ranks, parameters or bytes); {BUDGET_FORMS}."
        )
    return value


def read_budget(text: str | int | float) -> BudgetSpec:
    """Read a budget's syntax. A plain number of 1 or more is a rank even when written with a decimal point
    (`50.0`), so it must be whole; only numbers below 1 are fractions. Units are case-sensitive, so `12mb`
    (millibits?) or `2m` (milli?) are refused rather than guessed."""
    raw = str(text).strip()
    if raw == "auto":
        return BudgetSpec("auto", 0.0)
    if raw.endswith("%"):
        share = _number(raw[:-1], raw) / 100.0
        if share > 1:
            raise SubloraError(f"{raw!r}: a percentage of the adapter must be at most 100%.")
        return BudgetSpec("percentage", share)
    match = _WRITTEN.fullmatch(raw)
    suffix = match["suffix"] if match else ""
    if suffix:
        unit = next((u for u in UNIT_TABLE.values() if suffix in u.suffixes), None)
        if unit is None:
            raise SubloraError(f"{raw!r}: unknown or ambiguous unit {suffix!r}; {BUDGET_FORMS}.")
        amount = _below_largest(_number(match["number"], raw) * unit.suffixes[suffix], raw)
        return BudgetSpec(unit.name, math.floor(amount))
    value = _below_largest(_number(raw, raw), raw)
    if value < 1:
        return BudgetSpec("fraction", value)
    if not value.is_integer():
        raise SubloraError(f"{raw!r}: a number of 1 or more is read as a rank and must be whole; {BUDGET_FORMS}.")
    return BudgetSpec("rank", value)



AXIS_FORMS = (
    "give a list of budgets (10,20,40 or 10%,25% or 200KB,1MiB) or a range start:stop:step of ranks, sizes or "
    "parameter counts in one unit (10:100:10, 100KB:1MB:100KB, 300k:3M:300k)"
)


def read_budget_axis(text: str) -> list[BudgetSpec]:
    """A sweep's --budgets: each entry read as --budget reads it (read_budget), a range expanded in its unit
    (stop included). Syntax only; `auto` has no place on an axis."""
    raw = str(text).strip()
    if ":" not in raw:
        try:
            specs = [read_budget(item) for item in raw.split(",") if item.strip()]
        except SubloraError as e:
            raise SubloraError(f"--budgets {e}") from None
    else:
        parts = raw.split(":")
        try:
            start, stop, step = (read_budget(p) for p in parts) if len(parts) == 3 else (None, None, None)
        except SubloraError:
            start = None
        if start is None or len({start.reading, stop.reading, step.reading}) != 1 or start.is_share:
            raise SubloraError(f"--budgets {raw!r}: a range is start:stop:step in one unit; {AXIS_FORMS}.")
        if stop.value < start.value:
            raise SubloraError(f"--budgets {raw!r}: a range needs stop ≥ start.")
        count = math.floor((stop.value - start.value) / step.value + 1e-9) + 1
        specs = [BudgetSpec(start.reading, start.value + k * step.value) for k in range(count)]
    if not specs or any(spec.reading == "auto" for spec in specs):
        raise SubloraError(f"--budgets {raw!r}: {AXIS_FORMS}.")
    stated = {spec.unit for spec in specs} - {None}
    if len(stated) > 1:
        raise SubloraError(f"--budgets {raw!r} mixes {' and '.join(sorted(stated))}: a sweep's axis has one unit.")
    return specs


def stated_unit(text: str | int | float) -> str | None:
    """The unit a size or count is written in (`50KB` → "KB", `2.5M` → "M"), so that amounts are echoed in the
    user's own unit; None for a rank, a share or auto."""
    match = _WRITTEN.fullmatch(str(text).strip())
    suffix = match["suffix"] if match else ""
    return suffix if suffix in SIZE_UNITS or suffix in COUNT_UNITS else None


def unit_scale(suffix: str) -> int:
    """Bytes or parameters per one of a stated unit ("KB" → 1000, "MiB" → 2**20, "M" → 10**6)."""
    return SIZE_UNITS.get(suffix) or COUNT_UNITS[suffix]


def in_unit(amount: float, suffix: str) -> str:
    """Bytes or parameters in a stated unit: (48900, "KB") → "48.9 KB", (2.5e6, "M") → "2.5M parameters"."""
    value = amount / unit_scale(suffix)
    number = f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"
    return f"{number} {suffix}" if suffix in SIZE_UNITS else f"{number}{suffix} parameters"


def parse_budget(text: str, total_rank: int) -> int:
    """Resolve a rank budget string to a number of kept components (may exceed total_rank; callers warn)."""
    try:
        spec = read_budget(text)
    except SubloraError as e:
        raise SubloraError(f"--budget {e}") from None
    if spec.unit not in (None, "rank") or spec.reading == "auto":
        raise SubloraError(f"--budget {text!r}: a total rank, a percentage or a fraction is needed here.")
    return spec.resolve(total_rank)


@dataclass(frozen=True)
class Pricing:
    """What each component and the carried tensors cost in every unit: a module's rank-1 component is a column
    of B and a row of A, (out + in) parameters (conv: out + in·k·k), times the element size of the output dtype
    in bytes. Carried tensors (modules_to_save, biases) are written whatever is kept, so a bytes budget pays for
    them first."""

    ranks: list[int]
    widths: list[int]  # out + in per module
    element_sizes: list[int]  # bytes per parameter in the written file, per module
    carried_bytes: int

    def per_module(self, unit: str) -> list[float]:
        """What one component of each module costs."""
        return UNIT_TABLE[unit].per_component(self)

    def costs(self, unit: str) -> torch.Tensor:
        """One cost per component, in the order their σ are concatenated."""
        return torch.repeat_interleave(
            torch.tensor(self.per_module(unit), dtype=torch.float64), torch.tensor(self.ranks, dtype=torch.long)
        )

    def fixed(self, unit: str) -> int:
        """What is spent whatever is kept (the carried tensors, for bytes)."""
        return UNIT_TABLE[unit].fixed(self)



@dataclass(frozen=True)
class Unit:
    """One way to count a budget. suffixes: the written forms and their scale (`12MiB`); per_component: what one
    component of each module costs; fixed: what is spent whatever is kept; whole: capacities are whole numbers
    (the search snaps to them, the report prints an int); noun: how messages name an amount."""

    name: str
    suffixes: dict[str, int]
    per_component: Callable[[Pricing], list[float]]
    fixed: Callable[[Pricing], int]
    whole: bool
    noun: str


UNIT_TABLE: dict[str, Unit] = {
    u.name: u
    for u in (
        Unit("rank", {}, lambda p: [1.0] * len(p.ranks), lambda p: 0, True, "components"),
        Unit("params", COUNT_UNITS, lambda p: [float(w) for w in p.widths], lambda p: 0, False, "params"),
        Unit(
            "bytes", SIZE_UNITS,
            lambda p: [float(w * e) for w, e in zip(p.widths, p.element_sizes, strict=True)],
            lambda p: p.carried_bytes, False, "bytes",
        ),
    )
}  # fmt: skip
UNITS = tuple(UNIT_TABLE)

def budget_unit(spec: BudgetSpec, unit: str | None) -> str:
    """The unit a budget is counted in: its own (12MiB: bytes), else --budget-unit's, else ranks."""
    if spec.unit is not None and unit is not None and spec.unit != unit:
        raise SubloraError(f"--budget is a count of {spec.unit} but --budget-unit says {unit}; give one or the other.")
    return spec.unit or unit or "rank"


def resolve_budget(spec: BudgetSpec, unit: str, pricing: Pricing) -> Budget:
    """The Budget of a written (non-auto) budget: a share is a share of the whole adapter in `unit` (carried
    tensors included for bytes); the fixed cost is then taken off what the components may spend. A capacity
    above the whole adapter is left as is (callers warn); one the fixed cost exhausts is an error."""
    costs = pricing.costs(unit)
    fixed = pricing.fixed(unit)
    whole = float(costs.sum()) + fixed
    if spec.is_share:
        total = spec.resolve(len(costs)) if unit == "rank" else spec.value * whole
    else:
        total = spec.value
    capacity = float(total) - fixed
    if capacity < 0:
        raise SubloraError(
            f"--budget of {total:,.0f} bytes is less than the {fixed:,} bytes of the tensors the adapter carries "
            "whole (modules_to_save, biases), which are written whatever is kept; raise --budget."
        )
    return Budget(costs, capacity, unit)


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
