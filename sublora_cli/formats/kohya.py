"""Single-file safetensors LoRAs as Stable Diffusion tools write them: kohya-ss sd-scripts (`lora_unet_…`,
`lora_te…_…` with `.lora_down/.lora_up.weight` and `.alpha`, LoCon conv layers) and the diffusers / ComfyUI key
families that hold the same pairs under other names (`.lora_A/.lora_B.weight`, `_lora.up/down`, `.lora.up/down`,
`.lora_linear_layer.up/down`).

Every detail of these files lives here: pairs, the scale rule (alpha / rank, alpha = rank when `.alpha` is absent
or 0), LoCon convs, refused LyCORIS types, `ss_*`/`sshs_*` and `lora_adapter_metadata`, and name matching.

Flux-style fused qkv pairs (a `down` stacking the q/k/v rows and a block-sparse `up`, with the alpha stored
for the stacked rank) are an ordinary low-rank product of the whole fused weight: they are read and pruned as
one module, and the pruned `up` is dense, which both diffusers (it splits `up` by rows) and ComfyUI load.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from sublora_cli.core.svd import Spectrum, balanced_factors
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import Adapter, LoraModule, PrunedModule, check_factor, sha256_of
from sublora_cli.formats.peft import PEFT_DEFAULTS, check_ranks_and_alphas, get_pattern_key

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# (down suffix, up suffix) of every key family read; a module is written back with the suffixes it came with.
PAIR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
ALPHA_SUFFIX = ".alpha"
# Adapter types whose tensors are not one low-rank pair: (pattern in a key, what it is, why it is refused).
REFUSED_TYPES = (
    (".lora_mid.", "Tucker LoCon (lora_mid)", "its update is a three-factor product, not up·down"),
    (".hada_", "LoHa (hada_*)", "its update is a Hadamard product of two low-rank pairs"),
    (".lokr_", "LoKr (lokr_*)", "its update is a Kronecker product"),
    (".dora_scale", "DoRA (dora_scale)", "its magnitude vector rescales W + ΔW column-wise"),
)
# Module-name prefixes kohya gives each network (SD1 te, SDXL te1/te2, Flux/SD3 te3, …); longest first.
KOHYA_PREFIXES = (
    "lora_prior_unet_",
    "lora_transformer_",
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
)
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
SUBLORA_METADATA_KEY = "sublora"
CONVERT_HINT = (
    'Convert it once with: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\" (on a file you trust)."
)


@dataclass(frozen=True)
class ModuleKeys:
    """Where one module's tensors live in the file, so the writer uses the same key style."""

    down: str
    up: str
    alpha: str | None  # the `.alpha` key, if the file has one for this module


@dataclass(frozen=True)
class SingleFileState:
    """What the writer needs besides the modules: keys, metadata, the `.alpha` tensors (written back unchanged)
    and the modules that state an alpha (non-zero `.alpha` or diffusers' metadata; others: scale 1)."""

    keys: dict[str, ModuleKeys]
    metadata: dict[str, str]
    alphas: dict[str, torch.Tensor]
    stated_alpha: frozenset[str]
    total_rank: int


def load_single_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a pickle is refused with a conversion hint."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SubloraError(
            f"{path} is a pickle checkpoint ({path.suffix}); sublora reads only safetensors, because unpickling can "
            f"run arbitrary code. {CONVERT_HINT}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a damaged header
        raise SubloraError(f"{path} could not be read as safetensors: {e}.") from e


def refuse_unsupported_types(keys: list[str]) -> None:
    """LyCORIS types and DoRA are not a single low-rank pair: refuse them by name, listing the modules."""
    for pattern, what, why in REFUSED_TYPES:
        modules = sorted({key.split(pattern)[0] for key in keys if pattern in key})
        if modules:
            listed = ", ".join(modules[:5]) + (f" and {len(modules) - 5} more" if len(modules) > 5 else "")
            raise SubloraError(
                f"The file holds {what} modules ({listed}); {why}, so pruning the singular values of one "
                "up·down product would not be faithful. sublora prunes plain LoRA / LoCon pairs only; refusing."
            )


