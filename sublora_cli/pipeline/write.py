"""Stage 8, write + report: the pruned adapter in its own format, the JSON and markdown reports, and any extra
file a command draws (training.png), all into one atomic output folder (pipeline/output.py), so a crash never
leaves half an output. Under torchrun every rank computes the same result and the folder decides who writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sublora_cli.formats import Adapter, PrunedModule, write_adapter
from sublora_cli.pipeline.output import atomic_output_dir
from sublora_cli.pipeline.report import provenance, write_reports
from sublora_cli.pipeline.timings import Timings

Extra = Callable[[Path], bool]  # draws one more file into the folder; False when it could not (a missing extra)


def write_outputs(
    out_dir: Path, adapter: Adapter, pruned: list[PrunedModule], report: dict, timings: Timings, extras: list[Extra]
) -> list[bool]:
    """Write everything into `out_dir` at once; returns each extra's outcome."""
    with atomic_output_dir(out_dir) as folder:
        with timings.stage("write"):
            write_adapter(adapter, pruned, folder, provenance(report))
        write_reports(report, folder)
        return [extra(folder) for extra in extras]
