"""Format-neutral description of an adapter: every adapted module as a pair of matrix factors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

LayerKind = Literal["linear", "embedding", "conv"]


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scale · B · A as matrices (B: out×r, A: r×in).

    `in` is flattened for convolutions (in_channels·kh·kw). For embeddings ΔW is dim×num_embeddings,
    i.e. the transpose of the embedding table's update. `fan_in_fan_out` layers (GPT-2's Conv1D) use
    the same A, B; only how the base model applies ΔW differs.
    """

    name: str  # module path inside the base model, e.g. "transformer.h.0.attn.c_attn"
    kind: LayerKind
    A: torch.Tensor  # r × in, dtype as stored
    B: torch.Tensor  # out × r, dtype as stored
    alpha: float
    scale: float
    a_shape: tuple[int, ...]  # shapes as stored, to write pruned factors back in the same layout
    b_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW as a matrix."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def params(self) -> int:
        out, inp = self.shape
        return self.rank * (out + inp)

    @property
    def element_size(self) -> int:
        return self.A.element_size()


@dataclass
class Adapter:
    """An adapter as read from disk: its LoRA modules plus everything carried through untouched."""

    path: Path
    format: str
    sha256: str
    config: dict
    modules: list[LoraModule]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save, biases
    use_rslora: bool = False

    @property
    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules)


@dataclass(frozen=True)
class PrunedModule:
    """What the writer needs for one module: which components stay, and their balanced factors."""

    module: LoraModule
    kept: list[int]  # indices into the module's sigma sorted in descending order
    B: torch.Tensor | None  # out × len(kept) (None when nothing or everything is kept)
    A: torch.Tensor | None  # len(kept) × in

    @property
    def rank_after(self) -> int:
        return len(self.kept)

    @property
    def unchanged(self) -> bool:
        return self.rank_after == self.module.rank
