"""PEFT AdaLoRA directories (adapter_config.json with `peft_type: ADALORA`), read as LoRA and written as plain PEFT
LoRA adapters.

AdaLoRA stores each module as an SVD-like triple, `….lora_A` (r×in), `….lora_E` (r×1, the trained singular values)
and `….lora_B` (out×r), without the `.weight` suffix, and applies ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5)
with scaling = lora_alpha (or the module's rank when lora_alpha is 0) and ranknum = init_r, which peft never
changes, not even when it trims a module (peft 0.21, tuners/adalora/layer.py and model.py). Its `rank_pattern`
holds one boolean mask per module (`"<module>.lora_E": [true, false, …]`, one entry per init_r row); the saved
tensors are already trimmed to the kept rows, and a module whose mask is all false is saved with zero rows.

That is the plain LoRA A′ = E ⊙ A, B′ = B at rank r′ = rows kept, with scale scaling / (init_r + 1e-5): so the
adapter is read as LoRA modules with those factors and written by the PEFT LoRA writer (`peft_type: LORA`, a
rank and alpha per module, modules trimmed to rank 0 excluded), which `PeftModel.from_pretrained` loads as an
ordinary LoRA. AdaLoRA on Conv2d stores A flattened (r × in·k·k) and the kernel size is not saved, so such
modules are read as linear and peft refuses the written adapter's shapes on load rather than mis-applying them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import Adapter, LoraModule, check_factor, sha256_of
from sublora_cli.formats.peft import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    PeftFormat,
    PeftState,
    is_number,
    load_tensors,
    merge_exclude,
    peft_type,
    read_config,
)

FACTOR_SUFFIXES = (".lora_A", ".lora_E", ".lora_B")
RANKNUM_EPS = 1e-5  # peft divides by ranknum + 1e-5
# AdaLoraConfig fields that LoraConfig does not have: dropped from the written config.
ADALORA_ONLY = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


class AdaLoraFormat(PeftFormat):
    """The `Format` of PEFT AdaLoRA directories; it writes PEFT LoRA (the inherited writer)."""

    name = "adalora"
    description = f"a PEFT AdaLoRA directory ({CONFIG_FILE} with peft_type ADALORA)"

    def detect(self, path: Path) -> bool:
        try:
            return path.is_dir() and peft_type(json.loads((path / CONFIG_FILE).read_text())) == "ADALORA"
        except (OSError, ValueError, AttributeError):
            return False

    def read(self, path: Path) -> Adapter:
        config = read_config(path)
        init_r = _init_r(config, path)
        tensors = load_tensors(path)
        masks = _rank_masks(config, init_r, path)
        names = sorted(key.removeprefix(PREFIX).removesuffix(".lora_A") for key in tensors if key.endswith(".lora_A"))
        if not names:
            raise SubloraError(f"{path / WEIGHTS_FILE} holds no AdaLoRA factors (no keys ending in .lora_A).")
        modules, trimmed_away = [], []
        for name in names:
            A, E, B = _triple(tensors, name)
            _check_rank(name, A.shape[0], masks.get(name), init_r)
            if A.shape[0] == 0:
                trimmed_away.append(name)
            else:
                modules.append(_as_lora(name, A, E, B, _scaling(config, A.shape[0]) / (init_r + RANKNUM_EPS)))
        factor_keys = {f"{PREFIX}{n}{s}" for n in names for s in FACTOR_SUFFIXES}
        carried = {k: v for k, v in tensors.items() if k not in factor_keys and not k.endswith(".ranknum")}
        if not modules:
            raise SubloraError(f"{path}: AdaLoRA trimmed every module to rank 0; there is nothing to prune.")
        state = PeftState(config=_as_lora_config(config, init_r, modules[0].scale, trimmed_away), use_rslora=False)
        return Adapter(
            path=path,
            format=self,
            sha256=sha256_of(path / WEIGHTS_FILE),
            modules=modules,
            carried=carried,
            state=state,
        )


def _init_r(config: dict, path: Path) -> int:
    """init_r (AdaLoRA's ranknum), checked along with lora_alpha, which defaults as in peft."""
    init_r = config.get("init_r", 12)  # AdaLoraConfig's default
    if not (isinstance(init_r, int) and not isinstance(init_r, bool) and init_r > 0):
        raise SubloraError(f"{path / CONFIG_FILE}: init_r = {init_r!r}; it must be a positive whole number.")
    config.setdefault("lora_alpha", 8)  # LoraConfig's default
    if not is_number(config["lora_alpha"]):
        raise SubloraError(f"{path / CONFIG_FILE}: lora_alpha = {config['lora_alpha']!r}; it must be a number.")
    return init_r


def _scaling(config: dict, rank: int) -> float:
    """peft's `scaling`: lora_alpha, or the module's (trimmed) rank when lora_alpha is 0."""
    alpha = config["lora_alpha"]
    return float(alpha) if alpha > 0 else float(rank)


def _rank_masks(config: dict, init_r: int, path: Path) -> dict[str, list[bool]]:
    """{module name: kept-rows mask} from rank_pattern (keys `<module>.lora_E`, as peft saves them)."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise SubloraError(
            f"{path / CONFIG_FILE}: rank_pattern must be an object of `<module>.lora_E` → a list of init_r={init_r} "
            f"booleans, as peft saves it; got a {type(pattern).__name__}."
        )
    masks = {}
    for key, mask in pattern.items():
        if not (isinstance(mask, list) and len(mask) == init_r and all(isinstance(b, bool) for b in mask)):
            raise SubloraError(
                f"{path / CONFIG_FILE}: rank_pattern[{key!r}] must be a list of init_r={init_r} booleans."
            )
        masks[key.removesuffix(".lora_E")] = mask
    return masks


def _triple(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, E, B) of one module, checked: matrices of one rank, floating point, finite."""
    keys = [f"{PREFIX}{name}{suffix}" for suffix in FACTOR_SUFFIXES]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise SubloraError(f"The AdaLoRA adapter has {keys[0]} but no {missing[0]}.")
    A, E, B = (tensors[k] for k in keys)
    if A.dim() != 2 or B.dim() != 2 or tuple(E.shape) != (A.shape[0], 1) or B.shape[1] != A.shape[0]:
        raise SubloraError(
            f"Module {name}: AdaLoRA expects lora_A r×in, lora_E r×1 and lora_B out×r, got "
            f"{tuple(A.shape)}, {tuple(E.shape)} and {tuple(B.shape)}."
        )
    for key, t in zip(keys, (A, E, B), strict=True):
        check_factor(key, t, rank_zero_ok=True)  # AdaLoRA keeps a module it trimmed to rank 0 as 0-row tensors
    return A, E, B


def _check_rank(name: str, rank: int, mask: list[bool] | None, init_r: int) -> None:
    expected = init_r if mask is None else sum(mask)
    if rank != expected:
        raise SubloraError(
            f"Module {name}: the factors have rank {rank} but adapter_config.json implies {expected} "
            f"({'init_r' if mask is None else 'true entries of its rank_pattern mask'}); peft could not load it."
        )


def _as_lora(name: str, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scale: float) -> LoraModule:
    """The module as plain LoRA: A′ = E ⊙ A (in the stored dtype), B′ = B, alpha such that alpha / r′ = scale."""
    rank = A.shape[0]
    A_lora = (A * E).to(A.dtype)
    return LoraModule(
        name=name,
        kind="linear",
        A=A_lora,
        B=B,
        alpha=scale * rank,
        scale=scale,
        a_shape=tuple(A_lora.shape),
        b_shape=tuple(B.shape),
    )


def _as_lora_config(config: dict, init_r: int, scale: float, trimmed_away: list[str]) -> dict:
    """The LoRA config the writer starts from: AdaLoRA's own fields dropped, r = init_r with the alpha that gives
    every module its AdaLoRA scale at that rank, and modules AdaLoRA trimmed to rank 0 excluded."""
    lora = {k: v for k, v in config.items() if k not in ADALORA_ONLY}
    lora |= {
        "peft_type": "LORA",
        "r": init_r,
        "lora_alpha": scale * init_r,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    lora["exclude_modules"] = merge_exclude(config.get("exclude_modules"), trimmed_away)
    return lora


ADALORA = AdaLoraFormat()
