"""What `sublora inspect` reports: per-module spectra and their summary figures, and adapter totals."""

from __future__ import annotations

from dataclasses import asdict

from sublora_cli.core.svd import Spectrum, factor_svd, spectrum_stats
from sublora_cli.formats import Adapter, PrunedModule
from sublora_cli.model.threads import intra_op_thread_count
from sublora_cli.pipeline.timings import Timings


def adapter_spectra(adapter: Adapter) -> list[Spectrum]:
    """The SVD form of every module, in the adapter's module order.

    On one intra-op thread: each module is two thin QRs and an r×r SVD, too small for a second thread to pay
    off, and on busy cores torch's thread pool made them 10× slower (800 SDXL modules: bench/sd_resize.py).
    """
    with intra_op_thread_count(1):
        return [factor_svd(m.B, m.A, m.scale) for m in adapter.modules]


def stored_spectra(adapter: Adapter, pruned: list[PrunedModule]) -> list[Spectrum]:
    """The SVD form of every module as the adapter's format writes it: unchanged modules (copied bit-exactly)
    keep their spectrum, modules pruned to rank 0 have none, and the others are the SVD of the format's stored
    factors, which is what users load (σ and directions can differ from the kept spectrum in half precision)."""
    result = []
    for p in pruned:
        if p.unchanged or p.rank_after == 0:
            result.append(p.spectrum)
        else:
            result.append(factor_svd(*adapter.format.stored_factors(p.module, p.spectrum), p.module.scale))
    return result


def describe_adapter(adapter: Adapter, spectra: list[Spectrum]) -> dict:
    """A JSON-ready description: one entry per module plus totals (LoRA factors only)."""
    modules = []
    for module, spectrum in zip(adapter.modules, spectra, strict=True):
        stats = spectrum_stats(spectrum.sigma)
        modules.append(
            {
                "name": module.name,
                "kind": module.kind,
                "shape": list(module.shape),
                "rank": module.rank,
                "alpha": module.alpha,
                "scale": module.scale,
                "sigma": [float(s) for s in spectrum.sigma],
                "dead": not bool(spectrum.sigma.any()),  # ΔW = 0: the module's update is zero
                **asdict(stats),
                "params": module.params,
                "bytes": module.params * module.element_size,
            }
        )
    return {
        "input": {"path": str(adapter.path), "sha256": adapter.sha256, "format": adapter.format.name},
        "modules": modules,
        "warnings": dead_module_warnings([m["name"] for m in modules if m["dead"]]),
        "totals": {
            "modules": len(modules),
            "rank": adapter.total_rank,
            "params": sum(m["params"] for m in modules),
            "bytes": sum(m["bytes"] for m in modules),
        },
    }


def dead_module_warnings(dead: list[str]) -> list[str]:
    """Say which modules have an all-zero update (e.g. lora_B never trained): pruning drops them first."""
    return [
        f"module {name}: every σ is 0, this module's update is zero (lora_B or lora_A all zero); it adds nothing "
        "to the model and pruning removes it first."
        for name in dead
    ]


def svd_form(adapter: Adapter, timings: Timings) -> list[Spectrum]:
    """Stage 2, SVD form: every module's ΔW as U diag(σ) Vᵀ, timed as the report's `svd`."""
    with timings.stage("svd"):
        return adapter_spectra(adapter)
