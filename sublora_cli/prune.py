"""The pruning pipeline: read adapter → SVD form → (calibration → curvature) → select → write + report.

Each stage is a call into its own module; this file only wires them together and times them, so every
figure in the report can be traced to the stage that produced it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sublora_cli.adapters import Adapter, PrunedModule, read_adapter, write_adapter
from sublora_cli.budget import parse_budget
from sublora_cli.errors import SubloraError
from sublora_cli.output import atomic_output_dir, check_output_dir
from sublora_cli.report import build_report, write_reports
from sublora_cli.select import NEEDS_CALIBRATION, RankBounds, Selection, select
from sublora_cli.spectra import adapter_spectra
from sublora_cli.svd import Spectrum, balanced_factors

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PruneOptions:
    """Everything `sublora prune` can be told, by flags or by --config."""

    budget: str
    method: str | None = None  # None: "sublora" with a calibration script, "magnitude" without
    calib: Path | None = None
    curvature: str = "exact"
    min_rank: int = 0
    max_rank: int | None = None
    seed: int = 0

    def resolved_method(self) -> str:
        if self.method is not None:
            return self.method
        return "sublora" if self.calib is not None else "magnitude"


@dataclass
class PruneResult:
    report: dict
    out_dir: Path
    warnings: list[str] = field(default_factory=list)


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def default_out_dir(adapter_path: Path, budget: int) -> Path:
    """A sibling of the input named after it, so the input directory is never written into."""
    path = adapter_path.resolve()
    return path.parent / f"{path.name}-pruned-{budget}"


def rank_bounds(adapter: Adapter, min_rank: int, max_rank: int | None) -> RankBounds:
    if min_rank < 0:
        raise SubloraError(f"--min-rank {min_rank}: must be 0 or more.")
    if max_rank is not None and max_rank < max(min_rank, 0):
        raise SubloraError(f"--max-rank {max_rank} is below --min-rank {min_rank}.")
    return RankBounds.from_ranks([m.rank for m in adapter.modules], min_rank=min_rank, max_rank=max_rank)


def pruned_modules(adapter: Adapter, spectra: list[Spectrum], kept_mask: torch.Tensor) -> list[PrunedModule]:
    """Split the global kept mask into modules and build each module's balanced factors."""
    result = []
    offset = 0
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        kept = torch.nonzero(kept_mask[offset : offset + module.rank]).flatten().tolist()
        offset += module.rank
        if 0 < len(kept) < module.rank:
            B, A = balanced_factors(spectrum, kept, module.scale)
        else:
            B = A = None
        result.append(PrunedModule(module=module, kept=kept, B=B, A=A))
    return result


def prune(
    adapter_path: Path,
    options: PruneOptions,
    out_dir: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PruneResult:
    method = options.resolved_method()
    if method in NEEDS_CALIBRATION and options.calib is None:
        raise SubloraError(f"--method {method} needs a calibration script (--calib calib.py); magnitude does not.")
    if options.calib is not None and method not in NEEDS_CALIBRATION:
        raise SubloraError(f"--method {method} is data-free; drop --calib or choose a calibrated method.")
    timings = Timings()
    warnings: list[str] = []

    with timings.stage("load"):
        adapter = read_adapter(adapter_path)
    budget = parse_budget(options.budget, adapter.total_rank)
    bounds = rank_bounds(adapter, options.min_rank, options.max_rank)
    out_dir = out_dir if out_dir is not None else default_out_dir(adapter_path, budget)
    check_output_dir(out_dir, adapter_path, overwrite)
    if budget >= adapter.total_rank:
        warnings.append(
            f"--budget {options.budget} resolves to {budget}, at least the adapter's total rank "
            f"{adapter.total_rank}: nothing to prune, the adapter is written unchanged."
        )

    with timings.stage("svd"):
        spectra = adapter_spectra(adapter)
    sigma = torch.cat([s.sigma for s in spectra])

    with timings.stage("select"):
        try:
            selection: Selection = select(method, sigma, min(budget, adapter.total_rank), bounds, seed=options.seed)
        except ValueError as e:
            raise SubloraError(str(e)) from e
    pruned = pruned_modules(adapter, spectra, selection.kept)

    report = build_report(
        adapter=adapter,
        spectra=spectra,
        pruned=pruned,
        method=method,
        curvature=None,
        budget_requested=options.budget,
        budget_resolved=budget,
        bounds={"min_rank": options.min_rank, "max_rank": options.max_rank},
        selection=selection,
        seed=options.seed,
        timings=timings,
    )
    with atomic_output_dir(out_dir) as tmp:
        with timings.stage("write"):
            write_adapter(adapter, pruned, tmp)
        write_reports(report, tmp)
    return PruneResult(report=report, out_dir=out_dir, warnings=warnings)
