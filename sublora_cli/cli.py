"""The `sublora` command line: parses arguments, calls the pipeline, prints. No computation lives here."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sublora_cli import __version__
from sublora_cli.adapters import read_adapter
from sublora_cli.budget import read_budget, read_tolerance
from sublora_cli.calibrated import DTYPES
from sublora_cli.curvature import AUTO, AUTO_MAX_HVPS, KINDS
from sublora_cli.errors import QualityGateFailed, SubloraError
from sublora_cli.prune import PruneOptions, SweepOptions, evaluate_adapter, prune, sweep
from sublora_cli.report import strict_json
from sublora_cli.select import METHODS
from sublora_cli.settings import DEFAULTS, load_config, merge
from sublora_cli.spectra import adapter_spectra, describe_adapter
from sublora_cli.sweep import DEFAULT_METHODS, parse_budgets, parse_methods

CURVATURES = (*KINDS, AUTO)
CURVATURE_HELP = (
    f"Curvature over σ: {', '.join(CURVATURES)}. auto computes the exact Hessian while R × batches ≤ "
    f"{AUTO_MAX_HVPS} Hessian-vector products, else the empirical Fisher (one pass per batch); diag is enough "
    "for --method diag/linear. See docs/curvature.md."
)
MATRIX_LIMIT_HELP = "Refuse a Hessian or Fisher matrix (float64) larger than this many GB."
MAX_BATCHES_HELP = "Stop with an error when batches() yields more than this many batches (an endless generator)."

app = typer.Typer(
    name="sublora",
    help="Shrink saved LoRA adapters: choose how many rank-1 components each layer keeps under a global rank "
    "budget, with second-order (Hessian) information and submodular greedy selection (SubLoRA).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Rich help parses markup and emoji codes in help texts and defaults (`10:100:10` became `10💯10`): plain help.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output (CI logs, `| less`) gets 120 columns instead of rich's 80, which squashes the tables.
# No emoji codes: user text such as `my:fire:adapter` must print literally (markup is escaped where printed).
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # error messages carry paths: never hard-wrap them
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


def one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    """A check that a setting is one of `choices` (its error names the valid ones)."""

    def check(value: str) -> None:
        if value not in choices:
            raise SubloraError(f"{value!r} is not one of {', '.join(choices)}.")

    return check


def positive(value: float) -> None:
    """A size or count must be above 0."""
    if value <= 0:
        raise SubloraError(f"{value:g} is not positive.")


def device_syntax(value: str) -> None:
    """A device name torch can parse; whether the machine has it is checked when the model is loaded."""
    try:
        torch.device(value)
    except RuntimeError:
        raise SubloraError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from None


def non_negative(value: int) -> None:
    if value < 0:
        raise SubloraError(f"{value}: must be 0 or more.")


def sweep_budgets_syntax(value: str) -> None:
    """--budgets errors never depend on the adapter's total rank, so any rank checks the syntax."""
    parse_budgets(value, total_rank=1)


