"""Stage 5b, judge: with held-out data, the kept set that is written is chosen by its held-out loss among a few
candidates at the same budget, each refit and measured as written.

A data-aware selection trusts a quadratic model fitted to the calibration batches. Where that model is far from
the loss (a deep cut, a curvature whose gradient term fits a handful of batches), it can keep a set that is worse
on new data than keeping the largest σ. So the data-free selection (`magnitude`) is always a candidate, and when
`--curvature auto` computed the exact Hessian, the method's selection on the empirical Fisher (no gradient term,
one pass per batch) is one too: measured on the shipped samples, each wins somewhere (docs/design.md §2). The
held-out batches reached no gradient and no curvature, so their loss is an honest judge; without them nothing
is judged and the method's own selection is written, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from sublora_cli.core.methods import lookup
from sublora_cli.core.select import Selection
from sublora_cli.model.calibrated import Calibrated
from sublora_cli.model.curvature import AUTO, Curvature
from sublora_cli.pipeline.heldout import lowest_heldout
from sublora_cli.pipeline.written import Written

DATA_FREE = "magnitude"
RIVAL_KIND = "fisher"


@dataclass(frozen=True)
class Candidate:
    """One kept set at the budget: who chose it (method and curvature), and how it measures as written."""

    method: str
    curvature: Curvature | None
    selection: Selection
    written: Written

    @property
    def label(self) -> str:
        kind = (
            f" ({self.curvature.kind})" if self.curvature is not None and lookup(self.method).needs_calibration else ""
        )
        return f"{self.method}{kind}"


def judged(calibrated: Calibrated, method: str) -> bool:
    """Whether candidates are judged: there are held-out batches and the method's selection uses the data."""
    return bool(calibrated.heldout) and lookup(method).needs_calibration


def wants_rival_curvature(requested: str, curvature: Curvature | None) -> bool:
    """Whether the method's selection on the Fisher is a candidate too: auto computed a second-order kind."""
    return requested == AUTO and curvature is not None and curvature.kind in ("exact", "diag")


def best(candidates: list[Candidate]) -> int:
    """The candidate with the lowest held-out loss as written (the method's own on a tie: it comes first)."""
    return lowest_heldout([c.written.heldout_after for c in candidates])


def candidates_record(candidates: list[Candidate], chosen: int) -> list[dict] | None:
    """The report's `candidates`: each judged kept set with its rank and losses as written; None when one ran."""
    if len(candidates) < 2:
        return None
    return [
        {
            "method": c.method,
            "curvature": c.curvature.kind if c.curvature is not None else None,
            "rank": int(c.selection.kept.sum()),
            "loss_after": c.written.loss_after,
            "heldout_after": c.written.heldout_after,
            "chosen": i == chosen,
        }
        for i, c in enumerate(candidates)
    ]


def judgement_news(candidates: list[Candidate], chosen: int) -> str:
    """One line saying which kept set the held-out loss chose, and against what."""
    figures = ", ".join(f"{c.label} {c.written.heldout_after:.6g}" for c in candidates)
    return f"held-out loss as written: {figures}; writing {candidates[chosen].label}'s kept set"
