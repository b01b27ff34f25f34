"""Budgets and tolerances as users write them: a count (`50`), a percentage (`25%`) or a fraction (`0.25`)."""

from __future__ import annotations

import math

from sublora_cli.errors import SubloraError


def parse_budget(text: str, total_rank: int) -> int:
    """Resolve a budget string to a number of kept components (may exceed total_rank; callers warn)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            share = float(raw[:-1]) / 100.0
            kind = "percentage"
        elif any(c in raw for c in ".eE"):
            share = float(raw)
            kind = "fraction"
        else:
            count = int(raw)
            if count <= 0:
                raise SubloraError(f"--budget {raw!r}: a rank budget must be a positive number of components.")
            return count
    except ValueError:
        raise SubloraError(
            f"--budget {raw!r} is not a budget: give a total rank (50), a percentage (25%) or a fraction "
            "(0.25) of the adapter's total rank."
        ) from None
    if not math.isfinite(share) or share <= 0:
        raise SubloraError(f"--budget {raw!r}: the {kind} must be positive.")
    if share > 1:
        raise SubloraError(
            f"--budget {raw!r}: a {kind} of the total rank must be at most {'100%' if kind == 'percentage' else '1'}."
        )
    return max(1, round(share * total_rank))


def parse_tolerance(text: str, flag: str) -> float:
    """A relative tolerance such as `0.05` or `5%` → 0.05 (≥ 0; above 100 % is allowed)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SubloraError(f"{flag} {raw!r} is not a number: give a fraction (0.05) or a percentage (5%).") from None
    if not math.isfinite(value) or value < 0:
        raise SubloraError(f"{flag} {raw!r}: must be 0 or more.")
    return value
