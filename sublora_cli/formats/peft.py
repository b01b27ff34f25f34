"""Hugging Face PEFT LoRA directories (adapter_config.json + adapter_model.safetensors), as peft 0.21 writes them.

Every PEFT format detail lives here: key names, how rank_pattern/alpha_pattern are matched, the scale
rule (alpha/r or alpha/sqrt(r) with rsLoRA), the layouts of embedding and convolution factors, and
how a pruned adapter is written back so that `PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sublora_cli.core.svd import Spectrum, balanced_factors
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import Adapter, LoraModule, PrunedModule, check_factor, sha256_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
# What peft's LoraConfig assumes when adapter_config.json omits r / lora_alpha (peft 0.21): the reader and
# the writer both use these, so a pruned module's rank and alpha are compared with what peft would load.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
# Files that make a path look like a PEFT adapter (a directory holding one, or one of them given by mistake).
PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE)


@dataclass(frozen=True)
class PeftState:
    """What only the PEFT writer needs from the input: its config (defaults filled in) and the scale rule."""

    config: dict
    use_rslora: bool


# (suffix of the A key, suffix of the B key, layer kind); conv is told apart from linear by the A rank.
FACTOR_KEYS = (
    (".lora_A.weight", ".lora_B.weight", "linear"),
    (".lora_embedding_A", ".lora_embedding_B", "embedding"),
)
# Config flags of LoRA variants whose saved factors are not a plain s·B·A update.
UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (its magnitude vector rescales W + ΔW column-wise, so pruning σ of B·A alone is not faithful)",
    "use_qalora": "QA-LoRA (its A acts on pooled input groups)",
    "lora_bias": "lora_bias (the bias inside lora_B would be lost when a module is pruned to rank 0)",
    "target_parameters": (
        "LoRA on raw parameters (target_parameters, e.g. MoE experts: A and B stack one rank-r factor per expert, "
        "and the rank must stay the same for every expert, which a per-module budget cannot promise)"
    ),
    "trainable_token_indices": (
        "trainable tokens (trainable_token_indices: the trained embedding rows are a separate, full-rank update "
        "indexed by token, which sublora does not carry into calibration or check on write)"
    ),
    "layer_replication": "layer replication",
}
# init_lora_weights values (prefixes) that change the base weights at init: see _refuse_base_mutating_init.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")
CONVERT_HINT = (
    'Convert it once with: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\" "
    "(run inside the adapter directory, on a file you trust)."
)


def get_pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """The first rank_pattern/alpha_pattern key that matches the module, exactly as peft 0.21 matches them."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def read_config(path: Path) -> dict:
    """The adapter directory's adapter_config.json as a dict, whatever its peft_type."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise SubloraError(
            f"{path} is not a PEFT adapter directory: it has no {CONFIG_FILE}. "
            "Point sublora at the folder that `save_pretrained` wrote."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SubloraError(f"{config_path} is not valid JSON: {e}.") from e
    if not isinstance(config, dict):
        raise SubloraError(f"{config_path} must hold a JSON object.")
    return config


def peft_type(config: dict) -> str:
    """The config's adapter type, upper case; peft treats a config without one as LoRA."""
    return str(config.get("peft_type", "LORA")).upper()


def _refuse_base_mutating_init(path: Path, config: dict) -> None:
    """PiSSA, OLoRA, CorDA and LoRA-GA move the principal part of W into B₀·A₀ at init and subtract it from the
    base weights, so a saved B·A is the update of a *residual* model, not of the base model users load. PEFT's
    conversion (save_pretrained with path_initial_model_for_weight_conversion) writes the true update as a
    rank-2r LoRA and sets init_lora_weights back to true, so only an unconverted adapter still names its init."""
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_MUTATING_INITS):
        raise SubloraError(
            f"{path} was initialised with init_lora_weights={config['init_lora_weights']!r}, which changes the base "
            "weights, and was saved without conversion: its B·A is not the update to the base model, so pruning it "
            "would not be faithful. Save it again with `model.save_pretrained(out, "
            "path_initial_model_for_weight_conversion=...)` (PEFT converts it into a plain LoRA whose B·A is the "
            "update) and prune that."
        )


