"""Gradient and Hessian of the calibration loss w.r.t. σ, the inputs of the second-order pruning model.

How: reverse-over-reverse with plain autograd. Per batch, g = ∂L/∂σ is taken with create_graph=True and the
Hessian rows come from backward passes through g's graph, a chunk of unit vectors at a time
(`is_grads_batched`, i.e. vmap over the backward). torch.func (jacfwd(grad(f))) would be the textbook
choice, but it refuses losses that call requires_grad_ / torch.autograd.grad themselves, which every
PINN loss does; plain autograd handles them as long as the user passes create_graph=True.

Measured on 1 CPU thread of a busy shared 2-core machine (tanh MLP, 2-D input, PINN loss with second input
derivatives), seconds for the exact H (one HVP per backward pass / chunks of 4 / bigger chunks):
  width 64,  R = 32,  1 batch of 320 points:                        0.52 / 0.36 / 32: 0.55
  width 128, R = 100, 4 batches (elliptic sample), float32:         6.6  / 5.0  / 8: 7.0, 32: 9.8, 100: 14.8
  width 128, R = 100, 4 batches (elliptic sample), float64:         8.5  / 9.1
Small chunks win or tie on the CPU (big ones are memory-bound), hence CHUNK = 4. torch.func's
jacfwd(grad(f)) on a plain MSE loss (where it does work) was no faster than this (0.25 s vs 0.13 s).

The exact Hessian diagonal costs the same R Hessian-vector products per batch as the full Hessian (there
is no cheaper exact diagonal for a general loss); `diag` only saves the R×R memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sublora_cli.calibration import check_loss
from sublora_cli.errors import SubloraError
from sublora_cli.reparam import SigmaModel

KINDS = ("exact", "diag")
CHUNK = 4  # Hessian rows per batched backward pass (see the module docstring for the measurements)


@dataclass(frozen=True)
class Curvature:
    kind: str  # "exact" | "diag"
    loss: float  # mean calibration loss at the trained σ
    gradient: torch.Tensor  # (R,) float64, mean over batches
    hessian: torch.Tensor | None  # (R, R) float64 (exact), symmetrised
    hessian_diag: torch.Tensor  # (R,) float64
    seconds: float
    n_batches: int = 0

    @property
    def is_zero(self) -> bool:
        """g and H vanish identically: the loss does not depend on the adapter (a mis-wired script)."""
        h = self.hessian if self.hessian is not None else self.hessian_diag
        return not bool(self.gradient.any()) and not bool(h.any())


def estimate_cost(R: int, n_batches: int, kind: str) -> dict:
    """What a curvature computation will take, for a message before starting it."""
    if kind not in KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}")
    return {
        "hessian_bytes": 8 * R * R if kind == "exact" else 8 * R,
        "hvps": R * n_batches,  # Hessian-vector products, each about the cost of two backward passes
    }


def _hessian_rows(g: torch.Tensor, s: torch.Tensor, start: int, stop: int, batched: bool) -> torch.Tensor:
    """Rows start:stop of ∂g/∂s by backward passes through g's graph."""
    eye = torch.zeros(stop - start, s.numel(), dtype=s.dtype, device=s.device)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
    if batched:
        (rows,) = torch.autograd.grad(
            g, s, eye, retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        return rows
    rows = [torch.autograd.grad(g, s, e, retain_graph=True, allow_unused=True, materialize_grads=True)[0] for e in eye]
    return torch.stack(rows)


def compute_curvature(
    sigma_model: SigmaModel,
    batches: list,
    kind: str = "exact",
    *,
    max_hessian_gb: float = 4.0,
    progress: Callable[[str, int, int], None] | None = None,
    chunk: int = CHUNK,
) -> Curvature:
    """Mean gradient and Hessian (or its diagonal) of the loss over the batches at the trained σ (float64)."""
    if kind not in KINDS:
        raise SubloraError(f"Unknown curvature {kind!r}; choose one of {', '.join(KINDS)}.")
    if not batches:
        raise SubloraError("No calibration batches to compute the curvature on.")
    R = sigma_model.size
    cost = estimate_cost(R, len(batches), kind)
    if kind == "exact" and cost["hessian_bytes"] > max_hessian_gb * 1e9:
        raise SubloraError(
            f"The exact Hessian over the adapter's R = {R} singular values would take "
            f"{cost['hessian_bytes'] / 1e9:.1f} GB in float64, above the limit of {max_hessian_gb:g} GB. "
            "Use --curvature diag (diagonal only, R numbers), or prune a smaller adapter."
        )
    start_time = time.perf_counter()
    device = sigma_model.sigma.device
    gradient = torch.zeros(R, dtype=torch.float64, device=device)
    hessian = torch.zeros(R, R, dtype=torch.float64, device=device) if kind == "exact" else None
    diag = torch.zeros(R, dtype=torch.float64, device=device)
    total_loss = 0.0
    done, total = 0, len(batches) * R
    batched = chunk > 1
    if progress:
        progress("curvature", done, total)

    with torch.enable_grad():
        for b, batch in enumerate(batches):
            s = sigma_model.sigma.detach().clone().requires_grad_(True)
            loss = check_loss(sigma_model.loss(s, batch), b)
            total_loss += float(loss.detach())
            g = None
            if loss.requires_grad:
                with _differentiating("the gradient", b):
                    (g,) = torch.autograd.grad(loss, s, create_graph=True, allow_unused=True, materialize_grads=True)
                gradient += g.detach().to(torch.float64)
            if g is None or not g.requires_grad:  # the loss is constant or linear in σ: H = 0 on this batch
                done += R
                if progress:
                    progress("curvature", done, total)
                continue
            for start in range(0, R, chunk):
                stop = min(start + chunk, R)
                with _differentiating("the Hessian", b):
                    try:
                        rows = _hessian_rows(g, s, start, stop, batched)
                    except RuntimeError:
                        if not batched:
                            raise
                        # an op without a vmap batching rule: one backward pass per row from now on
                        batched = False
                        rows = _hessian_rows(g, s, start, stop, batched)
                rows = rows.detach().to(torch.float64)
                if hessian is not None:
                    hessian[start:stop] += rows
                else:
                    diag[start:stop] += rows[torch.arange(stop - start), torch.arange(start, stop)]
                done += stop - start
                if progress:
                    progress("curvature", done, total)
            del g, loss  # free this batch's graph before building the next

    n = len(batches)
    gradient /= n
    if hessian is not None:
        hessian /= n
        hessian = (hessian + hessian.T) / 2
        diag = hessian.diagonal().clone()
    else:
        diag /= n
    return Curvature(  # on the CPU, whatever device the model ran on: selection is cheap next to this
        kind=kind,
        loss=total_loss / n,
        gradient=gradient.cpu(),
        hessian=hessian.cpu() if hessian is not None else None,
        hessian_diag=diag.cpu(),
        seconds=time.perf_counter() - start_time,
        n_batches=n,
    )


@contextmanager
def _differentiating(what: str, batch_index: int) -> Iterator[None]:
    """Explain a failure to differentiate the user's loss as a loss that is not twice differentiable."""
    try:
        yield
    except RuntimeError as e:
        raise SubloraError(
            f"Computing {what} of the calibration loss w.r.t. the adapter's singular values failed on batch "
            f"{batch_index}: {str(e).splitlines()[0]} The loss must be twice differentiable in the LoRA "
            "path: no .detach()/.item() on the model output, no non-differentiable ops, and "
            "create_graph=True in any torch.autograd.grad the loss itself calls."
        ) from e