def split_pairs(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, ModuleKeys], dict[str, torch.Tensor]]:
    """{module name: its keys} for every down/up pair, and the tensors carried through unchanged."""
    refuse_unsupported_types(list(tensors))
    keys: dict[str, ModuleKeys] = {}
    for key in tensors:
        for down_suffix, up_suffix in PAIR_SUFFIXES:
            if key.endswith(down_suffix):
                name = key[: -len(down_suffix)]
                up = name + up_suffix
                if up not in tensors:
                    raise SubloraError(f"The file has {key} but no matching {up}.")
                alpha = name + ALPHA_SUFFIX
                keys[name] = ModuleKeys(down=key, up=up, alpha=alpha if alpha in tensors else None)
    consumed = {k for m in keys.values() for k in (m.down, m.up, m.alpha) if k is not None}
    orphans = [k for k in tensors if k not in consumed and any(k.endswith(up) for _, up in PAIR_SUFFIXES)]
    if orphans:
        raise SubloraError(f"The file has up factors without down factors: {', '.join(sorted(orphans)[:3])}.")
    return keys, {k: v for k, v in tensors.items() if k not in consumed}


def as_matrices(name: str, down: torch.Tensor, up: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(kind, A r×in, B out×r) from the stored factors; LoCon: down (r, in, k, k), up (out, r, 1, 1)."""
    for key, t in (("down", down), ("up", up)):
        check_factor(f"Module {name}: its {key} factor", t)
    kind = "linear"
    if down.dim() > 2:
        kind = "conv"
        if up.dim() != down.dim() or any(s != 1 for s in up.shape[2:]):
            raise SubloraError(
                f"Module {name}: a LoCon up factor must be a 1×1 convolution (out, r, 1, 1), got {tuple(up.shape)} "
                f"for down {tuple(down.shape)}."
            )
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], up.shape[1])
    if down.dim() != 2 or up.dim() != 2:
        raise SubloraError(
            f"Module {name}: factors must be matrices or LoCon kernels, got down {tuple(down.shape)} and up "
            f"{tuple(up.shape)}."
        )
    if down.shape[0] != up.shape[1]:
        raise SubloraError(
            f"Module {name}: down and up disagree on the rank: down is {tuple(down.shape)} (rank {down.shape[0]}) "
            f"but up is {tuple(up.shape)} (rank {up.shape[1]})."
        )
    return kind, down, up


def diffusers_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """{component prefix ("" when unprefixed): its LoRA config} from diffusers' `lora_adapter_metadata`.

    diffusers passes that JSON (keys prefixed by the component, e.g. `transformer.r`) to peft's LoraConfig,
    overriding what it would infer from the tensors, so it decides each module's alpha.
    """
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SubloraError(f"The file's {DIFFUSERS_METADATA_KEY} metadata is not valid JSON: {e}.") from e
    if not isinstance(config, dict):
        raise SubloraError(f"The file's {DIFFUSERS_METADATA_KEY} metadata must be a JSON object.")
    groups: dict[str, dict] = {}
    for key, value in config.items():
        prefix, _, field = key.rpartition(".")
        groups.setdefault(prefix, {})[field] = value
    for prefix, group in groups.items():
        check_ranks_and_alphas({**PEFT_DEFAULTS, **group}, f"The file's {DIFFUSERS_METADATA_KEY} ({prefix or 'all'})")
        if group.get("use_rslora"):
            raise SubloraError(
                f"The file's {DIFFUSERS_METADATA_KEY} enables rsLoRA{' for ' + prefix if prefix else ''}; sublora "
                "does not read that in single files yet. Refusing rather than mis-scaling the modules."
            )
    return {prefix: group for prefix, group in groups.items() if "r" in group or "lora_alpha" in group}


def config_for(name: str, configs: dict[str, dict]) -> tuple[str, dict] | None:
    """(prefix, config) of the component a dotted module name belongs to, if the file has one."""
    for prefix, config in configs.items():
        if not prefix or name.startswith(prefix + "."):
            return prefix, config
    return None


def module_alpha(
    name: str, rank: int, alpha_tensor: torch.Tensor | None, configs: dict[str, dict]
) -> tuple[float, bool]:
    """A module's alpha (its scale is alpha / rank) and whether the file states it: `.alpha` when present and
    non-zero, else diffusers' metadata (`alpha_pattern`, then `lora_alpha`, peft's default when absent), else
    alpha = rank (scale 1, not stated), as kohya, ComfyUI and diffusers assume."""
    if alpha_tensor is not None:
        alpha = float(alpha_tensor.float().reshape(-1)[0]) if alpha_tensor.numel() == 1 else math.nan
        if not math.isfinite(alpha):
            raise SubloraError(f"Module {name}: its .alpha must be one finite number, got {alpha_tensor.tolist()}.")
        if alpha != 0:
            return alpha, True
    found = config_for(name, configs)
    if found is not None:
        prefix, config = found
        relative = name.removeprefix(prefix + ".") if prefix else name
        pattern = config.get("alpha_pattern") or {}
        key = get_pattern_key(list(pattern), relative)
        alpha = pattern[key] if key is not None else config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])
        return float(alpha), True
    return float(rank), False


def read_modules(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[list[LoraModule], SingleFileState, dict]:
    """Parse a single-file state dict into modules (sorted by name), the writer's state and the carried tensors."""
    keys, carried = split_pairs(tensors)
    if not keys:
        raise SubloraError(
            "The file holds no LoRA pairs (no keys ending in .lora_down.weight, .lora_A.weight, _lora.down.weight, "
            ".lora.down.weight or .lora_linear_layer.down.weight); is this a LoRA?"
        )
    configs = diffusers_configs(metadata)
    modules = []
    alphas = {name: tensors[k.alpha] for name, k in keys.items() if k.alpha is not None}
    stated = set()
    for name in sorted(keys):
        k = keys[name]
        down, up = tensors[k.down], tensors[k.up]
        kind, A, B = as_matrices(name, down, up)
        alpha, states = module_alpha(name, A.shape[0], alphas.get(name), configs)
        if states:
            stated.add(name)
        modules.append(
            LoraModule(
                name=name,
                kind=kind,
                A=A,
                B=B,
                alpha=alpha,
                scale=alpha / A.shape[0],
                a_shape=tuple(down.shape),
                b_shape=tuple(up.shape),
            )
        )
    total_rank = sum(m.rank for m in modules)
    return modules, SingleFileState(keys, metadata, alphas, frozenset(stated), total_rank), carried