def _load_config(path: Path) -> dict:
    config = read_config(path)
    config_path = path / CONFIG_FILE
    kind = peft_type(config)
    if kind != "LORA":
        raise SubloraError(
            f"{path} holds a {kind} adapter; sublora prunes LoRA adapters only "
            f"({kind} has no low-rank factors whose singular values could be pruned)."
        )
    _refuse_base_mutating_init(path, config)
    for flag, what in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise SubloraError(f"{path} uses {what}, which sublora cannot prune faithfully; refusing.")
    for key, default in PEFT_DEFAULTS.items():
        if config.get(key) is None:
            config[key] = default
    check_ranks_and_alphas(config, str(config_path))
    return config


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_ranks_and_alphas(config: dict, source: str) -> None:
    """Ranks are positive whole numbers and alphas finite, non-zero numbers, globally and in the patterns, in a
    LoRA config read from `source` (adapter_config.json, or a component of diffusers' metadata)."""
    ranks = {"r": config["r"]}
    alphas = {"lora_alpha": config["lora_alpha"]}
    for key, into in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise SubloraError(f"{source}: {key} must be an object of module pattern → value, got {pattern!r}.")
        into.update({f"{key}[{name!r}]": value for name, value in pattern.items()})
    for where, value in ranks.items():
        if not (is_number(value) and float(value).is_integer() and value > 0):
            raise SubloraError(f"{source}: {where} = {value!r}; a LoRA rank must be a positive whole number.")
    for where, value in alphas.items():
        if not is_number(value) or value == 0:
            raise SubloraError(
                f"{source}: {where} = {value!r}; lora_alpha must be a non-zero number (the scale is "
                "lora_alpha / r: 0 makes every update zero, a negative one flips its sign)."
            )


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise SubloraError(
                f"{path} stores its weights as a pickle ({PICKLE_FILE}); sublora reads only safetensors, "
                f"because unpickling can run arbitrary code. {CONVERT_HINT}"
            )
        raise SubloraError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}.")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise SubloraError(f"{weights} could not be read as safetensors: {e}.") from e


def _module_factors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """Split the state dict into {module name: (A key, B key, kind)} and the tensors carried through."""
    factors: dict[str, tuple] = {}
    consumed: set[str] = set()
    for key in tensors:
        if "lora_magnitude_vector" in key:
            raise SubloraError(
                f"The adapter holds DoRA magnitude vectors ({key}); DoRA rescales W + ΔW column-wise, "
                "so pruning the singular values of B·A alone would not be faithful. Refusing."
            )
        for a_suffix, b_suffix, kind in FACTOR_KEYS:
            if key.endswith(a_suffix):
                name = key[: -len(a_suffix)]
                b_key = name + b_suffix
                if b_key not in tensors:
                    raise SubloraError(f"The adapter has {key} but no matching {b_key}.")
                factors[name.removeprefix(PREFIX)] = (key, b_key, kind)
                consumed.update((key, b_key))
    orphans = [k for k in tensors if (".lora_B." in k or k.endswith(".lora_embedding_B")) and k not in consumed]
    orphans = [k for k in orphans if not k.endswith(".bias")]
    if orphans:
        raise SubloraError(f"The adapter has B factors without A factors: {', '.join(orphans[:3])}.")
    extra = {k: v for k, v in tensors.items() if k not in consumed}
    return factors, extra


