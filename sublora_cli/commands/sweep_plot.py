"""sweep.png: the measured loss (and the first evaluate() metric) of every method against the budget, as a new user
reads it: the loss on the y-axis label, the budgets in the unit they were typed in, the legend beside the panels."""

from __future__ import annotations

import math
from pathlib import Path

from sublora_cli.core.budget import unit_scale
from sublora_cli.pipeline.output import pyplot

# `rows` are sweep.py's SweepRow (not imported: sweep.py imports this module)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _log_plottable(value: float | None) -> bool:
    """A value a log axis can show (a metric that is NaN, Inf or ≤ 0 everywhere gets no panel)."""
    return value is not None and math.isfinite(value) and value > 0


def _value(row, key: str) -> float:
    """A loss field of a row (loss_after, loss_after_selection) or one of its evaluate() metrics (NaN if absent)."""
    if key in ("loss_after", "loss_after_selection"):
        return getattr(row, key)
    return (row.metrics_after or {}).get(key, math.nan)


def _means(rows: list, budgets: list[int], key: str) -> list[float]:
    """`key`'s value per budget, the mean over the seeds of sublora-random."""
    return [_mean([_value(r, key) for r in rows if r.budget == b]) for b in budgets]


def plot_sweep(rows: list, meta: dict, path: Path, metric_names: list[str]) -> bool:
    """Measured loss (and the first evaluate() metric) vs budget, one line per method (dotted: the kept σ as
    trained, before the refit), the size axis in the user's unit; the legend sits outside the panels so it never
    hides a curve. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    plottable = [m for m in metric_names if any(_log_plottable((r.metrics_after or {}).get(m)) for r in rows)]
    panels = [("loss_after", "calibration loss after pruning")] + [(m, f"{m} after pruning") for m in plottable[:1]]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels) + 2.5, 4.2), squeeze=False, layout="constrained"
    )
    suffix = meta.get("budget_shown_in")
    scale = 1 if suffix is None else unit_scale(suffix)
    refit_ran = False
    for ax, (key, ylabel) in zip(axes[0], panels, strict=True):
        for method in dict.fromkeys(r.method for r in rows):
            of_method = [r for r in rows if r.method == method]
            budgets = sorted({r.budget for r in of_method})
            x = [b / scale for b in budgets]
            line = ax.plot(x, _means(of_method, budgets, key), marker="o", label=method)[0]
            if key == "loss_after" and any(r.refit_accepted is not None for r in of_method):
                refit_ran = True  # the same kept sets with the σ as trained: what the refit buys
                ax.plot(x, _means(of_method, budgets, "loss_after_selection"), ls=":", color=line.get_color())
        before = meta["loss_before"] if key == "loss_after" else (meta.get("metrics_before") or {}).get(key, math.nan)
        ax.axhline(before, ls="--", color="grey", label="before pruning")
        unit = meta.get("budget_unit", "rank")
        what = "size of the written adapter" if unit == "bytes" else "parameters of the written adapter"
        ax.set_xlabel("budget (total rank kept)" if unit == "rank" else f"budget: {what} ({suffix})")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D  # matplotlib is optional: imported once pyplot() found it

    handles, labels = axes[0][0].get_legend_handles_labels()
    if refit_ran:
        handles.append(Line2D([], [], ls=":", color="black"))
        labels.append("dotted: kept σ as trained (no refit)")
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"{Path(meta['adapter']).name}: curvature {meta['curvature']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
