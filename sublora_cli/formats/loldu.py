"""LoLDU adapters (Shi et al. 2024, reference code SKDDJ/LoLDU) stored as a safetensors file, pruned and written as
PEFT LoRA adapters.

LoLDU factors each adapted weight as W = P L D U (`torch.linalg.lu`, D = diag(U), U rows divided by D), keeps
P (out×out), L_r = L[:, :r], U_r = U[:r] frozen, and trains the diagonal z (initialised to D[:r]) and a scalar
scaling factor s (initialised to lora_alpha / r). At init it subtracts s₀ · P L_r diag(z₀) U_r from the base
weights, like PiSSA, so the update to the *original* base weights is

    ΔW = P L_r diag(s·z − s₀·z₀) U_r,

a rank-r product like any LoRA: B = P L_r and A = diag(s·z − s₀·z₀) U_r with scale 1. The reference code pickles
only the trained z, so this file layout is sublora's own; every module `<module>` (its path in the base model,
e.g. `model.layers.0.self_attn.q_proj`) has, in one `.safetensors` file:

    <module>.loldu_P       out×out   the permutation of the LU factorisation
    <module>.loldu_L       out×r     L_r (unit lower triangular columns)
    <module>.loldu_U       r×in      U_r (rows with a unit diagonal)
    <module>.loldu_z       r         the trained diagonal z
    <module>.loldu_z0      r         its initial value D[:r]
    <module>.loldu_scale   scalar    the trained scaling factor s
    <module>.loldu_scale0  scalar    its initial value

Without z₀ and s₀ the factors are not the update to the base model that users load, so such a file is refused.
The output is a PEFT LoRA directory (`peft_type: LORA`, target_modules = the module names) that
`PeftModel.from_pretrained` loads onto the original base model. Only linear layers are supported: the layout holds
no kernel size, and peft refuses the written shapes for a convolution rather than mis-applying them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import Adapter, LoraModule, check_factor, sha256_of
from sublora_cli.formats.kohya import CONVERT_HINT
from sublora_cli.formats.peft import PeftFormat, PeftState

SUFFIX = ".safetensors"
PICKLE_SUFFIX = ".pth"
FACTORS = ("P", "L", "U", "z", "z0", "scale", "scale0")
MARKER = ".loldu_z"  # a file with a key ending in this is a LoLDU file
LAYOUT_HINT = (
    "Save each module's factors as " + ", ".join(f"<module>.loldu_{f}" for f in FACTORS) + " in one .safetensors "
    "file with safetensors.torch.save_file (see the README's LoLDU section; the reference code pickles only z, so "
    "rebuild P, L, U and z0 with torch.linalg.lu of the original base weights)."
)


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


class LoLDUFormat(PeftFormat):
    """The `Format` of LoLDU safetensors files; it writes PEFT LoRA (the inherited writer)."""

    name = "loldu"
    description = f"a LoLDU file NAME{SUFFIX} with <module>.loldu_P/L/U/z/z0/scale/scale0 tensors"

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix == PICKLE_SUFFIX:
            return True  # refused by read() with the layout hint
        try:
            return path.name.endswith(SUFFIX) and any(k.endswith(MARKER) for k in _keys(path))
        except Exception:  # not readable as safetensors: some other format's business
            return False

    def read(self, path: Path) -> Adapter:
        if path.suffix == PICKLE_SUFFIX:
            raise SubloraError(
                f"{path} is a pickle (.pth); sublora reads only safetensors, because unpickling can run arbitrary "
                f"code. If it holds a LoRA state dict: {CONVERT_HINT} If it is a LoLDU checkpoint: {LAYOUT_HINT}"
            )
        tensors = _load(path)
        names = sorted(k.removesuffix(MARKER) for k in tensors if k.endswith(MARKER))
        known = {f"{name}.loldu_{factor}" for name in names for factor in FACTORS}
        unknown = sorted(set(tensors) - known)
        if unknown:
            listed = ", ".join(unknown[:3])
            raise SubloraError(f"{path} has tensors that are not LoLDU factors: {listed}. {LAYOUT_HINT}")
        modules = [_module(name, tensors) for name in names]
        config = {
            "peft_type": "LORA",
            "r": max(m.rank for m in modules),
            "lora_alpha": float(max(m.rank for m in modules)),  # scale 1 at every rank (alpha_pattern fills in)
            "target_modules": names,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
        }
        return Adapter(
            path=path,
            format=self,
            sha256=sha256_of(path),
            modules=modules,
            state=PeftState(config=config, use_rslora=False),
        )


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise SubloraError(f"{path} could not be read as safetensors: {e}.") from e


def _module(name: str, tensors: dict[str, torch.Tensor]) -> LoraModule:
    """ΔW = P L diag(s·z − s₀·z₀) U as LoRA factors B = P L, A = diag(…) U at scale 1, in L's dtype."""
    missing = [f"{name}.loldu_{f}" for f in FACTORS if f"{name}.loldu_{f}" not in tensors]
    if missing:
        initial_missing = any(k.endswith(("_z0", "_scale0")) for k in missing)
        why = " (z0 and scale0 are needed: LoLDU subtracted them from the base weights)" if initial_missing else ""
        raise SubloraError(f"Module {name}: the LoLDU file has no {', '.join(missing)}{why}. {LAYOUT_HINT}")
    P, L, U, z, z0, s, s0 = (tensors[f"{name}.loldu_{f}"] for f in FACTORS)
    r = L.shape[-1]
    shapes_ok = (
        P.dim() == L.dim() == U.dim() == 2
        and P.shape == (L.shape[0], L.shape[0])
        and U.shape[0] == r
        and z.shape == z0.shape == (r,)
        and s.numel() == s0.numel() == 1
    )
    if not shapes_ok:
        raise SubloraError(
            f"Module {name}: LoLDU expects P out×out, L out×r, U r×in, z and z0 of length r and scalar scales; got "
            f"P {tuple(P.shape)}, L {tuple(L.shape)}, U {tuple(U.shape)}, z {tuple(z.shape)}, z0 {tuple(z0.shape)}."
        )
    for factor, t in zip(FACTORS, (P, L, U, z, z0, s, s0), strict=True):
        check_factor(f"{name}.loldu_{factor}", t)
    diagonal = float(s) * z.double() - float(s0) * z0.double()
    B = (P.double() @ L.double()).to(L.dtype)
    A = (diagonal[:, None] * U.double()).to(L.dtype)
    return LoraModule(
        name=name, kind="linear", A=A, B=B, alpha=float(r), scale=1.0, a_shape=tuple(A.shape), b_shape=tuple(B.shape)
    )


LOLDU = LoLDUFormat()
