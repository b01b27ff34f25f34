"""Format-neutral description of an adapter (every adapted module as a pair of matrix factors), what pruning
keeps of it, and the `Format` protocol each on-disk format implements."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from sublora_cli.core.svd import Spectrum
from sublora_cli.errors import SubloraError

LayerKind = Literal["linear", "embedding", "conv"]
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the SVD and writers compute in


def check_factor(what: str, tensor: torch.Tensor, rank_zero_ok: bool = False) -> None:
    """A stored factor sublora can compute with: a dtype of FACTOR_DTYPES, at least one entry (or, where the format
    saves modules trimmed to rank 0, `rank_zero_ok`: none), every entry finite. Every format reads its factors
    through this check, so a damaged file is refused by name in each."""
    if tensor.dtype not in FACTOR_DTYPES:
        hint = (
            " Convert the file first, e.g. with safetensors.torch: save_file({k: t.to(torch.float16) for k, t in "
            "load_file(path).items()}, new_path)."
            if tensor.is_floating_point()
            else " LoRA factors must be floating point."
        )
        raise SubloraError(
            f"{what} has dtype {str(tensor.dtype).removeprefix('torch.')}; sublora reads factors stored as "
            f"float16, bfloat16, float32 or float64.{hint}"
        )
    if tensor.numel() == 0 and not rank_zero_ok:
        raise SubloraError(
            f"{what} has shape {tuple(tensor.shape)}: no entries (rank 0 or an empty dimension). The adapter is "
            "damaged or holds an empty module; remove that module's tensors or save the adapter again."
        )
    if not torch.isfinite(tensor).all():
        raise SubloraError(
            f"{what} contains NaN or Inf values (entries must be finite); the adapter is damaged, refusing it."
        )


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
    """An adapter as read from disk: its LoRA modules, the tensors carried through untouched, and the format
    that read it (which writes the pruned adapter back). `state` is the format's own, opaque to everyone else
    (PEFT keeps its adapter_config.json there)."""

    path: Path
    format: Format
    sha256: str
    modules: list[LoraModule]
    carried: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. modules_to_save, trained biases
    state: Any = None

    @property
    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules)

    @property
    def fixed_bytes(self) -> int:
        """Bytes of tensors written whatever is kept: the carried tensors and the format's own (kohya's alphas)."""
        carried = sum(t.numel() * t.element_size() for t in self.carried.values())
        return carried + self.format.overhead_bytes(self)


@dataclass(frozen=True)
class PrunedModule:
    """One module after selection: which components stay and their spectrum. The format's writer chooses how
    to factor the kept spectrum (`Format.stored_factors`)."""

    module: LoraModule
    kept: list[int]  # indices into the module's sigma sorted in descending order
    spectrum: Spectrum  # the kept components: σ in float64 (a refit may change them), U out×k, V in×k
    refit: bool = False  # the kept σ differ from the trained ones (refit.py): the factors must be rewritten

    @classmethod
    def keeping(cls, module: LoraModule, spectrum: Spectrum, kept: list[int]) -> PrunedModule:
        """The `kept` components (distinct indices) of the module's full spectrum."""
        if len(kept) == spectrum.rank:  # all kept: share the spectrum rather than copy U and V
            return cls(module, kept, spectrum)
        idx = torch.as_tensor(kept, dtype=torch.long)
        return cls(module, kept, Spectrum(U=spectrum.U[:, idx], sigma=spectrum.sigma[idx], V=spectrum.V[:, idx]))

    @property
    def rank_after(self) -> int:
        return len(self.kept)

    @property
    def unchanged(self) -> bool:
        """Every component kept with its trained σ: the writer copies the original factors bit-exactly."""
        return self.rank_after == self.module.rank and not self.refit


class Format(Protocol):
    """One on-disk adapter format. `read_adapter` asks each registered format in turn whether it `detect`s a
    path (a directory or a single file), so detection must be cheap and must not raise.

    The writer's contract, which the pipeline's measurement relies on: a module pruned to rank 0 is dropped, an
    unchanged module is copied bit-exactly, and any other module is written as `stored_factors(adapter, module,
    kept)`, so that the loss measured on those factors is the loss of the written file.
    """

    name: str  # written to the report as input.format
    description: str  # what a path in this format looks like, for the error when no format recognises one

    def detect(self, path: Path) -> bool:
        """Whether `path` looks like this format (so `read` gives either an adapter or this format's error)."""
        ...

    def read(self, path: Path) -> Adapter: ...

    def stored_factors(
        self, adapter: Adapter, module: LoraModule, kept: Spectrum
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, scale): B and A as matrices (out×k, k×in), exactly as the writer stores them (factorisation and
        dtype), and the scale the written file gives the module at rank k, so that scale · B · A is the written
        update."""
        ...

    def overhead_bytes(self, adapter: Adapter) -> int:
        """At most how many bytes of tensors the writer stores besides the kept factors and the carried tensors,
        whatever is kept (kohya's `.alpha` scalars): a bytes budget pays for them first, like the carried ones."""
        ...

    def write(self, adapter: Adapter, pruned: list[PrunedModule], out_dir: Path, provenance: dict | None) -> None:
        """Write the pruned adapter into the existing, empty `out_dir` (a single-file format writes one file
        there); `provenance` (method, budget, report digest; None outside `prune`) may be recorded in it."""
        ...

    def model_tensor_name(self, key: str) -> str:
        """The base model's parameter that the carried tensor `key` replaces when the adapter is loaded."""
        ...

    def module_path(self, name: str, model_names: list[str]) -> str:
        """The path, among the calibration model's `model_names`, of the layer that module `name` adapts."""
        ...


def sha256_of(path: Path) -> str:
    """The input's digest for the report (read in 1 MiB chunks: adapters can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
