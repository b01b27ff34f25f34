"""The stages shared by the pipelines, and the pipelines behind `prune` and `eval` (`sweep`'s is in sweep.py):
read adapter → SVD form → (calibration → curvature) → select → (refit) → measure as written → write + report.

Each stage is a call into its own module; this file only wires them together and times them, so every
figure in the report can be traced to the stage that produced it (loss and metrics: calibrated.py;
curvature: curvature.py; kept sets, predicted increase and diagnostics: select.py; totals: report.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sublora_cli import distributed
from sublora_cli.adapters import Adapter, PrunedModule, read_adapter, write_adapter
from sublora_cli.alternating import alternate, plot_training
from sublora_cli.autobudget import AutoBudget, smallest_within
from sublora_cli.bounds import per_module
from sublora_cli.budget import (
    UNITS,
    Budget,
    BudgetSpec,
    Pricing,
    budget_unit,
    parse_tolerance,
    read_budget,
    read_tolerance,
    resolve_budget,
)
from sublora_cli.calibrated import Calibrated, check_batches_alike, open_calibration
from sublora_cli.calibration import DEFAULT_MAX_BATCHES
from sublora_cli.curvature import AUTO, Curvature, duration, estimate_cost
from sublora_cli.errors import SubloraError, UsageError
from sublora_cli.methods import METHODS, Need, lookup
from sublora_cli.optimizers import OPTIMIZERS
from sublora_cli.options import (
    CALIB,
    CURVATURE,
    DEFAULT_CURVATURE,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_MAX_HESSIAN_GB,
    DEVICE,
    DTYPE,
    MAX_BATCHES,
    MAX_HESSIAN_GB,
    MAX_RANK,
    MIN_RANK,
    REFIT,
    CalibrationSettings,
    EvalOptions,
    Option,
    at_least,
    echo,
    one_of,
    option,
    positive_finite,
    seed_range,
)
from sublora_cli.output import atomic_output_dir, check_output_dir, lock_output_dir
from sublora_cli.refit import RefitResult, psd_part, refit, written_spectrum
from sublora_cli.report import build_report, non_finite_metric_warnings, provenance, write_reports
from sublora_cli.select import RankBounds, Selection, select
from sublora_cli.spectra import adapter_spectra, stored_spectra
from sublora_cli.svd import Spectrum
from sublora_cli.training import TRAINS, TrainSettings, check_settings

Progress = Callable[[str, int, int | None], None]  # (stage, done, total); total None: not known yet
Info = Callable[[str], None]  # one line of news for the user


# --dtype-out values; "same" keeps every tensor as the input stored it.
DTYPES_OUT = {"same": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class PruneOptions:
    """Everything `sublora prune` can be told, by flags or by --config (the schema: see options.py)."""

    budget: str | None = option(  # None: auto when --max-loss-increase is given, else a usage error
        Option(
            ("--budget", "-b"),
            "What to keep: a total rank (50), a percentage (25%) or a fraction below 1 (0.25) of the adapter (in "
            "--budget-unit), a size in bytes of the written tensors (500KB, 12MiB, 1.5GB; SI powers of 1000, IEC "
            "KiB/MiB/GiB powers of 1024), a parameter count (300k, 2.5M), or auto: the smallest adapter within "
            "--max-loss-increase. Required unless --max-loss-increase is given.",
            check=read_budget,
            config_types=(str, int, float),
            show_default=False,
        ),
        None,
    )
    budget_unit: str | None = option(  # None: the budget's own unit (12MiB: bytes), else rank
        Option(
            ("--budget-unit",),
            f"What a percentage, a fraction or auto counts: {', '.join(UNITS)}.",
            check=one_of(UNITS),
            show_default="rank, or the unit --budget states",
        ),
        None,
    )
    method: str | None = option(  # None: "sublora" with a calibration script, "magnitude" without
        Option(
            ("--method", "-m"),
            f"Selection method: {', '.join(METHODS)}.",
            check=one_of(METHODS),
            show_default="sublora with --calib, else magnitude",
        ),
        None,
    )
    calib: Path | None = option(CALIB, None)
    curvature: str = option(CURVATURE, DEFAULT_CURVATURE)
    min_rank: str = option(MIN_RANK, 0)  # an int for every module, or patterns (bounds.py)
    max_rank: str | None = option(MAX_RANK, None)
    seed: int = option(
        Option(("--seed",), "Seed of the randomized greedy (sublora-random) and of --rounds.", check=seed_range), 0
    )
    max_loss_increase: str | None = option(  # "0.05" or "5%", relative to the loss before pruning
        Option(
            ("--max-loss-increase",),
            "With --budget: a quality gate, exit 3 when the measured loss grows by more than this (0.05 or 5%, "
            "relative to the loss before; the output is still written). Without (or --budget auto): find the "
            "smallest adapter whose measured increase is within it.",
            check=read_tolerance,
            config_types=(str, int, float),
            show_default=False,
        ),
        None,
    )
    max_hessian_gb: float = option(MAX_HESSIAN_GB, DEFAULT_MAX_HESSIAN_GB)
    max_batches: int = option(MAX_BATCHES, DEFAULT_MAX_BATCHES)
    device: str = option(DEVICE, DEFAULT_DEVICE)
    dtype: str = option(DTYPE, DEFAULT_DTYPE)
    refit: bool = option(REFIT, True)
    dtype_out: str = option(
        Option(
            ("--dtype-out",),
            f"Dtype of the written adapter (LoRA factors and carried tensors): {', '.join(DTYPES_OUT)}; same keeps "
            "the input's. Bytes budgets and the report's byte totals count it; the loss before is measured on the "
            "adapter in this dtype, so the increase is what pruning adds.",
            check=one_of(tuple(DTYPES_OUT)),
        ),
        "same",
    )

    rounds: int = option(
        Option(
            ("--rounds",),
            "Alternating SubLoRA (the paper's Algorithm 4): this many rounds of training the adapter on the script's "
            "train_batches() (else batches()) for --train-steps steps without the rank constraint, each followed by "
            "a prune to the budget (curvature recomputed); pruned components are re-initialised and may regrow. "
            "0: prune without training.",
            check=at_least(0),
        ),
        0,
    )
    train_steps: int = option(
        Option(("--train-steps",), "Training steps per round, one batch each.", check=at_least(1)), 200
    )
    optimizer: str = option(
        Option(
            ("--optimizer",),
            "Optimizer of the training rounds: "
            + "; ".join(f"{name}: {spec.description}" for name, spec in OPTIMIZERS.items())
            + ".",
            check=one_of(tuple(OPTIMIZERS)),
        ),
        "adam",
    )
    lr: float | None = option(
        Option(
            ("--lr",),
            "Peak learning rate of each round (linear warm-up over its first tenth, then cosine decay to 0).",
            check=positive_finite,
            show_default="per optimizer: "
            + ", ".join(f"{name} {spec.default_lr:g}" for name, spec in OPTIMIZERS.items())
            + "; with --train sigma: "
            + ", ".join(f"{name} {spec.sigma_lr:g}" for name, spec in OPTIMIZERS.items() if spec.sigma_lr),
        ),
        None,
    )
    train: str = option(
        Option(
            ("--train",),
            "What the rounds train: factors (B and A of every component, the paper's setting) or sigma (the "
            "singular values alone, U and V frozen: LoLDU-style, R parameters; adam or sgd).",
            check=one_of(TRAINS),
        ),
        "factors",
    )

    def resolved_method(self) -> str:
        if self.method is not None:
            return self.method
        return "sublora" if self.calib is not None else "magnitude"

    def train_settings(self) -> TrainSettings:
        spec = OPTIMIZERS[self.optimizer]
        default = spec.sigma_lr if self.train == "sigma" and spec.sigma_lr is not None else spec.default_lr
        lr = self.lr if self.lr is not None else default
        return TrainSettings(self.train, self.optimizer, lr, self.train_steps, self.seed)


@dataclass
class PruneResult:
    report: dict
    out_dir: Path
    warnings: list[str] = field(default_factory=list)
    quality_failure: str | None = None  # set when --max-loss-increase was exceeded (the output is written)


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def default_out_dir(adapter_path: Path, suffix: str) -> Path:
    """A sibling of the input named after it (a single file without its extension), so the input directory is
    never written into."""
    path = adapter_path.resolve()
    return path.parent / f"{path.stem if path.is_file() else path.name}-{suffix}"


def rank_bounds(adapter: Adapter, min_rank: int | str, max_rank: int | str | None) -> RankBounds:
    """Per-module bounds from --min-rank/--max-rank (one number or glob patterns, bounds.py)."""
    names = [m.name for m in adapter.modules]
    lower = per_module(names, min_rank, "--min-rank", 0)
    upper = per_module(names, max_rank, "--max-rank", None)
    for name, lo, hi in zip(names, lower, upper, strict=True):
        if hi is not None and hi < lo:
            where = "" if isinstance(max_rank, int) and isinstance(min_rank, int) else f" for {name}"
            raise SubloraError(f"--max-rank {hi} is below --min-rank {lo}{where}.")
    if upper and all(hi == 0 for hi in upper):
        raise SubloraError(
            "--max-rank 0 leaves no component in any module: the pruned adapter would be empty, which peft cannot "
            "load. Use --max-rank 1 or more."
        )
    ranks = [m.rank for m in adapter.modules]
    sizes = torch.tensor(ranks, dtype=torch.long)
    caps = torch.tensor([r if hi is None else hi for r, hi in zip(ranks, upper, strict=True)], dtype=torch.long)
    return replace(
        RankBounds.from_ranks(ranks),
        lower=torch.minimum(sizes, torch.tensor(lower, dtype=torch.long)),
        upper=torch.minimum(sizes, caps),
    )


def pruned_modules(adapter: Adapter, spectra: list[Spectrum], kept_mask: torch.Tensor) -> list[PrunedModule]:
    """Split the global kept mask into modules, each with its kept spectrum (the format's writer factors it)."""
    result = []
    offset = 0
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        kept = torch.nonzero(kept_mask[offset : offset + module.rank]).flatten().tolist()
        offset += module.rank
        result.append(PrunedModule.keeping(module, spectrum, kept))
    return result


def refit_modules(
    adapter: Adapter, spectra: list[Spectrum], sigma: torch.Tensor, kept_mask: torch.Tensor
) -> list[PrunedModule]:
    """The kept components of every module with the σ values of `sigma` (refit), in the form the writer stores
    (`written_spectrum`); every module is marked refit, so even one that keeps everything is rewritten."""
    result = []
    offset = 0
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        part = slice(offset, offset + module.rank)
        offset += module.rank
        kept = torch.nonzero(kept_mask[part]).flatten().tolist()
        result.append(PrunedModule(module, kept, written_spectrum(spectrum, sigma[part], kept), refit=True))
    return result


def _check_method(method: str, calib: Path | None, curvature: str) -> None:
    """A data-free method may be given --calib (the loss before and after is then measured); the others need it."""
    if lookup(method).needs_calibration and calib is None:
        raise SubloraError(f"--method {method} needs a calibration script (--calib calib.py); magnitude does not.")
    _check_curvature(method, curvature)


def _check_curvature(method: str, curvature: str) -> None:
    if lookup(method).needs == "matrix" and curvature == "diag":
        raise SubloraError(
            f"--method {method} needs the full Hessian but --curvature diag computes only its diagonal; "
            "use --curvature exact, or --method diag / linear."
        )


def _announce_curvature(calibrated: Calibrated, kind: str, requested: str, reason: str, info: Info | None) -> None:
    """Say up front which curvature is computed, why, and what it will cost, before minutes of work start."""
    if info is None:
        return
    R, n = calibrated.sigma_model.size, len(calibrated.batches)
    cost = estimate_cost(R, n, kind, calibrated.steady_loss_seconds(kind))
    hvps, passes = cost["hvps"], cost["passes"]
    work = f"{hvps:,} Hessian-vector products" if hvps else f"{passes:,} forward+backward passes"
    info(
        f"curvature {kind}: {work} (R = {R}, {n} batches), {cost['hessian_bytes'] / 2**20:.1f} MiB for the matrix, "
        f"about {duration(cost['seconds'])} (estimated from the loss evaluation; typically within 2×)"
    )
    if requested == AUTO:
        info(f"  chosen by --curvature auto: {reason}")


def _curvature(
    calibrated: Calibrated,
    requested: str,
    methods: list[str],
    max_hessian_gb: float,
    info: Info | None,
    progress: Progress | None,
    at_least: Need = "none",
) -> tuple[Curvature | None, str]:
    """The curvature `methods` (and `at_least`: the refit's need) ask for, resolving `auto` (which never picks a
    kind the model cannot run), with the reason for its kind; None when nothing asks (data-free, no refit)."""
    kind, reason = calibrated.choose_curvature(requested, methods, at_least)
    if kind == "none":
        return None, reason
    _announce_curvature(calibrated, kind, requested, reason, info)
    return calibrated.curvature(kind, max_hessian_gb, progress), reason


def _select(
    method: str, sigma: torch.Tensor, budget: Budget, bounds: RankBounds, curvature: Curvature | None, seed: int
) -> Selection:
    inputs = curvature.selection_inputs(method) if curvature is not None else {}
    try:
        selection = select(method, sigma, budget, bounds, seed=seed, **inputs)
    except ValueError as e:
        raise SubloraError(f"{e}.") from e
    _check_not_empty(selection, method)
    return selection


def _check_not_empty(selection: Selection, method: str) -> None:
    """An adapter with no component left is one peft cannot load: refuse it rather than write it."""
    if not bool(selection.kept.any()):
        raise SubloraError(
            f"--method {method} kept no component at all (its model predicts that every component increases the "
            "loss): the pruned adapter would be empty, which peft cannot load. Raise --min-rank to 1 to keep "
            "at least one component per module, or choose another --method."
        )


def _shortfall(selection: Selection, budget: Budget, method: str) -> list[str]:
    """A warning when less is kept than the budget allows, so a smaller file is not a surprise. What is left
    after the kept set is no shortfall when no component left out fits in it (bytes rarely add up exactly)."""
    kept = selection.kept.cpu()
    spent = float(budget.cost[kept].sum())
    left_out = budget.cost[~kept]
    if spent >= budget.capacity or not bool((left_out <= budget.capacity - spent).any()):
        return []
    why = {
        "sublora-random": "the randomized greedy picks a zero-gain 'dummy' in a step when that is among its draws "
        "(by design, for its guarantee on non-monotone objectives); use --method sublora for the full budget",
        "exhaustive": "a smaller set has a lower predicted loss under the quadratic model",
    }.get(method, "--max-rank caps the modules below it")
    return [f"{method} kept {spent:g} of the {budget.amount(budget.capacity)} the budget allows: {why}."]


def load_adapter(adapter_path: Path, timings: Timings) -> Adapter:
    with timings.stage("load"):
        return read_adapter(adapter_path)


def in_dtype(adapter: Adapter, dtype_out: str) -> Adapter:
    """The adapter with its factors and carried tensors rounded to `dtype_out`, before anything is measured: every
    format's writer stores (and copies) factors in the module's dtype, so what is measured is what is written."""
    dtype = DTYPES_OUT[dtype_out]
    if dtype is None:
        return adapter
    modules = [replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for m in adapter.modules]
    carried = {k: v.to(dtype) if v.is_floating_point() else v for k, v in adapter.carried.items()}
    return replace(adapter, modules=modules, carried=carried)


def output_dir(
    adapter_path: Path, out_dir: Path | None, suffix: str, overwrite: bool, reads: dict[str, Path | None]
) -> Path:
    """The output directory (default: a sibling named with `suffix`), checked — against the adapter and the other
    files the run `reads` too — and claimed against concurrent runs before any computation starts."""
    out_dir = out_dir if out_dir is not None else default_out_dir(adapter_path, suffix)
    check_output_dir(out_dir, adapter_path, overwrite, reads)
    if distributed.is_main():  # the rank that writes
        lock_output_dir(out_dir)
    return out_dir


def svd_form(adapter: Adapter, timings: Timings) -> list[Spectrum]:
    with timings.stage("svd"):
        return adapter_spectra(adapter)


@contextmanager
def calibration(
    settings: CalibrationSettings,
    adapter: Adapter,
    spectra: list[Spectrum],
    timings: Timings,
    progress: Progress | None,
) -> Iterator[Calibrated]:
    """The calibration script's model with the adapter in SVD form, closed (its hooks removed) however we leave."""
    with timings.stage("calibrate"):
        calibrated = open_calibration(
            settings.calib, adapter, spectra, settings.device, settings.dtype, settings.max_batches, progress
        )
    try:
        yield calibrated
    finally:
        calibrated.close()


def measure_before(calibrated: Calibrated, timings: Timings, evaluate: bool = True) -> tuple[float, dict | None]:
    with timings.stage("eval"):
        return calibrated.loss(), calibrated.metrics() if evaluate else None


def timed_curvature(
    calibrated: Calibrated,
    requested: str,
    methods: list[str],
    max_hessian_gb: float,
    timings: Timings,
    info: Info | None,
    progress: Progress | None,
    refit: bool = False,
) -> tuple[Curvature, str]:
    """The curvature of `_curvature`; with `refit` at least the matrix under `auto` (the refit steps with it)."""
    with timings.stage("curvature"):
        at_least: Need = "matrix" if refit else "none"
        return _curvature(calibrated, requested, methods, max_hessian_gb, info, progress, at_least)


def measure_written(
    calibrated: Calibrated, adapter: Adapter, pruned: list[PrunedModule], evaluate: bool = True
) -> tuple[float, dict[str, float] | None]:
    """Loss and metrics of the adapter as it will be written (the kept factors rounded to the storage dtype), so
    that `prune` and `sweep` report the same figures for the same kept set."""
    written = stored_spectra(adapter, pruned)
    return calibrated.loss_of(written), calibrated.metrics_of(written) if evaluate else None


@dataclass(frozen=True)
class Written:
    """A kept set as it is written: its modules, the measured loss with the kept σ as trained
    (`loss_after_selection`) and as written (`loss_after`: after the refit when one was accepted), the written
    adapter's metrics, and the refit's record (None when the refit did not run)."""

    pruned: list[PrunedModule]
    loss_after_selection: float
    loss_after: float
    metrics: dict[str, float] | None
    refit: RefitResult | None


Finish = Callable[[torch.Tensor], Written]  # kept mask → the adapter as written, measured


def refit_inputs(curvature: Curvature) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, PSD curvature) the refit steps with. The Fisher is PSD and, as in selection, comes without g
    (next to F the true g is on the wrong scale: curvature.selection_inputs); the exact Hessian (or its
    diagonal) is clipped to its PSD part once here, so a sweep's many refits share one eigendecomposition."""
    if curvature.kind == "fisher":
        return torch.zeros_like(curvature.gradient), curvature.hessian
    matrix = curvature.hessian if curvature.hessian is not None else torch.diag(curvature.hessian_diag)
    return curvature.gradient, psd_part(matrix)