def written_alpha(state: SingleFileState, module: LoraModule, rank: int) -> float:
    """A module's alpha at `rank`: its own, unchanged, when the file states one (the factors carry alpha / rank),
    else alpha = rank. diffusers' loader (0.42) applies the most common alpha to kohya attention modules whose
    alpha differs, so per-module alphas (alpha / rank kept) would load mis-scaled."""
    return module.alpha if module.name in state.stated_alpha else float(rank)


@dataclass(frozen=True)
class WrittenModule:
    """One module as the writer stores it: matrix factors in the storage dtype, at its new rank, and its alpha."""

    module: LoraModule
    B: torch.Tensor  # out × k
    A: torch.Tensor  # k × in
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def pruned_state_dict(
    state: SingleFileState, carried: dict[str, torch.Tensor], written: list[WrittenModule]
) -> dict[str, torch.Tensor]:
    """The output tensors: every kept module under its own keys and layout with its `.alpha` as it was, modules at
    rank 0 dropped, everything else carried unchanged."""
    tensors = dict(carried)
    for w in written:
        m, keys = w.module, state.keys[w.module.name]
        tensors[keys.down] = w.A.reshape(w.rank, *m.a_shape[1:]).contiguous()
        tensors[keys.up] = w.B.reshape(m.b_shape[0], w.rank, *m.b_shape[2:]).contiguous()
        if keys.alpha is not None:
            tensors[keys.alpha] = state.alphas[m.name]
    return dict(sorted(tensors.items()))


