"""Reading and writing adapter files. Format details live in one module per format (PEFT today)."""

from __future__ import annotations

from pathlib import Path

from sublora_cli.adapters.base import Adapter, LoraModule, PrunedModule
from sublora_cli.adapters.peft import read_peft, write_peft

__all__ = ["Adapter", "LoraModule", "PrunedModule", "read_adapter", "write_adapter"]


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter in any supported format (detected from the path)."""
    return read_peft(Path(path))


def write_adapter(adapter: Adapter, pruned: list[PrunedModule], out_dir: Path) -> None:
    """Write the pruned adapter in the input's format into out_dir (which must exist and be empty)."""
    write_peft(adapter, pruned, out_dir)