def _as_matrices(name: str, kind: str, A: torch.Tensor, B: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Stored factors → (kind, A: r×in, B: out×r), checking that the shapes agree."""
    if kind == "linear" and A.dim() > 2:
        kind = "conv"
        if B.dim() != A.dim() or any(s != 1 for s in B.shape[2:]):
            raise SubloraError(
                f"Module {name}: conv LoRA expects lora_B to be a 1×1 convolution, got shape {tuple(B.shape)}."
            )
        A = A.reshape(A.shape[0], -1)
        B = B.reshape(B.shape[0], B.shape[1])
    if A.dim() != 2 or B.dim() != 2:
        raise SubloraError(f"Module {name}: factors must be matrices, got A {tuple(A.shape)} and B {tuple(B.shape)}.")
    if A.shape[0] != B.shape[1]:
        raise SubloraError(
            f"Module {name}: A and B disagree on the rank: A is {tuple(A.shape)} (rank {A.shape[0]}) but "
            f"B is {tuple(B.shape)} (rank {B.shape[1]})."
        )
    return kind, A, B


def _lora_modules(state: PeftState, tensors: dict[str, torch.Tensor], factors: dict[str, tuple]) -> list[LoraModule]:
    """One LoraModule per factor pair, sorted by name, with its rank and scale checked against the config."""
    config, use_rslora = state.config, state.use_rslora
    default_r = int(config["r"])
    default_alpha = float(config["lora_alpha"])
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    modules = []
    for name in sorted(factors):
        a_key, b_key, kind = factors[name]
        A, B = tensors[a_key], tensors[b_key]
        for key, t in ((a_key, A), (b_key, B)):
            check_factor(key, t)
        kind, A_mat, B_mat = _as_matrices(name, kind, A, B)
        rank_key = get_pattern_key(list(rank_pattern), name)
        r = int(rank_pattern[rank_key]) if rank_key is not None else default_r
        if A_mat.shape[0] != r:
            raise SubloraError(
                f"Module {name}: the factors have rank {A_mat.shape[0]} but adapter_config.json says r={r}"
                f"{' (rank_pattern ' + repr(rank_key) + ')' if rank_key else ''}; peft could not load this adapter."
            )
        alpha_key = get_pattern_key(list(alpha_pattern), name)
        alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else default_alpha
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules.append(
            LoraModule(
                name=name,
                kind=kind,
                A=A_mat,
                B=B_mat,
                alpha=alpha,
                scale=scale,
                a_shape=tuple(A.shape),
                b_shape=tuple(B.shape),
            )
        )
    return modules


def alpha_for_rank(scale: float, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that gives `scale` at `rank`, so a pruned module keeps its original scale."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


def _in_layout(module: LoraModule, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix factors → tensors in the layout the input stored them in (conv kernels, embedding tables)."""
    r = A.shape[0]
    A = A.reshape(r, *module.a_shape[1:]).contiguous()
    B = B.reshape(module.b_shape[0], r, *module.b_shape[2:]).contiguous()
    return A, B


def _keys(module: LoraModule) -> tuple[str, str]:
    if module.kind == "embedding":
        return f"{PREFIX}{module.name}.lora_embedding_A", f"{PREFIX}{module.name}.lora_embedding_B"
    return f"{PREFIX}{module.name}.lora_A.weight", f"{PREFIX}{module.name}.lora_B.weight"


def merge_exclude(existing: str | list | None, names: list[str]) -> str | list | None:
    """Add fully named modules to exclude_modules, keeping peft's semantics for a regex or a list."""
    if not names:
        return existing
    if isinstance(existing, str):
        return "|".join([f"(?:{existing})"] + [re.escape(n) for n in names])
    return sorted(set(existing or []) | set(names))


def pruned_config(adapter: Adapter, pruned: list[PrunedModule]) -> dict:
    """adapter_config.json for the pruned adapter: per-module ranks and alphas, rank-0 modules excluded.

    peft takes the *first* pattern key that matches the end of a module name, so the input's own keys
    (often short suffixes such as "c_fc") would shadow new ones. Instead every module whose rank or alpha
    differs from the global `r`/`lora_alpha` gets an entry under its full name and the old keys are
    dropped: the result does not depend on key order. A config without target_modules (peft infers them
    only for architectures it knows) gets the adapted modules' full names, so peft can load the result.
    """
    state: PeftState = adapter.state
    config = dict(state.config)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dropped = []
    for p in pruned:
        if p.rank_after == 0:
            dropped.append(p.module.name)
            continue
        if p.unchanged:
            rank, alpha = p.module.rank, p.module.alpha
        else:
            rank = p.rank_after
            alpha = alpha_for_rank(p.module.scale, rank, state.use_rslora)
        if rank != config["r"]:
            rank_pattern[p.module.name] = rank
        if alpha != config["lora_alpha"]:
            alpha_pattern[p.module.name] = alpha
    config["rank_pattern"] = rank_pattern
    config["alpha_pattern"] = alpha_pattern
    config["exclude_modules"] = merge_exclude(state.config.get("exclude_modules"), dropped)
    if not config.get("target_modules"):
        config["target_modules"] = sorted(m.name for m in adapter.modules)
    return config


def _unwrap_carried(tensors: dict[str, torch.Tensor], name: str) -> None:
    """A module pruned to rank 0 is excluded, so peft no longer wraps it: its trained bias
    (`….base_layer.bias`) must be stored under the plain layer's name or peft would silently not load it."""
    wrapped = f"{PREFIX}{name}.base_layer."
    for key in [k for k in tensors if k.startswith(wrapped)]:
        tensors[f"{PREFIX}{name}.{key.removeprefix(wrapped)}"] = tensors.pop(key)


class PeftFormat:
    """The `Format` of PEFT LoRA directories."""

    name = "peft"
    description = f"a PEFT LoRA directory with {CONFIG_FILE} and {WEIGHTS_FILE} (the folder `save_pretrained` wrote)"

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return any((path / name).is_file() for name in PEFT_FILES)
        return path.name in PEFT_FILES

    def read(self, path: Path) -> Adapter:
        if not path.is_dir():
            raise SubloraError(
                f"{path} is a file; a PEFT adapter is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}: "
                f"point sublora at {path.parent}."
            )
        config = _load_config(path)
        state = PeftState(config=config, use_rslora=bool(config.get("use_rslora", False)))
        tensors = load_tensors(path)
        factors, carried = _module_factors(tensors)
        if not factors:
            raise SubloraError(
                f"{path / WEIGHTS_FILE} holds no LoRA factors (no keys ending in .lora_A.weight or "
                f".lora_embedding_A); is this a LoRA adapter?"
            )
        return Adapter(
            path=path,
            format=self,
            sha256=sha256_of(path / WEIGHTS_FILE),
            modules=_lora_modules(state, tensors, factors),
            carried=carried,
            state=state,
        )

    def stored_factors(
        self, adapter: Adapter, module: LoraModule, kept: Spectrum
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Balanced factors of the kept spectrum (each side sqrt(σ/scale) per component, as training would leave
        them, and safe in half precision) rounded to the dtype the input stored them in; the module keeps its scale
        (`alpha_pattern` keeps alpha / r)."""
        B, A = balanced_factors(kept, list(range(kept.rank)), module.scale)
        dtype = module.A.dtype
        return B.to(dtype), A.to(dtype), module.scale

    def overhead_bytes(self, adapter: Adapter) -> int:
        """Nothing: a PEFT file holds the factors and the carried tensors; ranks and scales go in the config."""
        return 0

    def write(self, adapter: Adapter, pruned: list[PrunedModule], out_dir: Path, provenance: dict | None) -> None:
        tensors = dict(adapter.carried)  # modules_to_save and biases, untouched
        for p in pruned:
            if p.rank_after == 0:
                _unwrap_carried(tensors, p.module.name)
                continue
            a_key, b_key = _keys(p.module)
            if p.unchanged:  # bit-exact copy: nothing to gain from re-factoring a module that keeps everything
                A_stored = p.module.A.reshape(p.module.a_shape)
                B_stored = p.module.B.reshape(p.module.b_shape)
            else:
                B, A, _ = self.stored_factors(adapter, p.module, p.spectrum)
                A_stored, B_stored = _in_layout(p.module, B, A)
            tensors[a_key], tensors[b_key] = A_stored, B_stored
        tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        config = pruned_config(adapter, pruned)
        (out_dir / CONFIG_FILE).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")

    def model_tensor_name(self, key: str) -> str:
        """peft saves modules_to_save copies under the module's own name (`…ln_f.weight`) and the trained biases
        of adapted layers (bias="all"/"lora_only") under the wrapped layer (`…c_attn.base_layer.bias`)."""
        return key.removeprefix(PREFIX).replace(".base_layer.", ".")

    def module_path(self, name: str, model_names: list[str]) -> str:
        """Module names are read with peft's prefix stripped, so they are the model's paths already."""
        return name


PEFT = PeftFormat()