def written_outcome(
    calibrated: Calibrated,
    adapter: Adapter,
    spectra: list[Spectrum],
    curvature: Curvature | None,
    refit_kept: bool,
    evaluate: bool = True,
) -> Finish:
    """Measure a kept set as written, first refitting its σ when `refit_kept`, a curvature is there and something
    was pruned (the refit compensates a cut; it is not further training). Every loss the refit compares is
    `measure_written`'s, the loss of the file, so `loss_after` is what users load."""
    sigma = torch.cat([s.sigma for s in spectra])
    inputs = refit_inputs(curvature) if refit_kept and curvature is not None else None

    def loss_with(candidate: torch.Tensor, kept: torch.Tensor) -> float:
        return measure_written(calibrated, adapter, refit_modules(adapter, spectra, candidate, kept), False)[0]

    def finish(kept: torch.Tensor) -> Written:
        pruned = pruned_modules(adapter, spectra, kept)
        selected = measure_written(calibrated, adapter, pruned, evaluate=False)[0]
        result = None
        if inputs is not None and not bool(kept.all()):  # nothing pruned: the adapter is written unchanged
            gradient, matrix = inputs
            movable = kept & (sigma != 0)  # a kept σ = 0 stays 0: its directions are arbitrary
            result = refit(sigma, movable, gradient, matrix, lambda c: loss_with(c, kept), selected, psd=True)
            if result.accepted:
                pruned = refit_modules(adapter, spectra, result.sigma, kept)
        metrics = calibrated.metrics_of(stored_spectra(adapter, pruned)) if evaluate else None
        after = result.loss_after_refit if result is not None else selected
        return Written(pruned, selected, after, metrics, result)

    return finish