def network_dim_alpha(written: list[WrittenModule]) -> tuple[str, str]:
    """`ss_network_dim` / `ss_network_alpha` as kohya's resize writes them: numbers, or "Dynamic" when the ranks
    (or alphas) differ between modules."""
    ranks = {w.rank for w in written}
    alphas = {w.alpha for w in written}
    if len(ranks) != 1 or len(alphas) != 1:
        return "Dynamic", "Dynamic"
    alpha = alphas.pop()
    return str(ranks.pop()), str(int(alpha)) if alpha.is_integer() else repr(alpha)


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's `train_util.precalculate_safetensors_hashes` computes them:
    over the file serialised with only the `ss_*` metadata, the sha256 of everything after the header, and the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (what sd-webui-additional-networks shows)."""
    blob = memoryview(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    header_end = 8 + int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def diffusers_metadata(configs: dict[str, dict], written: list[WrittenModule]) -> str:
    """diffusers' `lora_adapter_metadata` for the pruned file: each component's config with every written module's
    rank and alpha under its full, escaped name (peft matches pattern keys as regexes on the name's end, so a
    short key could hit other modules). Modules pruned to rank 0 have no tensors, so peft leaves them at zero."""
    config: dict[str, object] = {}
    for prefix, group in configs.items():
        group = dict(group)
        rank_pattern, alpha_pattern = {}, {}
        for w in written:
            found = config_for(w.module.name, {prefix: group})
            if found is not None:
                relative = re.escape(w.module.name.removeprefix(prefix + ".") if prefix else w.module.name)
                rank_pattern[relative], alpha_pattern[relative] = w.rank, w.alpha
        group["rank_pattern"], group["alpha_pattern"] = rank_pattern, alpha_pattern
        config.update({f"{prefix}.{k}" if prefix else k: v for k, v in group.items()})
    return json.dumps(config, sort_keys=True)


def pruned_metadata(
    state: SingleFileState, written: list[WrittenModule], tensors: dict[str, torch.Tensor], provenance: dict | None
) -> dict[str, str]:
    """The input's metadata with what kohya's resize updates when the input has kohya (`ss_*`) metadata
    (`ss_network_dim`, `ss_network_alpha`, `ss_training_comment`, `sshs_*` hashes), diffusers'
    `lora_adapter_metadata` rewritten to the new ranks, and a `sublora` entry saying what was done.
    Everything else (`modelspec.*`, other `ss_*`) is carried unchanged."""
    metadata = dict(state.metadata)
    summary = f"pruned by sublora from total rank {state.total_rank} to {sum(w.rank for w in written)}" + (
        f" ({provenance['method']}, budget {provenance['budget']})" if provenance else ""
    )
    configs = diffusers_configs(state.metadata)
    if configs:
        metadata[DIFFUSERS_METADATA_KEY] = diffusers_metadata(configs, written)
    kohya = any(k.startswith("ss_") for k in metadata)
    if kohya:
        metadata["ss_network_dim"], metadata["ss_network_alpha"] = network_dim_alpha(written)
        comment = metadata.get("ss_training_comment", "")
        metadata["ss_training_comment"] = f"{summary}; {comment}" if comment and comment != "None" else summary
    metadata[SUBLORA_METADATA_KEY] = json.dumps({"summary": summary, **(provenance or {})}, sort_keys=True)
    if kohya or "sshs_model_hash" in metadata:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    return metadata


def model_module_candidates(name: str) -> list[str]:
    """Spellings of a module's path with every `.` replaced by `_`, as the base model may name it: a kohya
    name minus its network prefix; a dotted (diffusers) name whole, then without its component prefix."""
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return [name.removeprefix(prefix)]
    _, _, tail = name.partition(".")
    return [name.replace(".", "_")] + ([tail.replace(".", "_")] if tail else [])


def resolve_model_module(name: str, model_names: list[str]) -> str:
    """The base model's module that `name` adapts, matched against the names the model actually has.

    kohya replaced every `.` of the module path by `_`, which string rules cannot undo (names contain `_` too),
    so every model name is flattened the same way and compared: a unique exact match wins, else a unique match
    of a flattened name's end (the model may wrap the network, e.g. a pipeline-like module with `unet.…`).
    Several matches, or none, are an error listing them or the closest names.
    """
    if name in model_names:
        return name
    flattened = [(n.replace(".", "_"), n) for n in model_names if n]
    candidates = model_module_candidates(name)
    for candidate in candidates:
        exact = sorted(n for flat, n in flattened if flat == candidate)
        matches = exact or sorted(n for flat, n in flattened if flat.endswith("_" + candidate))
        if len(matches) > 1:
            raise SubloraError(
                f"The adapter's module {name!r} matches several modules of the model from load_model(): "
                f"{', '.join(matches[:5])}. Return only the network this LoRA adapts (e.g. the UNet or one text "
                "encoder) from load_model()."
            )
        if matches:
            return matches[0]
    by_flat = dict(flattened)
    close = difflib.get_close_matches(candidates[-1], list(by_flat), n=3, cutoff=0.4)
    hint = f" Closest names: {', '.join(by_flat[c] for c in close)}." if close else ""
    raise SubloraError(
        f"The adapter adapts module {name!r}, but the model from load_model() has no module of that name (compared "
        f"with `.` replaced by `_`).{hint} Does load_model() return the base model the LoRA was trained on?"
    )


class SingleFileFormat:
    """The `Format` of single-file safetensors LoRAs (kohya and the diffusers / ComfyUI key families).

    The output is one file named like the input, inside the output directory beside sublora's reports.
    """

    name = "kohya"
    description = (
        "a single-file LoRA FILE.safetensors as kohya-ss sd-scripts, diffusers or ComfyUI write them "
        "(lora_unet_…/lora_te…_… with .lora_down/.lora_up.weight, or .lora_A/.lora_B.weight pairs)"
    )

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in (SUFFIX, *PICKLE_SUFFIXES)

    def read(self, path: Path) -> Adapter:
        tensors, metadata = load_single_file(path)
        modules, state, carried = read_modules(tensors, metadata)
        return Adapter(path=path, format=self, sha256=sha256_of(path), modules=modules, carried=carried, state=state)

    def stored_factors(
        self, adapter: Adapter, module: LoraModule, kept: Spectrum
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Balanced factors in the module's stored dtype, for the scale its written alpha gives it at the new rank."""
        scale = written_alpha(adapter.state, module, kept.rank) / kept.rank
        B, A = balanced_factors(kept, list(range(kept.rank)), scale)
        return B.to(module.B.dtype), A.to(module.A.dtype), scale

    def overhead_bytes(self, adapter: Adapter) -> int:
        """The `.alpha` scalars as they are (counted even for modules pruned to rank 0, which lose theirs)."""
        return sum(t.numel() * t.element_size() for t in adapter.state.alphas.values())

    def write(self, adapter: Adapter, pruned: list[PrunedModule], out_dir: Path, provenance: dict | None) -> None:
        written = []
        for p in pruned:
            if p.rank_after == 0:
                continue
            B, A = (p.module.B, p.module.A) if p.unchanged else self.stored_factors(adapter, p.module, p.spectrum)[:2]
            alpha = written_alpha(adapter.state, p.module, p.rank_after)
            written.append(WrittenModule(module=p.module, B=B, A=A, alpha=alpha))
        tensors = pruned_state_dict(adapter.state, adapter.carried, written)
        metadata = pruned_metadata(adapter.state, written, tensors, provenance)
        save_file(tensors, str(out_dir / adapter.path.name), metadata=metadata)

    def model_tensor_name(self, key: str) -> str:
        raise SubloraError(
            f"The file carries {key}, which is not part of a LoRA pair; sublora writes it through unchanged but "
            "cannot apply it to the calibration model. Prune without --calib, or remove the tensor."
        )

    def module_path(self, name: str, model_names: list[str]) -> str:
        return resolve_model_module(name, model_names)


KOHYA = SingleFileFormat()
