"""What the held-out batches say about a prune (docs/design.md §4): the report's `loss.heldout` block, the
warning when the calibration batches were fitted at the held-out ones' expense, and the choice between
candidate kept sets by their held-out loss.

The held-out batches never reach a gradient or a curvature (model/holdout.py); here they only judge.
"""

from __future__ import annotations

from collections.abc import Sequence


def relative(before: float, after: float) -> float:
    """(after − before) / |before|, 0 → inf-safe."""
    increase = after - before
    return increase / abs(before) if before != 0 else (0.0 if increase == 0 else float("inf"))


def heldout_block(
    batches: int, note: str, before: float | None, after_selection: float | None, after: float | None
) -> dict | None:
    """The report's `loss.heldout`: the held-out loss of the unpruned adapter, of the kept σ as trained and of the
    written adapter, with the written one's increase; None without held-out data."""
    if before is None or after is None:
        return None
    return {
        "batches": batches,
        "split": note,
        "before": before,
        "after_selection": after_selection,
        "after": after,
        "increase": after - before,
        "relative_increase": relative(before, after),
    }


def overfit_warnings(loss: dict) -> list[str]:
    """A warning when the calibration loss fell below the unpruned adapter's while the held-out loss rose: the
    figures on the calibration batches flatter the result (a refit or a gradient term fitted them)."""
    heldout = loss.get("heldout")
    if heldout is None or not (loss["after"] < loss["before"] and heldout["after"] > heldout["before"]):
        return []
    return [
        f"the calibration loss fell below the unpruned adapter's ({loss['before']:.6g} → {loss['after']:.6g}) while "
        f"the held-out loss rose ({heldout['before']:.6g} → {heldout['after']:.6g}, "
        f"{heldout['relative_increase']:+.2%}): the calibration batches were fitted, judge the result by the "
        "held-out figure (more calibration batches, or heldout_batches() in the script, make it more reliable)."
    ]


def gated_increase(loss: dict) -> tuple[float, float, float, str]:
    """What --max-loss-increase holds the written adapter to: the relative increase of the held-out loss when
    there is one (the calibration batches were fitted), else of the calibration loss; with its before, after and
    the name of the loss."""
    heldout = loss.get("heldout")
    if heldout is not None:
        return heldout["relative_increase"], heldout["before"], heldout["after"], "held-out loss"
    return loss["relative_increase"], loss["before"], loss["after"], "loss"


def lowest_heldout(losses: Sequence[float | None]) -> int:
    """The index of the candidate with the lowest held-out loss, the first one on a tie or without data."""
    known = [(loss, i) for i, loss in enumerate(losses) if loss is not None]
    return min(known)[1] if known else 0