def usage_check(check: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A Typer callback: a malformed flag value is a usage error (exit 2) carrying the check's message."""

    def callback(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except SubloraError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return callback


def choice_callback(choices: tuple[str, ...]):
    """Validate an optional string option against `choices` (a usage error, exit 2, names the valid ones)."""
    return usage_check(one_of(choices))


# Syntax checks of prune settings: flags get them as callbacks (exit 2), --config values after the merge (exit 1).
SETTING_CHECKS: dict[str, Callable[[Any], object]] = {
    "budget": read_budget,
    "method": one_of(METHODS),
    "curvature": one_of(CURVATURES),
    "min_rank": non_negative,
    "max_rank": non_negative,
    "max_loss_increase": read_tolerance,
    "device": device_syntax,
    "dtype": one_of(tuple(DTYPES)),
    "max_hessian_gb": positive,
    "max_batches": positive,
}
positive_callback = usage_check(positive)


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
        print(strict_json(info))
        return
    table = Table(title=escape(f"{adapter}  ({loaded.format.name})"), title_justify="left")
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
            escape(m["name"]),
            "×".join(map(str, m["shape"])),
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
    out.print(table)
    t = info["totals"]
    out.print(
        f"[bold]{t['modules']}[/] modules, total rank [bold]{t['rank']}[/], "
        f"{t['params']:,} parameters, {human_bytes(t['bytes'])}.  "
        "Columns 50/90/99%: components needed for that share of ‖ΔW‖F²."
    )
    for warning in info["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}")


@app.command(name="prune")
def prune_command(
    adapter: Annotated[
        Path | None, typer.Argument(help="PEFT LoRA adapter directory (or `adapter:` in --config).", show_default=False)
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            "-b",
            help="Components to keep in total: a rank (50), a percentage (25%) or a fraction below 1 (0.25). "
            "Required.",
            show_default=False,
            callback=usage_check(read_budget),
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory.", show_default="a sibling <adapter>-pruned-<budget>"),
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib",
            "-c",
            help="Calibration script (load_model, batches, loss[, evaluate, per_sample_loss]); runs its code. "
            "Enables the calibrated methods and measured loss before/after.",
            show_default=False,
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
    curvature: Annotated[
        str | None,
        typer.Option(
            "--curvature",
            help=CURVATURE_HELP,
            show_default=DEFAULTS["curvature"],
            callback=choice_callback(CURVATURES),
        ),
    ] = None,
    min_rank: Annotated[
        int | None,
        typer.Option(
            "--min-rank",
            help="Every module keeps at least this many.",
            show_default="0",
            callback=usage_check(non_negative),
        ),
    ] = None,
    max_rank: Annotated[
        int | None,
        typer.Option(
            "--max-rank",
            help="No module keeps more than this.",
            show_default=False,
            callback=usage_check(non_negative),
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the randomized greedy (sublora-random).", show_default="0")
    ] = None,
    max_loss_increase: Annotated[
        str | None,
        typer.Option(
            "--max-loss-increase",
            help="Quality gate: exit 3 when the measured loss grows by more than this (0.05 or 5%, relative to "
            "the loss before). The output is still written.",
            show_default=False,
            callback=usage_check(read_tolerance),
        ),
    ] = None,
    max_hessian_gb: Annotated[
        float | None,
        typer.Option(
            "--max-hessian-gb",
            help=MATRIX_LIMIT_HELP,
            show_default=str(DEFAULTS["max_hessian_gb"]),
            callback=positive_callback,
        ),
    ] = None,
    max_batches: Annotated[
        int | None,
        typer.Option(
            "--max-batches",
            help=MAX_BATCHES_HELP,
            show_default=str(DEFAULTS["max_batches"]),
            callback=positive_callback,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Torch device for the calibration model.",
            show_default="cpu",
            callback=usage_check(device_syntax),
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help=f"Model dtype: {', '.join(DTYPES)}. Curvature accumulates in float64.",
            show_default="float32",
            callback=choice_callback(tuple(DTYPES)),
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML file with the same settings; flags override it.", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Prune ADAPTER to a rank budget and write the smaller adapter plus sublora_report.json/.md."""
    flags = dict(
        adapter=adapter,
        budget=budget,
        out=out_dir,
        calib=calib,
        method=method,
        curvature=curvature,
        min_rank=min_rank,
        max_rank=max_rank,
        seed=seed,
        max_loss_increase=max_loss_increase,
        max_hessian_gb=max_hessian_gb,
        max_batches=max_batches,
        device=device,
        dtype=dtype,
    )
    settings = merge(flags, load_config(config) if config is not None else {}, DEFAULTS)
    if settings["adapter"] is None:
        raise typer.BadParameter("give the adapter directory (or `adapter:` in --config).", param_hint="ADAPTER")
    if settings["budget"] is None:
        raise typer.BadParameter("a budget is required (or `budget:` in --config).", param_hint="--budget")
    for key, check in SETTING_CHECKS.items():
        if flags[key] is None and settings[key] is not None:  # flags were checked by their callbacks
            try:
                check(settings[key])
            except SubloraError as e:
                raise SubloraError(f"--config: {key} {e}") from None
    options = PruneOptions(
        budget=str(settings["budget"]),
        method=settings["method"],
        calib=_path(settings["calib"]),
        curvature=settings["curvature"],
        min_rank=settings["min_rank"],
        max_rank=settings["max_rank"],
        seed=settings["seed"],
        max_loss_increase=None if settings["max_loss_increase"] is None else str(settings["max_loss_increase"]),
        max_hessian_gb=float(settings["max_hessian_gb"]),
        max_batches=settings["max_batches"],
        device=settings["device"],
        dtype=settings["dtype"],
    )
    with live_progress(quiet=as_json) as (progress, info):
        result = prune(
            Path(settings["adapter"]),
            options,
            out_dir=_path(settings["out"]),
            overwrite=overwrite,
            progress=progress,
            info=info,
        )
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if as_json:
        print(strict_json(result.report))
    else:
        print_prune_summary(result.report, result.out_dir)
    if result.quality_failure:
        raise QualityGateFailed(result.quality_failure)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


@contextmanager
def live_progress(quiet: bool = False) -> Iterator[tuple]:
    """Progress bars and news lines on stderr (stdout stays clean for --json)."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=quiet,
    )
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    def info(message: str) -> None:
        if not quiet:
            err.print(f"[dim]{escape(message)}[/]", highlight=False)

    with bar:
        yield progress, info


def print_prune_summary(report: dict, out_dir: Path) -> None:
    table = Table(title=f"method {report['method']}, budget {report['budget']['resolved']}", title_justify="left")
    for column in ("module", "shape", "rank", "kept σ"):
        table.add_column(column, justify="left" if column != "rank" else "right")
    for m in report["modules"]:
        style = "dim" if m["rank_after"] == m["rank_before"] else ("red" if m["rank_after"] == 0 else "")
        table.add_row(
            escape(m["name"]),
            "×".join(map(str, m["shape"])),
            f"{m['rank_before']} → {m['rank_after']}",
            sparkline(m["sigma"], width=30),
            style=style,
        )
    out.print(table)
    budget, t = report["budget"], report["totals"]
    out.print(
        f"budget {escape(budget['requested'])}, read as a {budget['reading']}: "
        f"{budget['resolved']} of {t['rank_before']} components"
    )
    out.print(
        f"rank {t['rank_before']} → [bold]{t['rank_after']}[/], parameters {t['params_before']:,} → "
        f"[bold]{t['params_after']:,}[/], {human_bytes(t['bytes_before'])} → [bold]{human_bytes(t['bytes_after'])}[/]"
    )
    if report["loss"]:
        loss = report["loss"]
        predicted = loss["predicted_increase"]
        out.print(
            f"loss {loss['before']:.4g} → [bold]{loss['after']:.4g}[/] (measured increase {loss['increase']:.3g}, "
            f"{loss['relative_increase']:+.1%}; predicted {'n/a' if predicted is None else format(predicted, '.3g')})"
            f", curvature {report['curvature']}"
        )
    if report["metrics"]:
        for name, before in report["metrics"]["before"].items():
            after = report["metrics"]["after"].get(name, float("nan"))
            out.print(f"{escape(name)} {before:.4g} → [bold]{after:.4g}[/]")
    out.print(escape(f"wrote {out_dir} (adapter + sublora_report.json, sublora_report.md)"))


@app.command(name="eval")
def eval_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", show_default=False)],
    calib: Annotated[Path, typer.Option("--calib", "-c", help="Calibration script.", show_default=False)],
    device: Annotated[
        str,
        typer.Option(
            "--device", help="Torch device for the calibration model.", callback=usage_check(device_syntax)
        ),
    ] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help=f"Model dtype: {', '.join(DTYPES)}.", callback=choice_callback(tuple(DTYPES))),
    ] = "float32",
    max_batches: Annotated[
        int, typer.Option("--max-batches", help=MAX_BATCHES_HELP, callback=positive_callback)
    ] = DEFAULTS["max_batches"],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Print ADAPTER's calibration loss and the script's evaluate() metrics."""
    with live_progress(quiet=as_json) as (progress, _):
        result = evaluate_adapter(
            adapter, calib, device=device, dtype=dtype, max_batches=max_batches, progress=progress
        )
    if as_json:
        print(strict_json(result))
        return
    out.print(escape(f"{adapter}: total rank {result['total_rank']}, {result['batches']} calibration batches"))
    out.print(f"loss [bold]{result['loss']:.6g}[/]")
    for name, value in (result["metrics"] or {}).items():
        out.print(f"{escape(name)} [bold]{value:.6g}[/]")


@app.command(name="sweep")
def sweep_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", show_default=False)],
    calib: Annotated[Path, typer.Option("--calib", "-c", help="Calibration script.", show_default=False)],
    budgets: Annotated[
        str,
        typer.Option(
            "--budgets",
            help="A list (10,20,40 or 10%,25%) or a range start:stop:step (10:100:10).",
            callback=usage_check(sweep_budgets_syntax),
        ),
    ] = "10:90:10",
    methods: Annotated[
        str,
        typer.Option(
            "--methods", help=f"Comma-separated, from: {', '.join(METHODS)}.", callback=usage_check(parse_methods)
        ),
    ] = ",".join(DEFAULT_METHODS),
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of sublora-random, comma-separated.")] = "0,1,2",
    curvature: Annotated[
        str,
        typer.Option("--curvature", help=CURVATURE_HELP, callback=choice_callback(CURVATURES)),
    ] = DEFAULTS["curvature"],
    min_rank: Annotated[
        int,
        typer.Option("--min-rank", help="Every module keeps at least this many.", callback=usage_check(non_negative)),
    ] = 0,
    max_rank: Annotated[
        int | None,
        typer.Option(
            "--max-rank",
            help="No module keeps more than this.",
            show_default=False,
            callback=usage_check(non_negative),
        ),
    ] = None,
    max_hessian_gb: Annotated[
        float, typer.Option("--max-hessian-gb", help=MATRIX_LIMIT_HELP, callback=positive_callback)
    ] = DEFAULTS["max_hessian_gb"],
    max_batches: Annotated[
        int, typer.Option("--max-batches", help=MAX_BATCHES_HELP, callback=positive_callback)
    ] = DEFAULTS["max_batches"],
    device: Annotated[
        str,
        typer.Option(
            "--device", help="Torch device for the calibration model.", callback=usage_check(device_syntax)
        ),
    ] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help=f"Model dtype: {', '.join(DTYPES)}.", callback=choice_callback(tuple(DTYPES))),
    ] = "float32",
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Run the script's evaluate() for every selection.")
    ] = True,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory.", show_default="a sibling <adapter>-sweep")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sweep as JSON on stdout.")] = False,
) -> None:
    """Compute the curvature once and tabulate predicted and measured loss for every budget × method."""
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{seeds!r} is not a comma-separated list of integers.", param_hint="--seeds"
        ) from None
    options = SweepOptions(
        budgets=budgets,
        methods=parse_methods(methods),
        seeds=seed_list or [0],
        calib=calib,
        curvature=curvature,
        min_rank=min_rank,
        max_rank=max_rank,
        max_hessian_gb=max_hessian_gb,
        max_batches=max_batches,
        device=device,
        dtype=dtype,
        evaluate=evaluate,
    )
    with live_progress(quiet=as_json) as (progress, info):
        result = sweep(adapter, options, out_dir=out_dir, overwrite=overwrite, progress=progress, info=info)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if as_json:
        print(strict_json({**result.meta, "rows": [asdict(r) for r in result.rows]}))
        return
    meta = result.meta
    metric_names = sorted({k for r in result.rows for k in (r.metrics_after or {})})
    table = Table(
        title=escape(f"{adapter}: loss before {meta['loss_before']:.4g}, curvature {meta['curvature']}"),
        title_justify="left",
    )
    for column in ("budget", "method", "rank", "predicted Δloss", "measured Δloss", "loss after", *metric_names):
        table.add_column(escape(column), justify="left" if column == "method" else "right")
    for r in result.rows:
        predicted = "n/a" if r.predicted_increase is None else f"{r.predicted_increase:.3g}"
        method_name = r.method if r.seed is None else f"{r.method} (seed {r.seed})"
        metrics = [f"{(r.metrics_after or {}).get(m, float('nan')):.4g}" for m in metric_names]
        table.add_row(
            str(r.budget),
            method_name,
            str(r.rank_after),
            predicted,
            f"{r.increase:.3g}",
            f"{r.loss_after:.4g}",
            *metrics,
        )
    out.print(table)
    out.print(escape("wrote " + ", ".join(str(p) for p in result.written)))


def main() -> None:
    """Entry point: maps errors onto the exit codes of DESIGN §2 (1 input/failure, 2 usage, 3 quality guard).

    Typer itself handles usage errors (exit 2) and --help; our own errors carry their exit code.
    """
    try:
        app()
    except SubloraError as e:
        if state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:
        if state["debug"]:
            raise
        err.print(
            f"[bold red]error:[/] unexpected {type(e).__name__}: {escape(str(e))}. "
            "Run again with --debug for the traceback.",
            highlight=False,
        )
        sys.exit(1)
