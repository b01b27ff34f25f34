"""The `sublora` command line: parses arguments, calls the pipeline, prints (render.py). No computation lives here.

The options of `prune`, `sweep` and `eval` come from their schema (options.py): each command declares only its own
arguments (the adapter, --out, --config, --overwrite, --json) and receives the schema's flags as `**flags`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sublora_cli import __version__, interrupts
from sublora_cli.cli import render
from sublora_cli.cli.config import load_config
from sublora_cli.commands.evaluate import evaluate_adapter
from sublora_cli.commands.options import EvalOptions, config_types, path_keys, resolve, with_options
from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.commands.sweep import SweepOptions, sweep
from sublora_cli.errors import QualityGateFailed, SubloraError
from sublora_cli.formats import read_adapter
from sublora_cli.model import distributed
from sublora_cli.pipeline.output import completed_writes, forget_writes, release_locks
from sublora_cli.pipeline.report import strict_json
from sublora_cli.pipeline.spectra import adapter_spectra, describe_adapter, write_spectra_plot

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
state = {"debug": False}
EXIT_CODES = (
    "Exit codes: 0 success; 1 bad input or failure (one paragraph; --debug shows the traceback); 2 command-line "
    "usage, including a malformed flag value; 3 a quality guard (--max-loss-increase) failed, output still written."
)
ADAPTER_HELP = (
    "The adapter: a PEFT LoRA or AdaLoRA directory (as save_pretrained writes it), a kohya-ss / diffusers / "
    "ComfyUI LoRA .safetensors file (SD 1.x, SDXL, Flux; LoCon conv layers) or a LoLDU .safetensors file."
)
# --config keys of `prune`: its options plus where to read and write.
PRUNE_CONFIG = {"adapter": (str,), "out": (str,), **config_types(PruneOptions)}
PRUNE_PATHS = ("adapter", "out", *path_keys(PruneOptions))


def version_callback(value: bool) -> None:
    if value:
        render.out.print(f"sublora {__version__}")
        raise typer.Exit()


def debug_callback(value: bool) -> None:
    if value:
        state["debug"] = True


# `--debug` is accepted after the command too (`sublora sweep … --debug`), where users add it to a failed command.
Debug = Annotated[
    bool,
    typer.Option(
        "--debug", help="Show full tracebacks on errors.", callback=debug_callback, is_eager=True, expose_value=False
    ),
]


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


@app.command(epilog=EXIT_CODES)
def inspect(
    adapter: Annotated[Path, typer.Argument(help=ADAPTER_HELP, show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of tables.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Also draw every module's σ spectrum, one panel per module type, to this PNG.",
            show_default=False,
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Show each adapted module's singular-value spectrum and summary figures, then adapter totals."""
    loaded = read_adapter(adapter)
    description = describe_adapter(loaded, adapter_spectra(loaded))
    if plot is not None:
        write_spectra_plot(description, plot, f"{adapter} ({loaded.format.name}): singular values of ΔW")
    if as_json:
        print(strict_json(description))
    else:
        render.inspect_tables(description, adapter, loaded.format.name)
    if plot is not None:
        render.info(f"wrote {plot}")


