"""Stage 1, read: the adapter from disk in the dtype it will be written in, and the output folder checked before
any computation starts (so a bad --out fails in a second, not after the curvature)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sublora_cli.constants import OUTPUT_DTYPES
from sublora_cli.formats import Adapter, read_adapter
from sublora_cli.model import distributed
from sublora_cli.pipeline.output import check_output_dir, lock_output_dir
from sublora_cli.pipeline.timings import Timings

# --dtype-out values; "same" keeps every tensor as the input stored it.
DTYPES_OUT = dict(zip(OUTPUT_DTYPES, (None, torch.float16, torch.bfloat16, torch.float32), strict=True))


def default_out_dir(adapter_path: Path, suffix: str) -> Path:
    """A sibling of the input named after it (a single file without its extension), so the input directory is
    never written into."""
    path = adapter_path.resolve()
    return path.parent / f"{path.stem if path.is_file() else path.name}-{suffix}"


def load_adapter(adapter_path: Path, timings: Timings) -> Adapter:
    with timings.stage("load"):
        return read_adapter(adapter_path)


def in_dtype(adapter: Adapter, dtype_out: str) -> Adapter:
    """The adapter with its factors and carried tensors rounded to `dtype_out`, before anything is measured: every
    format's writer stores (and copies) factors in the module's dtype, so what is measured is what is written."""
    dtype = DTYPES_OUT[dtype_out]
    if dtype is None:
        return adapter
    modules = [replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for m in adapter.modules]
    carried = {k: v.to(dtype) if v.is_floating_point() else v for k, v in adapter.carried.items()}
    return replace(adapter, modules=modules, carried=carried)


def output_dir(
    adapter_path: Path, out_dir: Path | None, suffix: str, overwrite: bool, reads: dict[str, Path | None]
) -> Path:
    """The output directory (default: a sibling named with `suffix`), checked — against the adapter and the other
    files the run `reads` too — and claimed against concurrent runs before any computation starts."""
    out_dir = out_dir if out_dir is not None else default_out_dir(adapter_path, suffix)
    check_output_dir(out_dir, adapter_path, overwrite, reads)
    if distributed.is_main():  # the rank that writes
        lock_output_dir(out_dir)
    return out_dir