def selected_loss(calibrated: Calibrated, adapter: Adapter, spectra: list[Spectrum]) -> Callable[[torch.Tensor], float]:
    """The measured loss of a kept set as written, σ as trained: what `--budget auto` bisects on (a refit after
    the search only lowers it, so the chosen budget stays within the tolerance)."""
    return lambda kept: measure_written(calibrated, adapter, pruned_modules(adapter, spectra, kept), False)[0]


def _time_refit(timings: Timings, result: RefitResult | None) -> None:
    """Move the refit's own time (its measured candidates) from the measuring stage to a `refit` stage."""
    if result is not None:
        timings["eval"] -= result.seconds
        timings["refit"] = timings.get("refit", 0.0) + result.seconds


def refit_record(result: RefitResult | None) -> dict | None:
    """The report's `refit` block (None when the refit did not run); its wall time is `timings.refit`, so that
    two runs' reports differ only in their timings."""
    if result is None:
        return None
    return {
        "accepted": result.accepted,
        "damping": result.damping,
        "step": result.step,
        "predicted_change": result.predicted_change,
        "measured_change": result.measured_change,
        "evaluations": result.evaluations,
    }


def without_adapter(calibrated: Calibrated, timings: Timings) -> float:
    """The calibration loss with every σ = 0 (the base model alone): what deleting the adapter would give."""
    with timings.stage("eval"):
        return calibrated.loss(torch.zeros(calibrated.sigma_model.size, dtype=torch.bool))


