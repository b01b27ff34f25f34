"""What `sublora inspect` reports: per-module spectra and their summary figures, and adapter totals."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from sublora_cli.core.svd import Spectrum, factor_svd, spectrum_stats
from sublora_cli.errors import SubloraError
from sublora_cli.formats import Adapter, PrunedModule
from sublora_cli.model.threads import intra_op_thread_count
from sublora_cli.pipeline.names import common_prefix, module_type, tail
from sublora_cli.pipeline.output import pyplot
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


MAX_PANELS, MAX_LEGEND = 8, 6  # module types drawn in panels of their own; modules named in a panel's legend


def write_spectra_plot(description: dict, path: Path, title: str) -> None:
    """`inspect --plot`: each module's σ (scale included) against its index on a log axis, one panel per module
    type (q_proj, attn1_to_q, fc1; past MAX_PANELS types the rarest share one), darker for earlier modules, so the
    spectra that fall fast (cheap to prune) stand apart from flat ones. The user asked for it: no matplotlib or
    no folder to write it in is an error."""
    plt = pyplot()
    if plt is None:
        raise SubloraError("--plot needs matplotlib, which is not installed: pip install 'sublora[plots]'.")
    if not path.parent.is_dir():
        raise SubloraError(f"--plot {path}: the folder {path.parent} does not exist.")
    modules = description["modules"]
    prefix = common_prefix([m["name"] for m in modules])
    groups: dict[str, list[dict]] = {}
    for m in modules:
        groups.setdefault(module_type(m["name"]), []).append(m)
    if len(groups) > MAX_PANELS:
        largest = sorted(groups, key=lambda kind: -len(groups[kind]))[: MAX_PANELS - 1]
        rest = [m for kind, members in groups.items() if kind not in largest for m in members]
        groups = {kind: groups[kind] for kind in groups if kind in largest} | {"other types": rest}
    columns = min(4, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns + 0.6, 3.0 * rows + 0.6), squeeze=False, sharey=True, layout="constrained"
    )
    from matplotlib.ticker import MaxNLocator  # matplotlib is optional: imported once pyplot() found it

    colormap = plt.get_cmap("viridis")
    for ax, (kind, members) in zip(axes.flat, groups.items(), strict=False):  # unused panels are hidden below
        for i, m in enumerate(members):
            positive = [(k + 1, s) for k, s in enumerate(m["sigma"]) if s > 0]  # a log axis cannot show σ = 0
            color = colormap(0.9 * i / max(1, len(members) - 1))
            label = tail(m["name"][len(prefix) :], 32)
            ax.plot([k for k, _ in positive], [s for _, s in positive], color=color, lw=1.2, label=label)
        count = f"{len(members)} module{'s' if len(members) > 1 else ''}"
        if len(members) <= MAX_LEGEND:
            ax.legend(fontsize=6)
        else:
            count += ", dark → light in name order"
        ax.set_title(f"{kind} ({count})", fontsize=9)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("component k")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("σ_k of ΔW (scale included)")
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
