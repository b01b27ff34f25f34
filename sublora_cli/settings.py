"""`--config sublora.yaml`: the same settings as the flags, in a file; flags given on the command line win."""

from __future__ import annotations

from pathlib import Path

import yaml

from sublora_cli.calibration import DEFAULT_MAX_BATCHES
from sublora_cli.errors import SubloraError

# key → accepted Python types (after YAML parsing); the set of keys is the contract of the config file.
CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "adapter": (str,),
    "budget": (str, int, float),
    "calib": (str,),
    "method": (str,),
    "curvature": (str,),
    "out": (str,),
    "min_rank": (int,),
    "max_rank": (int,),
    "seed": (int,),
    "max_loss_increase": (str, int, float),
    "max_hessian_gb": (int, float),
    "max_batches": (int,),
    "device": (str,),
    "dtype": (str,),
}
PATH_KEYS = ("adapter", "calib", "out")
POSITIVE_KEYS = ("max_hessian_gb", "max_batches")
DEFAULTS: dict = {
    "curvature": "auto",
    "min_rank": 0,
    "seed": 0,
    "max_hessian_gb": 4.0,
    "max_batches": DEFAULT_MAX_BATCHES,
    "device": "cpu",
    "dtype": "float32",
}


def load_config(path: Path) -> dict:
    """Read and validate a config file; relative paths in it are relative to the file's own directory."""
    if not path.is_file():
        raise SubloraError(f"--config {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SubloraError(f"--config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SubloraError(f"--config {path} must be a mapping of settings (key: value).")
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            known = ", ".join(CONFIG_KEYS)
            raise SubloraError(f"--config {path}: unknown key {key!r}. Known keys: {known}.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, CONFIG_KEYS[key])):
            raise SubloraError(f"--config {path}: {key} = {value!r} has the wrong type.")
        if key in POSITIVE_KEYS and value is not None and value <= 0:
            raise SubloraError(f"--config {path}: {key} = {value!r} must be positive.")
    for key in PATH_KEYS:
        if data.get(key) is not None:
            data[key] = str((path.parent / data[key]).resolve()) if not Path(data[key]).is_absolute() else data[key]
    return {k: v for k, v in data.items() if v is not None}


def merge(flags: dict, config: dict, defaults: dict) -> dict:
    """Flags (None when not given) override the config file, which overrides the defaults."""
    return {key: flags[key] if flags.get(key) is not None else config.get(key, defaults.get(key)) for key in flags}