def worse_than_nothing(loss: dict) -> list[str]:
    """A warning when the pruned adapter's measured loss is above the base model's without any adapter."""
    if loss["without_adapter"] is None or not loss["after"] > loss["without_adapter"]:
        return []
    return [
        f"the pruned adapter is worse than no adapter at all: loss {loss['after']:.6g} after pruning, "
        f"{loss['without_adapter']:.6g} with the adapter removed (every σ = 0). Raise --budget."
    ]


def prune(
    adapter_path: Path,
    options: PruneOptions,
    out_dir: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    info: Info | None = None,
    config: Path | None = None,
) -> PruneResult:
    method = options.resolved_method()
    _check_method(method, options.calib, options.curvature)
    threshold = _quality_threshold(options)
    timings = Timings()
    warnings: list[str] = []

    spec = _budget_spec(options)
    _check_rounds(options, spec)
    adapter = in_dtype(load_adapter(adapter_path, timings), options.dtype_out)
    unit = budget_unit(spec, options.budget_unit)
    pricing = adapter_pricing(adapter)
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    allowance = None if spec.reading == "auto" else resolve_budget(spec, unit, pricing)
    reads = {"the calibration script": options.calib, "the --config file": config}
    out_dir = output_dir(adapter_path, out_dir, f"pruned-{_suffix(spec, allowance)}", overwrite, reads)
    if allowance is not None:
        allowance, unpruned = _whole_adapter_cap(allowance)
        warnings.extend(_nothing_to_prune(options.budget, allowance, unpruned, pricing.fixed(unit)))
    spectra = svd_form(adapter, timings)
    sigma = torch.cat([s.sigma for s in spectra])

    loss = metrics = alternated = None
    if options.calib is None:
        with timings.stage("select"):
            selection: Selection = _select(method, sigma, allowance, bounds, None, options.seed)
        warnings.extend(_shortfall(selection, allowance, method))
        pruned = pruned_modules(adapter, spectra, selection.kept)
        decision = Decision(None, None, selection, allowance, None, None)
    else:
        with calibration(options, adapter, spectra, timings, progress) as calibrated:
            loss_before, metrics_before = measure_before(calibrated, timings)
            loss_without = without_adapter(calibrated, timings)
            decide = _decider(
                calibrated, options, method, threshold, allowance, unit, bounds, pricing, loss_before, timings, info,
                progress,
            )  # fmt: skip
            if options.rounds:
                train_batches = _train_batches(calibrated, options, progress)
                alternated = alternate(
                    calibrated, adapter, spectra, options.train_settings(), options.rounds, train_batches, decide,
                    timings, progress, info,
                )  # fmt: skip
                adapter, spectra, decision = alternated.adapter, alternated.spectra, alternated.decision
            else:
                decision = decide(adapter, spectra, True)
        selection, allowance, written, curvature = (
            decision.selection, decision.allowance, decision.written, decision.curvature
        )  # fmt: skip
        warnings.extend(decision.warnings)
        pruned, metrics_after = written.pruned, written.metrics
        predicted = selection.predicted_increase if alternated is None else None  # a round's model is of its own start
        loss = loss_summary(loss_before, written.loss_after, predicted, curvature)
        loss.update(after_selection=written.loss_after_selection, without_adapter=loss_without)
        warnings.extend(worse_than_nothing(loss))
        metrics = {"before": metrics_before, "after": metrics_after} if metrics_before is not None else None
        warnings.extend(non_finite_metric_warnings(metrics_before, "before pruning"))
        warnings.extend(non_finite_metric_warnings(metrics_after, "after pruning"))

    quality = None
    if threshold is not None:
        passed = loss["relative_increase"] <= threshold
        quality = {"max_loss_increase": str(options.max_loss_increase), "threshold": threshold, "passed": passed}
    report = build_report(
        adapter=adapter,
        spectra=spectra,
        pruned=pruned,
        method=method,
        curvature=decision.curvature.kind if decision.curvature is not None else None,
        budget_requested=options.budget or "auto",
        budget_resolved=_resolved(allowance),
        budget_extra=_budget_block(allowance, pricing, selection, decision.search, threshold),
        bounds={"min_rank": options.min_rank, "max_rank": options.max_rank},
        selection=selection,
        seed=options.seed,
        timings=timings,
        loss=loss,
        metrics=metrics,
        calibration=_calibration_info(options, decision.curvature, decision.reason),
        quality=quality,
    )
    report["refit"] = refit_record(decision.written.refit if decision.written is not None else None)
    report["rounds"] = alternated.report() if alternated is not None else None
    report["options"] = echo(options)
    report["distributed"] = distributed.describe()
    if distributed.is_main():  # under torchrun every rank holds the same result; one writes it
        with atomic_output_dir(out_dir) as tmp:
            with timings.stage("write"):
                write_adapter(adapter, pruned, tmp, provenance(report))
            write_reports(report, tmp)
            title = f"{adapter_path.name}: {method}, --optimizer {options.optimizer}, --train {options.train}"
            if alternated is not None and not plot_training(alternated, loss["before"], tmp / TRAINING_PLOT, title):
                warnings.append(f"matplotlib is not installed: no {TRAINING_PLOT} (pip install 'sublora[plots]').")
    failure = None
    if quality is not None and not quality["passed"]:
        failure = (
            f"the measured loss increase {loss['relative_increase']:.2%} (loss {loss['before']:.6g} → "
            f"{loss['after']:.6g}) exceeds --max-loss-increase {options.max_loss_increase}; the pruned adapter "
            f"and report were written to {out_dir} anyway."
        )
    return PruneResult(report=report, out_dir=out_dir, warnings=warnings, quality_failure=failure)


