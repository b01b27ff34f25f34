"""Reading and writing adapter files. Each format lives in its own module and implements `Format`; `FORMATS`
lists them, and the first one that detects a path reads it (so a more specific format goes before a broader one).
Adding a format is one new module plus one entry here."""

from __future__ import annotations

from pathlib import Path

from sublora_cli.errors import SubloraError
from sublora_cli.formats.adalora import ADALORA
from sublora_cli.formats.base import Adapter, Format, LoraModule, PrunedModule
from sublora_cli.formats.kohya import KOHYA
from sublora_cli.formats.loldu import LOLDU
from sublora_cli.formats.peft import PEFT

__all__ = ["FORMATS", "Adapter", "Format", "LoraModule", "PrunedModule", "read_adapter", "write_adapter"]

FORMATS: list[Format] = [ADALORA, LOLDU, PEFT, KOHYA]  # LoLDU before kohya: both take .safetensors files


def detect_format(path: Path) -> Format:
    """The first registered format that recognises `path`, or an error that says what sublora can read."""
    if not path.exists():
        raise SubloraError(f"{path} does not exist.")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    readable = "; or ".join(fmt.description for fmt in FORMATS)
    raise SubloraError(f"{path} is not an adapter sublora can read: it expects {readable}.")


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter in any registered format (detected from the path: a directory or a single file)."""
    path = Path(path)
    return detect_format(path).read(path)


def write_adapter(
    adapter: Adapter, pruned: list[PrunedModule], out_dir: Path, provenance: dict | None = None
) -> None:
    """Write the pruned adapter in the input's format into out_dir (which must exist and be empty); `provenance`
    (method, budget, report digest) is recorded by formats whose files have room for metadata."""
    adapter.format.write(adapter, pruned, out_dir, provenance)
