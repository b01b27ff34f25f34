"""A toy single-file adapter format, to prove that adding a format is one module plus one registry entry.

`NAME.toy.safetensors` holds, per adapted module, `MODULE.up` (out×r), `MODULE.down` (r×in) and `MODULE.scale`
(0-d), with ΔW = scale · up · down, and tensors carried into the base model as `carried.PARAMETER`. Unlike
PEFT it writes pruned modules unbalanced, up = U·diag(σ)/scale and down = Vᵀ (kohya's resize does the same),
and writes one file named like its input.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sublora_cli.core.svd import Spectrum
from sublora_cli.formats import Adapter, LoraModule, PrunedModule

SUFFIX = ".toy.safetensors"
CARRIED = "carried."


class ToyFormat:
    name = "toy"
    description = f"a toy file NAME{SUFFIX}"

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.name.endswith(SUFFIX)

    def read(self, path: Path) -> Adapter:
        tensors = load_file(str(path))
        names = sorted(k.removesuffix(".up") for k in tensors if k.endswith(".up"))
        modules = [module(name, tensors) for name in names]
        carried = {k: v for k, v in tensors.items() if k.startswith(CARRIED)}
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return Adapter(path=path, format=self, sha256=sha256, modules=modules, carried=carried)

    def stored_factors(self, module: LoraModule, kept: Spectrum) -> tuple[torch.Tensor, torch.Tensor]:
        up = kept.U * (kept.sigma / module.scale)
        return up.to(module.B.dtype), kept.V.T.to(module.A.dtype)

    def write(self, adapter: Adapter, pruned: list[PrunedModule], out_dir: Path, provenance: dict | None) -> None:
        tensors = dict(adapter.carried)
        for p in pruned:
            if p.rank_after == 0:
                continue
            up, down = (p.module.B, p.module.A) if p.unchanged else self.stored_factors(p.module, p.spectrum)
            tensors |= factors(p.module.name, up, down, p.module.scale)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / adapter.path.name))

    def model_tensor_name(self, key: str) -> str:
        return key.removeprefix(CARRIED)

    def module_path(self, name: str, model_names: list[str]) -> str:
        return name


def module(name: str, tensors: dict[str, torch.Tensor]) -> LoraModule:
    up, down, scale = tensors[f"{name}.up"], tensors[f"{name}.down"], tensors[f"{name}.scale"]
    return LoraModule(
        name=name,
        kind="linear",
        A=down,
        B=up,
        alpha=float(scale) * down.shape[0],
        scale=float(scale),
        a_shape=tuple(down.shape),
        b_shape=tuple(up.shape),
    )


def factors(name: str, up: torch.Tensor, down: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The tensors of one module as the toy file stores them."""
    return {f"{name}.up": up, f"{name}.down": down, f"{name}.scale": torch.tensor(scale, dtype=torch.float64)}


TOY = ToyFormat()