TRAINING_PLOT = "training.png"


@dataclass(frozen=True)
class Decision:
    """One prune of a (possibly trained) adapter to the budget: the curvature it used and why, the selection, the
    budget it spent (found by the search under --budget auto), the kept set as written, and the warnings it
    raised. `prune` makes one; each round of --rounds makes one, and the last is the result."""

    curvature: Curvature | None
    reason: str | None
    selection: Selection
    allowance: Budget
    search: AutoBudget | None
    written: Written | None
    warnings: list[str] = field(default_factory=list)


def _decider(
    calibrated: Calibrated,
    options: PruneOptions,
    method: str,
    threshold: float | None,
    allowance: Budget | None,
    unit: str,
    bounds: RankBounds,
    pricing: Pricing,
    loss_before: float,
    timings: Timings,
    info: Info | None,
    progress: Progress | None,
) -> Callable[[Adapter, list[Spectrum], bool], Decision]:
    """curvature → selection (or the --budget auto search) → refit → measured as written, for an adapter and its
    SVD form; `evaluate`: also run the script's evaluate() on the result (the last round only)."""

    def decide(adapter: Adapter, spectra: list[Spectrum], evaluate: bool) -> Decision:
        sigma = torch.cat([s.sigma for s in spectra])
        warnings: list[str] = []
        curvature, reason = timed_curvature(
            calibrated, options.curvature, [method], options.max_hessian_gb, timings, info, progress, options.refit
        )
        warnings.extend(curvature.notes_for([method]) if curvature is not None else [])
        search = None
        budget = allowance
        if budget is None:
            with timings.stage("auto budget"):
                search = _auto_budget(
                    threshold, unit, pricing, method, sigma, bounds, curvature, options.seed, loss_before,
                    selected_loss(calibrated, adapter, spectra),
                )  # fmt: skip
            budget, selection = Budget(pricing.costs(unit), search.capacity, unit), search.selection
            if info is not None:
                info(_auto_news(search, budget, len(search.evaluations)))
        else:
            with timings.stage("select"):
                selection = _select(method, sigma, budget, bounds, curvature, options.seed)
        warnings.extend(_shortfall(selection, budget, method))
        warnings.extend(_uncompensated(method, options.refit))
        finish = written_outcome(calibrated, adapter, spectra, curvature, options.refit, evaluate)
        with timings.stage("eval"):
            written = finish(selection.kept)
        _time_refit(timings, written.refit)
        return Decision(curvature, reason, selection, budget, search, written, warnings)

    return decide


