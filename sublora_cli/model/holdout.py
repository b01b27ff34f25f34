"""Held-out data (docs/design.md §4): batches the pipeline measures but never fits.

A few calibration batches are easy to fit: a refit, a curvature's gradient term or a search over budgets can lower
the loss on them while the model gets worse on everything else. So every data-driven decision is checked on
batches that reached no gradient and no curvature. They come from the script's `heldout_batches()` when it
defines one; otherwise `--holdout` sets aside a deterministic share of `batches()`, spread evenly over them so
that an ordered data set (by length, by topic) gives both sides of the split some of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sublora_cli.constants import DEFAULT_HOLDOUT_FRACTION, HOLDOUT_AUTO, MIN_BATCHES_TO_SPLIT
from sublora_cli.errors import SubloraError


def read_holdout(value: str | float) -> str | float:
    """`auto` or a fraction in [0, 1) of batches() to hold out (25% reads as 0.25)."""
    if isinstance(value, str) and value.strip() == HOLDOUT_AUTO:
        return HOLDOUT_AUTO
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise SubloraError(f"{value!r} is neither auto nor a fraction such as 0.25 or 25%.") from None
    if not 0 <= fraction < 1 or math.isnan(fraction):
        raise SubloraError(f"{value!r}: the share held out must be at least 0 and below 1.")
    return fraction


def held_out_indices(count: int, fraction: float) -> list[int]:
    """The indices of round(fraction·count) batches (at least one, never all), evenly spread over the set."""
    if fraction <= 0 or count < 2:
        return []
    held = min(max(1, round(fraction * count)), count - 1)
    return [int((i + 0.5) * count / held) for i in range(held)]


@dataclass(frozen=True)
class Split:
    """The batches the pipeline fits (gradient, curvature, refit) and those it only measures, with a sentence
    saying how they were split (`source`: script, split or none)."""

    fit: list
    heldout: list
    source: str
    note: str


def split_batches(batches: list, holdout: str | float, script_heldout: Callable[[], list] | None = None) -> Split:
    """Apply `--holdout` to the calibration batches. `script_heldout` collects the script's heldout_batches()
    (None when it defines none; called only when used): auto takes them, else a quarter of batches() when there
    are at least MIN_BATCHES_TO_SPLIT; 0 holds nothing out (every decision on the calibration loss, as before
    held-out data existed); a fraction splits batches() even when the script has held-out batches of its own."""
    count = len(batches)
    if holdout == 0:
        ignored = " (heldout_batches() is not used)" if script_heldout is not None else ""
        return Split(batches, [], "none", f"--holdout 0: fitting and checking on all {count} batches{ignored}")
    if holdout == HOLDOUT_AUTO and script_heldout is not None:
        heldout = script_heldout()
        return Split(
            batches,
            heldout,
            "script",
            f"held-out data: the script's {len(heldout)} heldout_batches(), never fitted; fitting on its {count} "
            "batches()",
        )
    if holdout == HOLDOUT_AUTO and count < MIN_BATCHES_TO_SPLIT:
        return Split(
            batches,
            [],
            "none",
            f"no held-out data: {count} calibration batch{'es' if count != 1 else ''} are too few to set some aside "
            f"(--holdout auto needs {MIN_BATCHES_TO_SPLIT}); decisions use the calibration loss alone. Define "
            "heldout_batches() in the script, or pass --holdout 0.5.",
        )
    fraction = DEFAULT_HOLDOUT_FRACTION if holdout == HOLDOUT_AUTO else float(holdout)
    held = held_out_indices(count, fraction)
    if not held:
        return Split(batches, [], "none", f"no held-out data: one batch cannot be split (--holdout {holdout})")
    chosen = set(held)
    fit = [b for i, b in enumerate(batches) if i not in chosen]
    ignored = "; the script's heldout_batches() is not used" if script_heldout is not None else ""
    return Split(
        fit,
        [batches[i] for i in held],
        "split",
        f"held-out data: batches {', '.join(map(str, held))} of {count} (--holdout {holdout}), never fitted; fitting "
        f"on the other {len(fit)}{ignored}",
    )
