"""Everything `sublora` draws on the terminal, in one style: a table whose title names what it shows (left
aligned), text columns left and figures right, then summary lines with the key figure in bold.

Strings that come from the user (paths, module names, metric names, warnings) are escaped, and emoji codes are off,
so `my:fire:adapter` or `run[/x]` print literally.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sublora_cli.core.budget import SIZE_UNITS, in_unit, stated_unit
from sublora_cli.pipeline.names import common_prefix, tail
from sublora_cli.pipeline.report import reading_phrase, refit_lines, round_lines
from sublora_cli.pipeline.timings import duration

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
    result = Table(
        title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
        padding=(0, 1, 0, 0), min_width=max(map(len, title.splitlines())),  # a title (a path) is never wrapped
    )  # fmt: skip
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


class LogProgress:
    """Progress where stderr is a log, not a terminal (CI, `2> run.log`), which a bar cannot redraw: a stage writes a
    line when it starts, one at each further tenth of its loop (when QUIET_SECONDS have passed since its last
    line, so quick loops stay short) and one when it ends, with the time elapsed and an estimate of what is left."""

    QUIET_SECONDS = 2.0
    COUNTING_SECONDS = 30.0  # a count with no total yet (batches() being collected): a line this often

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.stages: dict[str, dict] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = self.clock()
        state = self.stages.get(stage)
        if state is None or (state["ended"] and (total is None or done < total)):  # a stage may run again
            state = self.stages[stage] = {"start": now, "first": done, "line": now, "tenth": 0, "ended": False}
            info(f"{stage}: started" + (f", {total:,} steps" if total else ""))
        elapsed = now - state["start"]
        if total is None:
            if now - state["line"] >= self.COUNTING_SECONDS:
                self._line(state, now, f"{stage}: {done:,} so far, {duration(elapsed)} elapsed")
        elif done >= total:
            if not state["ended"]:
                state["ended"] = True
                self._line(state, now, f"{stage}: done, {total:,} in {duration(elapsed)}")
        elif 10 * done // total > state["tenth"] and now - state["line"] >= self.QUIET_SECONDS:
            state["tenth"] = 10 * done // total
            left = duration(elapsed * (total - done) / max(1, done - state["first"]))  # the rate since the start
            self._line(
                state, now, f"{stage}: {done:,}/{total:,} ({10 * done // total}0%), {duration(elapsed)} elapsed, "
                f"about {left} left",
            )  # fmt: skip

    @staticmethod
    def _line(state: dict, now: float, message: str) -> None:
        state["line"] = now
        info(message)


# inspect's columns after the module and σ spectrum; two-line headers keep the figures' columns narrow
INSPECT_FIGURES = ("shape", "rank", "scale", "50/90/99%", "eff.\nrank", "stable\nrank", "‖ΔW‖F")
INSPECT_DROPPABLE = ("stable\nrank", "eff.\nrank")  # left out, in this order, when even short names do not fit
COLUMN_GAP = 2  # characters between two columns of the table style
MIN_NAME, MIN_SPARK, MAX_SPARK = 12, len("σ spectrum"), 32


def inspect_tables(description: dict, adapter: Path, format_name: str) -> None:
    """`sublora inspect`: one row per module with its σ spectrum and summary figures, then the totals. The table is
    fitted to the terminal: the prefix all module names share is said once in the title, a scale every module
    shares too, the sparkline narrows, then names are cut from the left; shapes and figures are never cut."""
    modules = description["modules"]
    prefix = common_prefix([m["name"] for m in modules])
    scales = {m["scale"] for m in modules}
    figures = {
        "shape": [shape(m["shape"]) for m in modules],
        "rank": [str(m["rank"]) for m in modules],
        "scale": [f"{m['scale']:.3g}" for m in modules],
        "50/90/99%": ["/".join(str(m["energy_components"][k]) for k in ("50%", "90%", "99%")) for m in modules],
        "eff.\nrank": [f"{m['effective_rank']:.1f}" for m in modules],
        "stable\nrank": [f"{m['stable_rank']:.1f}" for m in modules],
        "‖ΔW‖F": [f"{m['frobenius']:.3g}" for m in modules],
    }
    if len(scales) == 1:
        del figures["scale"]
    names = [m["name"][len(prefix) :] for m in modules]
    name_width, spark_width = _fit_inspect(figures, names, max((m["rank"] for m in modules), default=1))
    shared = [f"names below follow {prefix}"] if prefix else []
    shared += [f"scale {scales.pop():.3g} in every module"] if len(scales) == 1 else []
    title = f"{adapter}  ({format_name})" + "".join(f"\n{line}" for line in shared)
    rows = table(title, ("module", *figures, "σ spectrum"), left=("module", "shape", "σ spectrum"))
    for i, m in enumerate(modules):
        rows.add_row(
            escape(tail(names[i], name_width)),
            *(figures[column][i] for column in figures),
            sparkline(m["sigma"], width=spark_width),
        )
    out.print(rows)
    t = description["totals"]
    out.print(
        f"[bold]{t['modules']}[/] modules, total rank [bold]{t['rank']}[/], "
        f"{t['params']:,} parameters, {human_bytes(t['bytes'])}.  "
        "50/90/99%: components needed for that share of ‖ΔW‖F²."
    )
    warnings(description["warnings"])


def _fit_inspect(figures: dict[str, list[str]], names: list[str], rank: int) -> tuple[int, int]:
    """(name width, sparkline width) that fit the figures' columns into the terminal, dropping the least needed
    figures (from `figures`, in place) when even the narrowest names and sparkline do not fit."""

    def room() -> int:
        widths = [max(len(h) for h in column.split("\n")) for column in figures]
        widths = [max(w, *(len(v) for v in figures[c])) for w, c in zip(widths, figures, strict=True)]
        return out.width - sum(widths) - COLUMN_GAP * (len(figures) + 1)

    for column in INSPECT_DROPPABLE:
        if room() >= MIN_NAME + MIN_SPARK:
            break
        figures.pop(column)
    left = room()
    name_width = max((len(n) for n in names), default=len("module"))
    spark_width = max(MIN_SPARK, min(MAX_SPARK, rank, left - name_width))
    return max(MIN_NAME, min(name_width, left - spark_width)), spark_width


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
    sizes, counts = _amount_writers(str(budget["requested"]))
    amounts = _budget_amounts(budget, sizes, counts)
    out.print(f"budget {escape(str(budget['requested']))}, read as {reading}: {amounts}")
    carried = t.get("carried_bytes", 0)
    out.print(
        f"rank {t['rank_before']} → [bold]{t['rank_after']}[/], parameters {t['params_before']:,} → "
        f"[bold]{t['params_after']:,}[/], bytes {sizes(t['bytes_before'] + carried)} → "
        f"[bold]{sizes(t['bytes_after'] + carried)}[/]"
        + (f" (incl. {sizes(carried)} of carried tensors)" if carried else "")
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


def _amount_writers(requested: str) -> tuple[Callable[[float], str], Callable[[float], str]]:
    """How the summary writes bytes and parameter counts: in the unit the budget was written in (`50KB`: KB, as
    the budget read it, powers of 1000), else bytes in KiB/MiB and counts in full."""
    suffix = stated_unit(requested)
    stated = partial(in_unit, suffix=suffix)
    if suffix in SIZE_UNITS:
        return stated, _parameters
    return human_bytes, stated if suffix is not None else _parameters


def _parameters(count: float) -> str:
    return f"{count:,.0f} parameters"


def _budget_amounts(budget: dict, sizes: Callable[[float], str], counts: Callable[[float], str]) -> str:
    """'12 of 40 components' for a rank budget; 'used 49.15 KB of 50 KB allowed, 102.4 KB in all' for bytes."""
    unit = budget.get("unit", "rank")
    if unit == "rank":
        return f"{budget['capacity']:g} of {budget['whole']:g} components"
    show = sizes if unit == "bytes" else counts
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
            str(r.budget) if meta.get("budget_shown_in") is None else in_unit(r.budget, meta["budget_shown_in"]),
            method_name,
            str(r.rank_after),
            _maybe(r.predicted_increase, ".3g"),
            f"{r.increase:.3g}",
            f"{r.loss_after_selection:.4g}",
            _refit_cell(r, meta["total_rank"]),
            *metrics,
        )
    out.print(result)
    out.print(escape("wrote " + ", ".join(str(p) for p in written)))


def _refit_cell(row, total_rank: int) -> str:
    """The loss as written after the refit; "(=)": no refit candidate was better; nothing pruned: none to do."""
    if row.refit_accepted is not None:
        return f"{row.loss_after:.4g}" + ("" if row.refit_accepted else " (=)")
    return "all kept" if row.rank_after == total_rank else "off"


def eval_lines(adapter: Path, result: dict) -> None:
    """`sublora eval`: the loss and each evaluate() metric, one line each."""
    out.print(escape(f"{adapter}: total rank {result['total_rank']}, {result['batches']} calibration batches"))
    out.print(f"loss [bold]{result['loss']:.6g}[/]")
    for name, value in (result["metrics"] or {}).items():
        out.print(f"{escape(name)} [bold]{value:.6g}[/]")


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)