def _check_rounds(options: PruneOptions, spec: BudgetSpec) -> None:
    """--rounds trains on the calibration script's data towards one fixed budget."""
    if not options.rounds:
        return
    if options.calib is None:
        raise SubloraError("--rounds trains the adapter, which needs a calibration script (--calib calib.py).")
    if spec.reading == "auto":
        raise SubloraError(
            "--rounds needs a fixed --budget: the rounds train towards it, while auto would search a new budget "
            "after every round. Find one first (--budget auto without --rounds), then pass it with --rounds."
        )
    check_settings(options.train, options.optimizer)


def _train_batches(calibrated: Calibrated, options: PruneOptions, progress: Progress | None) -> list:
    """What the rounds train on: train_batches() when the script defines it, else the calibration batches."""
    with distributed.agreeing():  # under torchrun: a failure on one process fails them all, at once
        batches = calibrated.script.call_train_batches(options.max_batches, progress)
    if batches is None:
        return calibrated.batches
    check_batches_alike("train_batches", batches)
    return batches


def _uncompensated(method: str, refit_kept: bool) -> list[str]:
    """A compensating method's kept set and prediction assume the refit: say so when it is turned off."""
    if refit_kept or not lookup(method).compensates:
        return []
    return [
        f"--method {method} chose its kept set, and predicts its loss, counting on the refit of the kept σ, "
        "which --no-refit turns off: the kept σ are written as trained."
    ]


