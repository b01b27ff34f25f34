"""ranks.png: where the budget went. For a transformer adapter (modules that repeat per layer) a layers × module
type heat map of the rank before and after; for anything else a bar per module, the rank before behind the rank
after. Drawn from the report's `modules`, so the picture shows exactly what was written.

A module name is split into its layer and its type at the index that follows the last container word (`layers`,
`h`, `blocks`, …): `model.layers.3.self_attn.q_proj` is layer `model.layers.3`, type `self_attn.q_proj`; kohya's
`lora_unet_…_transformer_blocks_0_attn1_to_q` is layer `lora_unet_…_transformer_blocks_0`, type `attn1_to_q`
(an index inside the type, as in `to_out.0`, stays part of the type).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sublora_cli.pipeline.output import pyplot

RANK_PLOT = "ranks.png"
CONTAINERS = ("layers", "layer", "h", "blocks", "block", "resblocks", "attentions", "resnets")  # before an index
_WORDS = re.compile(r"[^._]+")
ANNOTATE_UP_TO = 400  # cells; beyond that the numbers would be illegible


@dataclass(frozen=True)
class Grid:
    """Modules arranged as layers (rows) × module types (columns); a cell without a module is None. `prefix`: what
    every layer name starts with, left out of the row labels."""

    prefix: str
    layers: list[str]
    types: list[str]
    before: list[list[int | None]]
    after: list[list[int | None]]


def split_layer(name: str) -> tuple[str, str] | None:
    """(layer, type) of a module name, or None when it has no container word followed by an index and a type."""
    words = list(_WORDS.finditer(name))
    for i in range(len(words) - 3, -1, -1):
        if words[i].group() in CONTAINERS and words[i + 1].group().isdigit():
            first = i + 2  # the type's first word: indices right after the layer's (kohya's `input_blocks_4_1`) join it
            while first < len(words) - 1 and words[first].group().isdigit():
                first += 1
            return name[: words[first - 1].end()], name[words[first].start() :]
    return None


def _natural(text: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def layer_grid(modules: list[dict]) -> Grid | None:
    """The layers × types grid of the report's modules, or None when they are not a transformer's: some module has
    no layer index, there is a single layer, or no module type repeats over layers."""
    parts = [split_layer(m["name"]) for m in modules]
    if any(p is None for p in parts):
        return None
    layers = sorted(dict.fromkeys(layer for layer, _ in parts), key=_natural)
    types = sorted(set(kind for _, kind in parts))
    if len(layers) < 2 or len(parts) == len(types):
        return None
    row, col = {name: i for i, name in enumerate(layers)}, {name: j for j, name in enumerate(types)}
    before: list[list[int | None]] = [[None] * len(types) for _ in layers]
    after: list[list[int | None]] = [[None] * len(types) for _ in layers]
    for m, (layer, kind) in zip(modules, parts, strict=True):
        before[row[layer]][col[kind]] = m["rank_before"]
        after[row[layer]][col[kind]] = m["rank_after"]
    prefix = _common_prefix(layers)
    return Grid(prefix, [layer[len(prefix) :] for layer in layers], types, before, after)


def _common_prefix(names: list[str]) -> str:
    """The names' common beginning, up to and including its last separator (whole words only)."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    return prefix[: max(prefix.rfind("."), prefix.rfind("_")) + 1]


def rank_figure(modules: list[dict], title: str):
    """The figure of ranks.png (None without matplotlib): a heat map pair for a transformer, bars otherwise."""
    plt = pyplot()
    if plt is None:
        return None
    grid = layer_grid(modules)
    return _heat_maps(plt, grid, title) if grid is not None else _bars(plt, modules, title)


def _heat_maps(plt, grid: Grid, title: str):
    """The rank after per layer and type; the rank before beside it when it differs between modules, else in the
    title."""
    import numpy as np

    ranks_before = {v for row in grid.before for v in row if v is not None}
    panels = [(grid.after, "rank after")]
    if len(ranks_before) > 1:
        panels.insert(0, (grid.before, "rank before"))
    else:
        panels = [(grid.after, f"rank after (rank before: {ranks_before.pop()} in every module)")]
    rows, cols = len(grid.layers), len(grid.types)
    height = min(max(3.0, 0.3 * rows + 2.2), 40.0)
    width = min(max(6.0, len(panels) * (0.75 * cols + 1.0) + 2.5), 30.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), sharey=True, squeeze=False, layout="constrained")
    top = max(v for row in grid.before for v in row if v is not None) or 1
    image = None
    for ax, (values, label) in zip(axes[0], panels, strict=True):
        cells = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in values], float))
        image = ax.imshow(cells, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(cols), grid.types, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(rows), grid.layers, fontsize=7 if rows > 30 else 8)
        ax.set_xlabel("module type")
        ax.set_facecolor("0.92")  # cells without a module
        if rows * cols <= ANNOTATE_UP_TO:
            for (i, j), v in np.ndenumerate(cells.filled(-1)):
                if v >= 0:
                    ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7, color="w" if v < top / 2 else "k")
    axes[0][0].set_ylabel("layer" + (f" ({grid.prefix}N)" if grid.prefix else ""))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="rank (kept components)")
    fig.suptitle(title, fontsize=11)
    return fig


def _bars(plt, modules: list[dict], title: str):
    names = [m["name"] for m in modules]
    prefix = _common_prefix(names)
    labels = [name[len(prefix) :] for name in names]
    height = min(max(3.0, 0.25 * len(modules) + 1.5), 60.0)
    fig, ax = plt.subplots(figsize=(7.5, height), layout="constrained")
    positions = range(len(modules))
    ax.barh(positions, [m["rank_before"] for m in modules], color="0.8", label="rank before")
    ax.barh(positions, [m["rank_after"] for m in modules], height=0.5, color="tab:blue", label="rank after")
    ax.set_yticks(positions, labels, fontsize=7 if len(modules) > 30 else 8)
    ax.invert_yaxis()  # the first module on top, as in the report
    ax.set_xlabel("rank (kept components)")
    ax.set_ylabel("module" + (f" ({prefix}…)" if prefix else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return fig


def plot_ranks(modules: list[dict], path: Path, title: str) -> bool:
    """Write ranks.png; False when matplotlib is not installed."""
    fig = rank_figure(modules, title)
    if fig is None:
        return False
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return True
