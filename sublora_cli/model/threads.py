"""How the CPU's cores are shared while the curvature runs: worker threads for the Hessian-vector products, each
with one intra-op thread, or torch's own intra-op threads for the one-pass Fisher (docs/curvature.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sublora_cli.core.methods import CURVATURES


def default_threads(device: torch.device) -> int:
    """Worker threads for the HVPs: every core torch may use on the CPU, one on an accelerator."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))



def intra_op_threads(kind: str, device: torch.device, threads: int | None = None) -> int:
    """torch's intra-op thread count while `kind` is computed: 1 while worker threads share the cores (the
    HVPs of exact and diag on the CPU), else torch's own (the Fisher)."""
    if not CURVATURES[kind].second_order:
        return torch.get_num_threads()
    threads = default_threads(device) if threads is None else threads
    return 1 if threads > 1 else torch.get_num_threads()



@contextmanager
def intra_op_thread_count(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n for the duration (the workers share the cores instead)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

