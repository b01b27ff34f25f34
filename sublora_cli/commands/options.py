"""One schema for every setting of the pipelines: each is a dataclass field whose metadata says its flags, help,
syntax check and accepted `--config` types. The CLI flags, the --config keys, their defaults and the report's
`options` echo are all derived from these dataclasses, so a new setting is one new field.

`PruneOptions` (prune.py) and `SweepOptions` (sweep.py) list their fields; the settings they share are the
`Option` constants below, so they read the same in every command.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import torch
import typer

from sublora_cli.constants import (
    AUTO,
    AUTO_MAX_HVPS,
    AUTO_PLACEMENT,
    DEFAULT_HOLDOUT_FRACTION,
    DEFAULT_MAX_BATCHES,
    DEFAULT_MAX_HESSIAN_GB,
    HOLDOUT_AUTO,
    META_DEVICE,
    MIN_BATCHES_TO_SPLIT,
    MODEL_DTYPES,
    OUTPUT_DTYPES,
)
from sublora_cli.core.budget import UNITS
from sublora_cli.core.methods import CURVATURES as KINDS
from sublora_cli.core.rank_bounds import read_rank_bound
from sublora_cli.errors import SubloraError
from sublora_cli.model.holdout import read_holdout

SCHEMA = "sublora_option"  # the metadata key of a field's Option
Check = Callable[[Any], object]  # raises SubloraError on a malformed value


def one_of(choices: tuple[str, ...]) -> Check:
    """A check that a setting is one of `choices` (its error names the valid ones)."""

    def check(value: str) -> None:
        if value not in choices:
            raise SubloraError(f"{value!r} is not one of {', '.join(choices)}.")

    return check


def positive(value: float) -> None:
    """A size or count must be above 0 (NaN is not: `nan <= 0` is false, so the test is written the other way)."""
    if not value > 0:
        raise SubloraError(f"{value:g} is not positive.")


def positive_finite(value: float) -> None:
    """A rate must be a positive, finite number."""
    positive(value)
    if math.isinf(value):
        raise SubloraError(f"{value:g} is not a finite number.")


SEEDS = (-(2**63), 2**64 - 1)  # what torch's generators accept


def seed_range(value: int) -> None:
    if not SEEDS[0] <= value <= SEEDS[1]:
        raise SubloraError(f"{value} is outside the seeds torch accepts ({SEEDS[0]} to {SEEDS[1]}).")


def at_least(minimum: int) -> Check:
    """A check that a count is at least `minimum`."""

    def check(value: int) -> None:
        if value < minimum:
            raise SubloraError(f"{value} is below {minimum}.")

    return check


def device_syntax(value: str) -> None:
    """auto or a device name torch can parse; whether the machine has it is checked when the model is loaded."""
    if value == AUTO_PLACEMENT:
        return
    try:
        device = torch.device(value)
    except RuntimeError:
        raise SubloraError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from None
    if device.type == "meta":
        raise SubloraError(f"{value!r}: {META_DEVICE}; use cpu or cuda.")


@dataclass(frozen=True)
class Option:
    """How one setting is given: its flags and help, the check of its syntax (a flag that fails it is a usage
    error, exit 2; a --config value, an input error naming the key, exit 1), and the YAML types --config accepts
    (None: derived from the field's type). `parse` turns the flag's text into the field's value (lists)."""

    flags: tuple[str, ...]
    help: str
    check: Check | None = None
    config_types: tuple[type, ...] | None = None
    show_default: str | bool | None = None  # None: the field's default
    parse: Callable[[str], Any] | None = None


def option(spec: Option, default: Any = MISSING) -> Any:
    """A dataclass field described by `spec` (no default: the setting is required)."""
    return field(default=default, metadata={SCHEMA: spec})


CALIB = Option(
    ("--calib", "-c"),
    "Calibration script (load_model, batches, loss[, evaluate, per_sample_loss]); runs its code. "
    "Enables the calibrated methods and measured loss before/after.",
    show_default=False,
)
EVAL_CALIB = Option(
    ("--calib", "-c"),
    "Calibration script (load_model, batches, loss[, evaluate]); runs its code. eval prints the adapter's mean "
    "loss over its batches and its evaluate() metrics, as the adapter is.",
    show_default=False,
)
CURVATURES = (*KINDS, AUTO)
CURVATURE = Option(
    ("--curvature",),
    f"Curvature over σ: {', '.join(CURVATURES)}. auto computes the exact Hessian while R × batches ≤ "
    f"{AUTO_MAX_HVPS} Hessian-vector products, else the empirical Fisher (one pass per batch); diag is enough "
    "for --method diag/linear. See docs/curvature.md.",
    check=one_of(CURVATURES),
)
MIN_RANK = Option(
    ("--min-rank",),
    "Every module keeps at least this many; or per module by glob pattern on module names: q_proj=4,*=0.",
    config_types=(int, str),
    parse=read_rank_bound,
)
MAX_RANK = Option(
    ("--max-rank",),
    "No module keeps more than this; or per module by glob pattern on module names: mlp.*=32.",
    config_types=(int, str),
    show_default=False,
    parse=read_rank_bound,
)
MAX_HESSIAN_GB = Option(
    ("--max-hessian-gb",), "Refuse a Hessian or Fisher matrix (float64) larger than this many GB.", check=positive
)
MAX_BATCHES = Option(
    ("--max-batches",),
    "Stop with an error when batches() yields more than this many batches (an endless generator).",
    check=positive,
)
DEVICE = Option(
    ("--device",),
    "Torch device for the calibration model; auto keeps the model where load_model() put it (one or several "
    "devices) and sends batches to its first parameter's device.",
    check=device_syntax,
)
DTYPE = Option(
    ("--dtype",),
    f"Model dtype: {AUTO_PLACEMENT} (as load_model() returned it), {', '.join(MODEL_DTYPES)}. Curvature accumulates in "
    "float64.",
    check=one_of((AUTO_PLACEMENT, *MODEL_DTYPES)),
)

HOLDOUT = Option(
    ("--holdout",),
    "Calibration batches measured but never fitted, to check every data-driven decision (refit, budget search, "
    f"selection) on data it did not fit: {HOLDOUT_AUTO} takes the script's heldout_batches(), else "
    f"{DEFAULT_HOLDOUT_FRACTION:.0%} of batches() when there are {MIN_BATCHES_TO_SPLIT} or more; a fraction "
    "(0.25, 25%) splits batches(); 0 fits and checks on every batch.",
    config_types=(str, int, float),
    parse=read_holdout,
)
REFIT = Option(
    ("--refit/--no-refit",),
    "With --calib: after selection, refit the kept σ to absorb what the pruned ones carried (damped step on the "
    "PSD part of the curvature, kept only where the measured loss drops; docs/design.md).",
)

DEFAULT_CURVATURE, DEFAULT_DEVICE, DEFAULT_DTYPE = AUTO, AUTO_PLACEMENT, AUTO_PLACEMENT


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """How the calibration script's model is run: the group that eval, prune and sweep share."""

    calib: Path | None = option(CALIB, None)
    device: str = option(DEVICE, DEFAULT_DEVICE)
    dtype: str = option(DTYPE, DEFAULT_DTYPE)
    max_batches: int = option(MAX_BATCHES, DEFAULT_MAX_BATCHES)
    holdout: str = option(HOLDOUT, HOLDOUT_AUTO)  # "auto" or a fraction (read_holdout)


@dataclass(frozen=True, kw_only=True)
class SelectionOptions(CalibrationOptions):
    """How components are chosen and refit: the group that prune and sweep share."""

    curvature: str = option(CURVATURE, DEFAULT_CURVATURE)
    min_rank: str = option(MIN_RANK, 0)  # an int for every module, or patterns (core/rank_bounds.py)
    max_rank: str | None = option(MAX_RANK, None)
    max_hessian_gb: float = option(MAX_HESSIAN_GB, DEFAULT_MAX_HESSIAN_GB)
    refit: bool = option(REFIT, True)
    budget_unit: str | None = option(  # None: the budget's own unit (12MiB: bytes), else rank
        Option(
            ("--budget-unit",),
            f"What a percentage, a fraction or auto in --budget (--budgets) counts: {', '.join(UNITS)}.",
            check=one_of(UNITS),
            show_default="rank, or the unit --budget states",
        ),
        None,
    )
    dtype_out: str = option(
        Option(
            ("--dtype-out",),
            f"Dtype of the written adapter (LoRA factors and carried tensors): {', '.join(OUTPUT_DTYPES)}; same keeps "
            "the input's. Bytes budgets and the report's byte totals count it; the loss before is measured on the "
            "adapter in this dtype, so the increase is what pruning adds.",
            check=one_of(OUTPUT_DTYPES),
        ),
        "same",
    )


@dataclass(frozen=True, kw_only=True)
class EvalOptions(CalibrationOptions):
    """What `sublora eval` can be told: the calibration group, with the script required."""

    calib: Path = option(EVAL_CALIB)


@dataclass(frozen=True)
class Setting:
    """One field of an options dataclass with its Option and its value type (None stripped)."""

    name: str
    spec: Option
    kind: type
    default: Any  # MISSING when required

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def yaml_types(self) -> tuple[type, ...]:
        if self.spec.config_types is not None:
            return self.spec.config_types
        return {float: (int, float), Path: (str,)}.get(self.kind, (self.kind,))

    def flag_default(self) -> Any:
        """The default as the flag's value: a list as the text its Option parses."""
        return ",".join(map(str, self.default)) if isinstance(self.default, tuple | list) else self.default

    def shown_default(self) -> str | bool:
        if self.spec.show_default is not None:
            return self.spec.show_default
        return False if self.default in (MISSING, None) else str(self.flag_default())


def settings_of(cls: type) -> list[Setting]:
    """The schema of an options dataclass: the command's own settings first, then the shared groups it extends
    (so `--help` leads with what the command is about), each in field order."""
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls) if SCHEMA in f.metadata}
    order = [n for klass in cls.__mro__ for n in vars(klass).get("__annotations__", {}) if n in by_name]
    return [
        Setting(name, by_name[name].metadata[SCHEMA], _value_type(hints[name]), by_name[name].default)
        for name in dict.fromkeys(order)
    ]


