"""`sublora prune`: the stages of pipeline/ composed in order —

    read → SVD form → [calibrate → [train → SVD form →]* decide (curvature → select → refit → measure)] → write

Every figure of the report comes from one stage: loss and metrics from pipeline/calibrate.py and
pipeline/written.py (measured by model/calibrated.py), curvature from pipeline/curvature_choice.py, kept sets and
the predicted increase from pipeline/choose.py (core/select.py), the budget block from pipeline/budgeting.py,
the rounds from training/rounds.py, and the totals from pipeline/report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sublora_cli.commands.options import (
    Option,
    SelectionOptions,
    at_least,
    echo,
    one_of,
    option,
    positive_finite,
    seed_range,
)
from sublora_cli.core.budget import budget_unit, read_budget, read_tolerance
from sublora_cli.core.methods import METHODS
from sublora_cli.errors import SubloraError
from sublora_cli.model import distributed
from sublora_cli.model.curvature import Curvature
from sublora_cli.pipeline.budgeting import (
    adapter_pricing,
    allowance_for,
    budget_block,
    budget_spec,
    nothing_to_prune,
    out_suffix,
    quality_threshold,
    resolved,
)
from sublora_cli.pipeline.calibrate import (
    calibration,
    heldout_before,
    measure_before,
    train_batches,
    without_adapter,
)
from sublora_cli.pipeline.choose import pruned_modules, rank_bounds, refuse_unselectable, select_kept, shortfall
from sublora_cli.pipeline.curvature_choice import check_method
from sublora_cli.pipeline.decide import Decision, Plan, Run, decide
from sublora_cli.pipeline.heldout import gated_increase, heldout_block, overfit_warnings
from sublora_cli.pipeline.rank_plot import RANK_PLOT, plot_ranks
from sublora_cli.pipeline.read import in_dtype, load_adapter, output_dir
from sublora_cli.pipeline.report import build_report, non_finite_metric_warnings
from sublora_cli.pipeline.spectra import svd_form
from sublora_cli.pipeline.timings import Info, Progress, Timings
from sublora_cli.pipeline.write import write_outputs
from sublora_cli.pipeline.written import loss_summary, refit_record, worse_than_nothing
from sublora_cli.training.loop import TRAINS, TrainSettings, check_settings
from sublora_cli.training.optimizers import OPTIMIZERS
from sublora_cli.training.rounds import alternate, plot_training

TRAINING_PLOT = "training.png"


@dataclass(frozen=True, kw_only=True)
class PruneOptions(SelectionOptions):
    """Everything `sublora prune` can be told, by flags or by --config (the schema: see options.py): the shared
    calibration and selection groups, and the budget, method, output and training settings."""

    budget: str | None = option(  # None: auto when --max-loss-increase is given, else a usage error
        Option(
            ("--budget", "-b"),
            "What to keep: a total rank (50), a percentage (25%) or a fraction below 1 (0.25) of the adapter (in "
            "--budget-unit; a number of 1 or more is a rank even with a decimal point: 1.0 keeps one component), a "
            "size in bytes of the written tensors (500KB, 12MiB, 1.5GB; SI powers of 1000, IEC KiB/MiB/GiB powers of "
            "1024), a parameter count (300k, 2.5M), or auto: the smallest adapter within --max-loss-increase. "
            "Required unless --max-loss-increase is given.",
            check=read_budget,
            config_types=(str, int, float),
            show_default=False,
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
    check_method(method, options.calib, options.curvature)
    threshold = quality_threshold(options.max_loss_increase, options.calib)
    timings = Timings()
    warnings: list[str] = []

    spec = budget_spec(options.budget, options.max_loss_increase)
    check_rounds(options, spec.reading)
    adapter = in_dtype(load_adapter(adapter_path, timings), options.dtype_out)
    unit = budget_unit(spec, options.budget_unit)
    pricing = adapter_pricing(adapter)
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    allowance = None
    if spec.reading != "auto":
        allowance, unpruned = allowance_for(spec, unit, pricing)
        warnings.extend(nothing_to_prune(options.budget, allowance, unpruned, pricing.fixed(unit)))
        refuse_unselectable(method, allowance, bounds)
    reads = {"the calibration script": options.calib, "the --config file": config}
    out_dir = output_dir(adapter_path, out_dir, out_suffix(method, options.budget), overwrite, reads)
    spectra = svd_form(adapter, timings)

    loss = metrics = alternated = None
    if options.calib is None:
        assert allowance is not None, "a data-free prune has a fixed budget (auto needs --calib)"
        with timings.stage("select"):
            sigma = torch.cat([s.sigma for s in spectra])
            selection = select_kept(method, sigma, allowance, bounds, None, options.seed)
        warnings.extend(shortfall(selection, allowance, method))
        pruned = pruned_modules(adapter, spectra, selection.kept)
        decision = Decision(None, None, selection, allowance, None, None)
    else:
        plan = Plan(
            method, options.curvature, options.max_hessian_gb, allowance, threshold, unit, pricing, bounds,
            options.refit, options.seed,
        )  # fmt: skip
        with calibration(options, adapter, spectra, timings, progress) as calibrated:
            loss_before, metrics_before = measure_before(calibrated, timings)
            heldout_loss_before = heldout_before(calibrated, timings)
            if info is not None:
                info(calibrated.holdout_note)
            loss_without = without_adapter(calibrated, timings)
            run = Run(calibrated, loss_before, timings, info, progress, heldout_loss_before)
            if options.rounds:
                batches = train_batches(calibrated, options.max_batches, progress)
                alternated = alternate(plan, run, adapter, spectra, options.train_settings(), options.rounds, batches)
                adapter, spectra, decision = alternated.adapter, alternated.spectra, alternated.decision
            else:
                decision = decide(plan, run, adapter, spectra, True)
        selection, written = decision.selection, decision.written
        assert written is not None, "a calibrated decision measures what it writes"
        warnings.extend(decision.warnings)
        pruned, metrics_after = written.pruned, written.metrics
        predicted = selection.predicted_increase if alternated is None else None  # a round's model is of its own start
        loss = loss_summary(loss_before, written.loss_after, predicted, decision.curvature)
        loss.update(
            after_selection=written.loss_after_selection,
            increase_after_selection=written.loss_after_selection - loss_before,
            without_adapter=loss_without,
            heldout=heldout_block(
                len(calibrated.heldout), calibrated.holdout_note, heldout_loss_before, written.heldout_after_selection,
                written.heldout_after,
            ),
        )  # fmt: skip
        if alternated is not None:
            loss["training_free"] = alternated.training_free  # a prune of the input adapter to the same budget
        warnings.extend(worse_than_nothing(loss) + overfit_warnings(loss))
        metrics = {"before": metrics_before, "after": metrics_after} if metrics_before is not None else None
        warnings.extend(non_finite_metric_warnings(metrics_before, "before pruning"))
        warnings.extend(non_finite_metric_warnings(metrics_after, "after pruning"))

    quality = None
    if threshold is not None:
        assert loss is not None, "a quality threshold needs --calib"
        increase, gated_before, gated_after, gated = gated_increase(loss)
        quality = {
            "max_loss_increase": str(options.max_loss_increase),
            "threshold": threshold,
            "passed": increase <= threshold,
            "measured_on": gated,
        }
    allowance = decision.allowance
    report = build_report(
        adapter=adapter,
        spectra=spectra,
        pruned=pruned,
        method=method,
        curvature=decision.curvature.kind if decision.curvature is not None else None,
        budget_requested=options.budget or "auto",
        budget_resolved=resolved(allowance),
        budget_extra=budget_block(allowance, pricing, selection, decision.search, threshold),
        bounds={"min_rank": options.min_rank, "max_rank": options.max_rank},
        selection=selection,
        seed=options.seed,
        timings=timings,
        loss=loss,
        metrics=metrics,
        calibration=calibration_info(options, decision.curvature, decision.reason),
        quality=quality,
    )
    report["refit"] = refit_record(decision.written.refit if decision.written is not None else None)
    report["rounds"] = alternated.report() if alternated is not None else None
    report["candidates"] = decision.candidates
    report["options"] = echo(options)
    report["distributed"] = distributed.describe()
    totals = report["totals"]
    ranks_title = f"{adapter_path.name}: {method}, --budget {options.budget or 'auto'}, "
    ranks_title += f"total rank {totals['rank_before']} → {totals['rank_after']}"
    extras = {RANK_PLOT: lambda folder: plot_ranks(report["modules"], folder / RANK_PLOT, ranks_title)}
    if alternated is not None:
        title = (
            f"{adapter_path.name}: {method}, budget {options.budget} (rank {int(selection.kept.sum())} kept)\n"
            f"--rounds {options.rounds} × {options.train_steps} steps, --optimizer {options.optimizer}, "
            f"--train {options.train}"
        )
        extras[TRAINING_PLOT] = lambda folder: plot_training(alternated, loss["before"], folder / TRAINING_PLOT, title)
    drawn = write_outputs(out_dir, adapter, pruned, report, timings, list(extras.values()))
    missing = [name for name, done in zip(extras, drawn, strict=True) if not done]
    if missing:
        warnings.append(f"matplotlib is not installed: no {', '.join(missing)} (pip install 'sublora[plots]').")
    failure = None
    if quality is not None and not quality["passed"]:
        failure = (
            f"the measured {gated} increase {increase:.2%} ({gated} {gated_before:.6g} → "
            f"{gated_after:.6g}) exceeds --max-loss-increase {options.max_loss_increase}; the pruned adapter "
            f"and report were written to {out_dir} anyway."
        )
    return PruneResult(report=report, out_dir=out_dir, warnings=warnings, quality_failure=failure)


def check_rounds(options: PruneOptions, reading: str) -> None:
    """--rounds trains on the calibration script's data towards one fixed budget."""
    if not options.rounds:
        return
    if options.calib is None:
        raise SubloraError("--rounds trains the adapter, which needs a calibration script (--calib calib.py).")
    if reading == "auto":
        raise SubloraError(
            "--rounds needs a fixed --budget: the rounds train towards it, while auto would search a new budget "
            "after every round. Find one first (--budget auto without --rounds), then pass it with --rounds."
        )
    check_settings(options.train, options.optimizer)


def calibration_info(options: PruneOptions, curvature: Curvature | None, reason: str | None) -> dict | None:
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
