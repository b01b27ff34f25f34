"""Everything `sublora` draws on the terminal, in one style: a table whose title names what it shows (left
aligned), text columns left and figures right, then summary lines with the key figure in bold.

Strings that come from the user (paths, module names, metric names, warnings) are escaped, and emoji codes are off,
so `my:fire:adapter` or `run[/x]` print literally.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sublora_cli.pipeline.report import reading_phrase, refit_lines, round_lines

# Piped output (CI logs, `| less`) gets 120 columns instead of rich's 80, which squashes the tables.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # error messages carry paths: never hard-wrap them

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """σ drawn as bars, one per component (max-pooled to `width` characters for large ranks)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(title: str, columns: Iterable[str], left: Iterable[str]) -> Table:
    """The one table style: an escaped, left-aligned title; the `left` columns left-aligned, the rest right."""
    left = set(left)
    result = Table(title=escape(title), title_justify="left")
    for column in columns:
        result.add_column(escape(column), justify="left" if column in left else "right")
    return result


def shape(dims: list[int]) -> str:
    return "×".join(map(str, dims))


def warnings(messages: Iterable[str]) -> None:
    for message in messages:
        err.print(f"[yellow]warning:[/] {escape(message)}")


def info(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]", highlight=False)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def inspect_tables(description: dict, adapter: Path, format_name: str) -> None:
    """`sublora inspect`: one row per module with its σ spectrum and summary figures, then the totals."""
    columns = ("module", "shape", "rank", "scale", "σ spectrum", "50%", "90%", "99%", "eff.rank", "stable", "‖ΔW‖F")
    rows = table(f"{adapter}  ({format_name})", columns, left=("module", "shape", "σ spectrum"))
    for m in description["modules"]:
        energy = m["energy_components"]
        rows.add_row(
            escape(m["name"]),
            shape(m["shape"]),
            str(m["rank"]),
            f"{m['scale']:.3g}",
            sparkline(m["sigma"], width=32),
            str(energy["50%"]),
            str(energy["90%"]),
            str(energy["99%"]),
            f"{m['effective_rank']:.1f}",
            f"{m['stable_rank']:.1f}",
            f"{m['frobenius']:.4g}",
        )
    out.print(rows)
    t = description["totals"]
    out.print(
        f"[bold]{t['modules']}[/] modules, total rank [bold]{t['rank']}[/], "
        f"{t['params']:,} parameters, {human_bytes(t['bytes'])}.  "
        "Columns 50/90/99%: components needed for that share of ‖ΔW‖F²."
    )
    warnings(description["warnings"])


def prune_summary(report: dict, out_dir: Path) -> None:
    """`sublora prune`: the kept rank per module (unchanged rows dim, emptied rows red), then budget, size, loss."""
    rows = table(
        f"method {report['method']}, budget {report['budget']['requested']}",
        ("module", "shape", "rank", "kept σ"),
        left=("module", "shape", "kept σ"),
    )
    for m in report["modules"]:
        style = "dim" if m["rank_after"] == m["rank_before"] else ("red" if m["rank_after"] == 0 else "")
        rows.add_row(
            escape(m["name"]),
            shape(m["shape"]),
            f"{m['rank_before']} → {m['rank_after']}",
            sparkline(m["sigma"], width=30),
            style=style,
        )
    out.print(rows)
    budget, t = report["budget"], report["totals"]
    reading = reading_phrase(budget["reading"])
    out.print(f"budget {escape(budget['requested'])}, read as {reading}: {_budget_amounts(budget)}")
    carried = t.get("carried_bytes", 0)
    out.print(
        f"rank {t['rank_before']} → [bold]{t['rank_after']}[/], parameters {t['params_before']:,} → "
        f"[bold]{t['params_after']:,}[/], bytes {human_bytes(t['bytes_before'] + carried)} → "
        f"[bold]{human_bytes(t['bytes_after'] + carried)}[/]"
        + (f" (incl. {human_bytes(carried)} of carried tensors)" if carried else "")
    )
    if budget.get("search"):
        search = budget["search"]
        out.print(
            f"auto budget: smallest within {search['max_loss_increase']:.2%} measured increase after "
            f"{len(search['evaluations'])} loss evaluations"
        )
    if report["loss"]:
        loss = report["loss"]
        predicted = loss["predicted_increase"]
        out.print(
            f"loss {loss['before']:.4g} → [bold]{loss['after']:.4g}[/] (measured increase {loss['increase']:.3g}, "
            f"{loss['relative_increase']:+.1%}; predicted {_maybe(predicted, '.3g')}), curvature {report['curvature']}"
        )
        for line in refit_lines(report):
            out.print(escape(line), style="bold red" if line.startswith("WARNING") else None)
        for line in round_lines(report):
            out.print(escape(line))
    if report["metrics"]:
        for name, before in report["metrics"]["before"].items():
            after = report["metrics"]["after"].get(name, float("nan"))
            out.print(f"{escape(name)} {before:.4g} → [bold]{after:.4g}[/]")
    out.print(escape(f"wrote {out_dir} (adapter + sublora_report.json, sublora_report.md)"))


def _budget_amounts(budget: dict) -> str:
    """"12 of 40 components" for a rank budget; "used 1.2 MiB of 1.5 MiB allowed, 3.0 MiB in all" for bytes."""
    unit = budget.get("unit", "rank")
    if unit == "rank":
        return f"{budget['capacity']:g} of {budget['whole']:g} components"
    show = human_bytes if unit == "bytes" else (lambda n: f"{n:,.0f} parameters")
    return f"used {show(budget['used'])} of {show(budget['capacity'])} allowed, {show(budget['whole'])} in all"


def sweep_table(adapter: Path, meta: dict, rows: list, written: list[Path]) -> None:
    """`sublora sweep`: one row per (budget, method, seed) with predicted and measured loss (the kept σ as trained,
    then as written after the refit; "(=)": no refit candidate was better) and the metrics."""
    metric_names = sorted({k for r in rows for k in (r.metrics_after or {})})
    columns = ("budget", "method", "rank", "predicted Δloss", "measured Δloss", "loss selected", "loss refit")
    columns = (*columns, *metric_names)
    result = table(
        f"{adapter}: loss before {meta['loss_before']:.4g}, curvature {meta['curvature']}", columns, left=("method",)
    )
    for r in rows:
        method_name = r.method if r.seed is None else f"{r.method} (seed {r.seed})"
        metrics = [f"{(r.metrics_after or {}).get(m, float('nan')):.4g}" for m in metric_names]
        result.add_row(
            str(r.budget),
            method_name,
            str(r.rank_after),
            _maybe(r.predicted_increase, ".3g"),
            f"{r.increase:.3g}",
            f"{r.loss_after_selection:.4g}",
            "off" if r.refit_accepted is None else f"{r.loss_after:.4g}" + ("" if r.refit_accepted else " (=)"),
            *metrics,
        )
    out.print(result)
    out.print(escape("wrote " + ", ".join(str(p) for p in written)))


def eval_lines(adapter: Path, result: dict) -> None:
    """`sublora eval`: the loss and each evaluate() metric, one line each."""
    out.print(escape(f"{adapter}: total rank {result['total_rank']}, {result['batches']} calibration batches"))
    out.print(f"loss [bold]{result['loss']:.6g}[/]")
    for name, value in (result["metrics"] or {}).items():
        out.print(f"{escape(name)} [bold]{value:.6g}[/]")


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)