def _budget_spec(options: PruneOptions) -> BudgetSpec:
    """The written budget; none with --max-loss-increase is auto, none without it a usage error."""
    if options.budget is None:
        if options.max_loss_increase is None:
            raise UsageError(
                "--budget is required (a rank, a share, a size such as 12MiB or a parameter count such as 2.5M), "
                "unless --max-loss-increase is given: then sublora finds the smallest adapter within it."
            )
        return BudgetSpec("auto", 0.0)
    try:
        spec = read_budget(options.budget)
    except SubloraError as e:
        raise SubloraError(f"--budget {e}") from None
    if spec.reading == "auto" and options.max_loss_increase is None:
        raise UsageError("--budget auto needs --max-loss-increase: the loss increase the smallest adapter may have.")
    return spec


def adapter_pricing(adapter: Adapter) -> Pricing:
    """What every component and the carried tensors cost (design §5), in the adapter's stored dtype."""
    return Pricing(
        ranks=[m.rank for m in adapter.modules],
        widths=[sum(m.shape) for m in adapter.modules],
        element_sizes=[m.element_size for m in adapter.modules],
        carried_bytes=sum(t.numel() * t.element_size() for t in adapter.carried.values()),
    )


def _whole_adapter_cap(allowance: Budget) -> tuple[Budget, bool]:
    """The budget capped at the whole adapter, and whether it reached it (nothing to prune)."""
    whole = float(allowance.cost.sum())
    if allowance.capacity < whole:
        return allowance, False
    return replace(allowance, capacity=whole), True


