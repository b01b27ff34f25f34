"""What `sublora inspect` reports: per-module spectra and their summary figures, and adapter totals."""

from __future__ import annotations

from dataclasses import asdict

from sublora_cli.adapters import Adapter
from sublora_cli.svd import Spectrum, factor_svd, spectrum_stats


def adapter_spectra(adapter: Adapter) -> list[Spectrum]:
    """The SVD form of every module, in the adapter's module order."""
    return [factor_svd(m.B, m.A, m.scale) for m in adapter.modules]


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
                **asdict(stats),
                "params": module.params,
                "bytes": module.params * module.element_size,
            }
        )
    return {
        "input": {"path": str(adapter.path), "sha256": adapter.sha256, "format": adapter.format},
        "modules": modules,
        "totals": {
            "modules": len(modules),
            "rank": adapter.total_rank,
            "params": sum(m["params"] for m in modules),
            "bytes": sum(m["bytes"] for m in modules),
        },
    }