def _value_type(hint: Any) -> type:
    """`int | None` → int; a list field is given as text (its Option parses it)."""
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    if isinstance(hint, types.UnionType) and len(args) == 1:
        hint = args[0]
    return str if getattr(hint, "__origin__", None) in (list, tuple) else hint


def config_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The --config keys of an options dataclass and the YAML types each accepts."""
    return {s.name: s.yaml_types for s in settings_of(cls)}


def cli_parameters(cls: type, reads_config: bool) -> list[inspect.Parameter]:
    """Keyword-only Typer parameters for every field of `cls`. Where the command `reads_config`, a flag not given
    is None so that the --config value or the default can fill it (the help names that default); elsewhere the
    flag carries the default itself, and a required field is a required flag."""
    params = []
    for s in settings_of(cls):
        if reads_config:
            default, show = None, s.shown_default()
        else:
            default = inspect.Parameter.empty if s.required else s.flag_default()
            show = s.spec.show_default if s.spec.show_default is not None else True
        typer_option = typer.Option(
            *s.spec.flags, help=s.spec.help, show_default=show, callback=_usage_check(s.spec.parse or s.spec.check)
        )
        annotation = s.kind | None if default is None else s.kind
        params.append(
            inspect.Parameter(
                s.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer_option]
            )
        )
    return params


def with_options(command: Callable, cls: type, reads_config: bool = False) -> Callable:
    """The signature Typer reads: `command`'s argument (its first parameter), the schema's flags, then the rest of
    `command`'s own parameters (its **flags receives the schema's)."""
    parameters = inspect.signature(command, eval_str=True).parameters.values()
    argument, *rest = [p for p in parameters if p.kind is not p.VAR_KEYWORD]
    own = [p.replace(kind=p.KEYWORD_ONLY) for p in rest]
    command.__signature__ = inspect.Signature([argument, *cli_parameters(cls, reads_config), *own])
    return command


def _usage_check(check: Check | None) -> Callable[[Any], Any] | None:
    """A Typer callback: a malformed flag value is a usage error (exit 2) carrying the check's message."""
    if check is None:
        return None

    def callback(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except SubloraError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return callback


def resolve(cls: type, flags: dict[str, Any], config: dict[str, Any] | None = None, reads_config: bool = False) -> Any:
    """Build `cls` from the flags (None: not given), else the --config values, else the defaults. Config values
    are checked here (flags were checked by their callbacks); a required setting given nowhere is a usage error
    (`reads_config`: the command reads --config, so the message says the key would do)."""
    config = config or {}
    values = {}
    for s in settings_of(cls):
        value = flags.get(s.name)
        if value is None and config.get(s.name) is not None:
            value = config[s.name]
            check = s.spec.parse or s.spec.check
            try:
                if check is not None:
                    check(value)
            except SubloraError as e:
                raise SubloraError(f"--config: {s.name} {e}") from None
        if value is None:
            if s.required:
                where = f" (or `{s.name}:` in --config)" if reads_config else ""
                raise typer.BadParameter(f"a value is required{where}.", param_hint=s.spec.flags[0])
            continue
        values[s.name] = s.spec.parse(value) if s.spec.parse is not None else s.kind(value)
    return cls(**values)


def echo(options: Any) -> dict[str, Any]:
    """The resolved value of every setting, JSON-ready (the report's `options`)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}


def path_keys(cls: type) -> tuple[str, ...]:
    """The settings that are paths (relative ones in a --config file are relative to the file)."""
    return tuple(s.name for s in settings_of(cls) if s.kind is Path)