def _nothing_to_prune(requested: str | None, allowance: Budget, unpruned: bool, fixed: int) -> list[str]:
    if not unpruned:
        return []
    whole = allowance.amount(allowance.capacity + fixed)
    if allowance.unit == "rank":
        whole = f"total rank {allowance.capacity:g}"
    return [f"--budget {requested} is at least the adapter's {whole}: nothing to prune, the adapter is written as is."]


def _suffix(spec: BudgetSpec, allowance: Budget | None) -> str:
    """The default output directory's suffix: the kept count of a rank budget, else the budget as written."""
    if allowance is not None and allowance.unit == "rank":
        return str(int(allowance.capacity))
    return "auto" if spec.reading == "auto" else f"{spec.value:g}".replace(".", "p") + spec.reading


def _resolved(allowance: Budget) -> int | float:
    """The report's `budget.resolved`: the kept count of a rank budget, else what the components may spend."""
    return int(allowance.capacity) if allowance.unit == "rank" else allowance.capacity


def _budget_block(
    allowance: Budget, pricing: Pricing, selection: Selection, search: AutoBudget | None, tolerance: float | None
) -> dict:
    """unit, capacity and used (the carried tensors included for bytes), what they carry, and the auto search."""
    fixed = pricing.fixed(allowance.unit)
    block = {
        "unit": allowance.unit,
        "capacity": allowance.capacity + fixed,
        "used": allowance.spent(selection.kept) + fixed,
        "carried": fixed,
        "whole": float(allowance.cost.sum()) + fixed,
    }
    if search is not None:
        block["search"] = search.summary(tolerance)
    return block


def _auto_budget(
    tolerance: float,
    unit: str,
    pricing: Pricing,
    method: str,
    sigma: torch.Tensor,
    bounds: RankBounds,
    curvature: Curvature | None,
    seed: int,
    loss_before: float,
    measure: Callable[[torch.Tensor], float],
) -> AutoBudget:
    """The smallest budget in `unit` whose selection's measured increase is within `tolerance` (autobudget.py)."""
    floor = sum(lo * c for lo, c in zip(bounds.lower.tolist(), pricing.per_module(unit), strict=True))
    return smallest_within(
        tolerance,
        pricing.costs(unit),
        floor,
        lambda budget: _select(method, sigma, budget, bounds, curvature, seed),
        measure,
        loss_before,
        unit,
    )


def _auto_news(search: AutoBudget, allowance: Budget, evaluations: int) -> str:
    return (
        f"--budget auto: {allowance.amount(search.capacity)} (rank {int(search.selection.kept.sum())}) after "
        f"{evaluations} loss evaluations"
    )


def _quality_threshold(options: PruneOptions) -> float | None:
    if options.max_loss_increase is None:
        return None
    if options.calib is None:
        raise SubloraError("--max-loss-increase needs --calib: without data there is no loss to measure.")
    return parse_tolerance(options.max_loss_increase, "--max-loss-increase")


def loss_summary(before: float, after: float, predicted: float | None, curvature: Curvature | None) -> dict:
    """Loss before/after with the measured and predicted increases (relative to |before|, 0 → inf-safe); the
    prediction is labelled with the curvature its model used (None when the method has no model of the loss)."""
    increase = after - before
    relative = increase / abs(before) if before != 0 else (0.0 if increase == 0 else float("inf"))
    return {
        "before": before,
        "after": after,
        "predicted_increase": predicted,
        "predicted_with": curvature.kind if predicted is not None and curvature is not None else None,
        "increase": increase,
        "relative_increase": relative,
    }


def _calibration_info(options: PruneOptions, curvature: Curvature | None, reason: str | None) -> dict | None:
    if options.calib is None:
        return None
    return {
        "script": str(options.calib),
        "batches": curvature.n_batches if curvature is not None else None,
        "samples": curvature.n_samples or None if curvature is not None else None,
        "device": options.device,
        "dtype": options.dtype,
        "curvature_requested": options.curvature,
        "curvature_reason": reason,
        "curvature_strategy": curvature.strategy if curvature is not None else None,
        "curvature_notes": curvature.notes_for([options.resolved_method()]) if curvature is not None else [],
    }


def evaluate_adapter(adapter_path: Path, options: EvalOptions, progress: Progress | None = None) -> dict:
    """`sublora eval`: the calibration loss and evaluate() metrics of an adapter as it is."""
    timings = Timings()
    adapter = load_adapter(adapter_path, timings)
    with calibration(options, adapter, adapter_spectra(adapter), timings, progress) as calibrated:
        loss, metrics = measure_before(calibrated, timings)
        return {
            "adapter": str(adapter_path),
            "calib": str(options.calib),
            "total_rank": adapter.total_rank,
            "batches": len(calibrated.batches),
            "loss": loss,
            "metrics": metrics,
        }