def prune_command(
    adapter: Annotated[
        Path | None, typer.Argument(help=f"{ADAPTER_HELP} Or `adapter:` in --config.", show_default=False)
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output directory.", show_default="a sibling <adapter>-pruned-<method>-<budget>"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML file with the same settings; flags override it.", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    debug: Debug = False,
    **flags: Any,
) -> None:
    """Prune ADAPTER to a rank budget and write the smaller adapter plus sublora_report.json/.md."""
    settings = load_config(config, PRUNE_CONFIG, PRUNE_PATHS) if config is not None else {}
    adapter = adapter if adapter is not None else _path(settings.get("adapter"))
    if adapter is None:
        raise typer.BadParameter("give the adapter directory (or `adapter:` in --config).", param_hint="ADAPTER")
    options = resolve(PruneOptions, flags, settings, reads_config=True)
    with live_progress(quiet=as_json) as (progress, info):
        result = prune(
            adapter,
            options,
            out_dir=out_dir if out_dir is not None else _path(settings.get("out")),
            overwrite=overwrite,
            progress=progress,
            info=info,
            config=config,
        )
    render.warnings(result.warnings)
    if as_json:
        print(strict_json(result.report))
    else:
        render.prune_summary(result.report, result.out_dir)
    if result.quality_failure:
        raise QualityGateFailed(result.quality_failure)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


@contextmanager
def live_progress(quiet: bool = False) -> Iterator[tuple]:
    """Progress bars and news lines on stderr (stdout stays clean for --json); where stderr is a log, not a
    terminal, progress lines instead (render.LogProgress)."""
    if not quiet and not render.err.is_terminal:
        yield render.LogProgress(), render.info
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=render.err,
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
            render.info(message)

    with bar:
        yield progress, info


def eval_command(
    adapter: Annotated[Path, typer.Argument(help=ADAPTER_HELP, show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    debug: Debug = False,
    **flags: Any,
) -> None:
    """Print ADAPTER's calibration loss and the script's evaluate() metrics."""
    with live_progress(quiet=as_json) as (progress, _):
        result = evaluate_adapter(adapter, resolve(EvalOptions, flags), progress=progress)
    if as_json:
        print(strict_json(result))
    else:
        render.eval_lines(adapter, result)


def sweep_command(
    adapter: Annotated[Path, typer.Argument(help=ADAPTER_HELP, show_default=False)],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory.", show_default="a sibling <adapter>-sweep-<budgets>"),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sweep as JSON on stdout.")] = False,
    debug: Debug = False,
    **flags: Any,
) -> None:
    """Compute the curvature once and tabulate predicted and measured loss for every budget × method."""
    options = resolve(SweepOptions, flags)
    with live_progress(quiet=as_json) as (progress, info):
        result = sweep(adapter, options, out_dir=out_dir, overwrite=overwrite, progress=progress, info=info)
    render.warnings(result.warnings)
    if as_json:
        print(strict_json({**result.meta, "rows": [asdict(r) for r in result.rows]}))
    else:
        render.sweep_table(adapter, result.meta, result.rows, result.written)


app.command(name="prune", epilog=EXIT_CODES)(with_options(prune_command, PruneOptions, reads_config=True))
app.command(name="eval", epilog=EXIT_CODES)(with_options(eval_command, EvalOptions))
app.command(name="sweep", epilog=EXIT_CODES)(with_options(sweep_command, SweepOptions))


def main() -> None:
    """Entry point: maps errors onto the exit codes (1 input/failure, 2 usage, 3 quality guard, 128 + the signal's
    number when interrupted: 130 for Ctrl-C).

    Typer itself handles usage errors (exit 2) and --help; our own errors carry their exit code. Under torchrun
    every rank runs this; only rank 0 prints, and all ranks exit with the code they agreed on (distributed.py).
    """
    with interrupts.handled():
        try:
            code = _main()
        except interrupts.Interrupted as e:  # after the command: while the ranks agree or the error prints
            code = e.exit_code
            render.error(_interrupted(e))
    sys.exit(code)


def _main() -> int:
    try:
        distributed.check_environment()
    except SubloraError as e:  # e.g. a malformed SUBLORA_DIST_TIMEOUT: said once, by the first rank
        if distributed.launched_rank() == 0:
            render.error(str(e))
        return e.exit_code
    with distributed.process_group():
        if not distributed.is_main():
            _quiet()
        code, message = distributed.agreed_exit(*_outcome())
        if message is not None:
            render.error(message)
        distributed.finish()
    return code


def _outcome() -> tuple[int, str | None]:
    """Run the command: its exit code and the error message to print (None when it printed what it had to)."""
    forget_writes()
    try:
        app()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1), None
    except interrupts.Interrupted as e:
        if state["debug"]:
            raise
        return e.exit_code, _interrupted(e)
    except SubloraError as e:
        if state["debug"]:
            raise
        return e.exit_code, str(e)
    except Exception as e:
        if state["debug"]:
            raise
        return 1, f"unexpected {type(e).__name__}: {e}. For the traceback, run it again with --debug: {_with_debug()}"
    finally:
        release_locks()
    return 0, None


def _with_debug() -> str:
    """The command that failed, shortened, with --debug added where every command accepts it (at the end)."""
    command = sys.argv[1] if len(sys.argv) > 1 else "COMMAND"
    return f"sublora {command} … --debug" if len(sys.argv) > 2 else f"sublora {command} --debug"


def _interrupted(signal: interrupts.Interrupted) -> str:
    """What an interrupted run left: the --out it completed, or nothing (a previous output stays as it was)."""
    written = completed_writes()
    if written:
        return f"interrupted ({signal}) after writing {', '.join(map(str, written))}."
    return f"interrupted ({signal}); nothing was written (a previous output in --out is intact)."


def _quiet() -> None:
    """Silence a rank other than 0: rank 0 prints for the whole job (tables, progress, --json, errors)."""
    render.out.quiet = render.err.quiet = True
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
