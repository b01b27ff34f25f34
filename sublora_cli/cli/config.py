"""`--config sublora.yaml`: the same settings as the flags, in a file; flags given on the command line win.

The keys and their YAML types come from the options schema (options.py); the values' syntax is checked where the
flags and the file are merged (`options.resolve`), so a malformed value names its key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sublora_cli.errors import SubloraError


def load_config(path: Path, keys: dict[str, tuple[type, ...]], path_keys: tuple[str, ...]) -> dict:
    """Read a config file and check its keys and value types against `keys`; relative paths (`path_keys`) are
    relative to the file's own directory."""
    if not path.is_file():
        raise SubloraError(f"--config {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SubloraError(f"--config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SubloraError(f"--config {path} must be a mapping of settings (key: value).")
    for key, value in data.items():
        if key not in keys:
            raise SubloraError(f"--config {path}: unknown key {key!r}. Known keys: {', '.join(keys)}.")
        if value is not None and not _has_type(value, keys[key]):
            raise SubloraError(f"--config {path}: {key} = {value!r} has the wrong type.")
    for key in path_keys:
        if data.get(key) is not None and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return {k: v for k, v in data.items() if v is not None}


def _has_type(value: object, accepted: tuple[type, ...]) -> bool:
    """YAML `true` is a bool, which Python also counts as an int: accept it only where bool is asked for."""
    if isinstance(value, bool):
        return bool in accepted
    return isinstance(value, accepted)
