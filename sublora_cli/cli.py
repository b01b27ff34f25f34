"""The `sublora` command line: parses arguments, calls the pipeline, prints. No computation lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sublora_cli import __version__
from sublora_cli.adapters import read_adapter
from sublora_cli.errors import SubloraError
from sublora_cli.prune import PruneOptions, prune
from sublora_cli.select import METHODS
from sublora_cli.spectra import adapter_spectra, describe_adapter

app = typer.Typer(
    name="sublora",
    help="Shrink saved LoRA adapters: choose how many rank-1 components each layer keeps under a global rank "
    "budget, with second-order (Hessian) information and submodular greedy selection (SubLoRA).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # error messages carry paths: never hard-wrap them
state = {"debug": False}

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


def choice_callback(choices: tuple[str, ...]):
    """Validate an optional string option against `choices` (a usage error, exit 2, names the valid ones)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}.")
        return value

    return check


def version_callback(value: bool) -> None:
    if value:
        out.print(f"sublora {__version__}")
        raise typer.Exit()


@app.callback()
def common(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Exit codes: 0 success, 1 bad input or failure, 2 command-line usage, 3 a quality guard failed."""
    state["debug"] = debug


@app.command()
def inspect(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of tables.")] = False,
) -> None:
    """Show each adapted module's singular-value spectrum and summary figures, then adapter totals."""
    loaded = read_adapter(adapter)
    info = describe_adapter(loaded, adapter_spectra(loaded))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=f"{adapter}  ({loaded.format})", title_justify="left")
    for column in (
        "module",
        "shape",
        "rank",
        "scale",
        "σ spectrum",
        "50%",
        "90%",
        "99%",
        "eff.rank",
        "stable",
        "‖ΔW‖F",
    ):
        table.add_column(column, justify="left" if column in ("module", "σ spectrum") else "right")
    for m in info["modules"]:
        energy = m["energy_components"]
        table.add_row(
            m["name"],
            "×".join(map(str, m["shape"])),
            str(m["rank"]),
            f"{m['scale']:.3g}",
            sparkline(m["sigma"]),
            str(energy["50%"]),
            str(energy["90%"]),
            str(energy["99%"]),
            f"{m['effective_rank']:.1f}",
            f"{m['stable_rank']:.1f}",
            f"{m['frobenius']:.4g}",
        )
    out.print(table)
    t = info["totals"]
    out.print(
        f"[bold]{t['modules']}[/] modules, total rank [bold]{t['rank']}[/], "
        f"{t['params']:,} parameters, {human_bytes(t['bytes'])}.  "
        "Columns 50/90/99%: components needed for that share of ‖ΔW‖F²."
    )


@app.command(name="prune")
def prune_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", show_default=False)],
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            "-b",
            help="Components to keep in total: a rank (50), a percentage (25%) or a fraction (0.25).",
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory.",
            show_default="a sibling named <adapter>-pruned-<budget>",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=f"Selection method: {', '.join(METHODS)}.",
            show_default="sublora with --calib, else magnitude",
            callback=choice_callback(METHODS),
        ),
    ] = None,
    min_rank: Annotated[int, typer.Option("--min-rank", help="Every module keeps at least this many.")] = 0,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="No module keeps more than this.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized greedy (sublora-random).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Prune ADAPTER to a rank budget and write the smaller adapter plus sublora_report.json/.md."""
    options = PruneOptions(budget=budget, method=method, min_rank=min_rank, max_rank=max_rank, seed=seed)
    result = prune(adapter, options, out_dir=out_dir, overwrite=overwrite)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    report = result.report
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_prune_summary(report, result.out_dir)


def print_prune_summary(report: dict, out_dir: Path) -> None:
    table = Table(title=f"method {report['method']}, budget {report['budget']['resolved']}", title_justify="left")
    for column in ("module", "shape", "rank", "kept σ"):
        table.add_column(column, justify="left" if column != "rank" else "right")
    for m in report["modules"]:
        style = "dim" if m["rank_after"] == m["rank_before"] else ("red" if m["rank_after"] == 0 else "")
        table.add_row(
            m["name"],
            "×".join(map(str, m["shape"])),
            f"{m['rank_before']} → {m['rank_after']}",
            sparkline(m["sigma"], width=30),
            style=style,
        )
    out.print(table)
    t = report["totals"]
    out.print(
        f"rank {t['rank_before']} → [bold]{t['rank_after']}[/], parameters {t['params_before']:,} → "
        f"[bold]{t['params_after']:,}[/], {human_bytes(t['bytes_before'])} → [bold]{human_bytes(t['bytes_after'])}[/]"
    )
    out.print(f"wrote {out_dir} (adapter + sublora_report.json, sublora_report.md)")


def main() -> None:
    """Entry point: maps errors onto the exit codes of DESIGN §2 (1 input/failure, 2 usage, 3 quality guard).

    Typer itself handles usage errors (exit 2) and --help; our own errors carry their exit code.
    """
    try:
        app()
    except SubloraError as e:
        if state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:
        if state["debug"]:
            raise
        err.print(
            f"[bold red]error:[/] unexpected {type(e).__name__}: {e}. Run again with --debug for the traceback.",
            highlight=False,
        )
        sys.exit(1)
