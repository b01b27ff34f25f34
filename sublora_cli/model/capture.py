"""The per-row σ leaves of one forward pass: how the Fisher gets per-sample σ-gradients from one backward pass.

While a `Capture` is installed on the SigmaModel (`SigmaModel.capturing`), every call of an adapted layer asks
it for σ through `Capture.leaf`: a fresh leaf holding the module's σ once per row of the layer input's dim 0.
Backpropagating Σ_n ℓ_n gives each leaf row Σ_t (u_iᵀ δ_t)(v_iᵀ x_t) over that row's positions t, i.e. its
share of ∂ℓ_n/∂σ (samples do not interact); rows are mapped to samples as N contiguous blocks (rows = N, or
N·m for an input flattened from (N, m, …)), and the blocks of all calls are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sublora_cli.errors import SubloraError


@dataclass(frozen=True)
class _Call:
    """One call of an adapted layer: its module, its slice of σ and the per-row leaf it used."""

    name: str
    start: int
    stop: int
    leaf: torch.Tensor


class Capture:
    """The per-row σ leaves of one forward pass, one per call of an adapted layer."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def leaf(self, name: str, h: torch.Tensor, s: torch.Tensor, start: int, stop: int, kind: str) -> torch.Tensor:
        """σ[start:stop] once per row of h's dim 0, as a fresh recorded leaf shaped to scale h (the layer's
        input projected on V) elementwise."""
        if h.dim() < 2:
            raise SubloraError(
                f"Module {name} was called on an unbatched input; per-sample gradients need the samples along "
                "dim 0 of every adapted layer's input."
            )
        rows, r = h.shape[0], stop - start
        leaf = s.detach().expand(rows, r).clone().requires_grad_(True)
        self.calls.append(_Call(name, start, stop, leaf))
        if kind == "conv":  # h: (rows, r, *spatial)
            return leaf.reshape(rows, r, *([1] * (h.dim() - 2)))
        return leaf.reshape(rows, *([1] * (h.dim() - 2)), r)  # h: (rows, …, r)

    def per_sample(self, losses: torch.Tensor, sigma: torch.Tensor, batch_index: int | None) -> torch.Tensor:
        """G (N, R) on σ's device: row n is ∂ℓ_n/∂σ, from one backward pass of Σ_n ℓ_n through the leaves."""
        leaves = [call.leaf for call in self.calls]
        grads = (
            torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
            if leaves and losses.requires_grad
            else [torch.zeros_like(leaf) for leaf in leaves]
        )
        n = losses.numel()
        G = torch.zeros(n, sigma.numel(), dtype=grads[0].dtype if grads else sigma.dtype, device=sigma.device)
        for call, grad in zip(self.calls, grads, strict=True):
            rows = grad.shape[0]
            if rows % n:
                if not grad.any():  # a call that does not reach the loss (e.g. a side output)
                    continue
                where = f" on batch {batch_index}" if batch_index is not None else ""
                raise SubloraError(
                    f"per_sample_loss returned {n} losses{where}, but module {call.name} was called on an input "
                    f"with {rows} rows along dim 0, not a multiple of {n}: sublora cannot tell which sample each "
                    "row belongs to. Return one loss per sample of the batch (the batch dimension first), and call "
                    "the model on all samples at once (e.g. concatenate the inputs of several model calls)."
                )
            G[:, call.start : call.stop] += grad.reshape(n, rows // n, call.stop - call.start).sum(1).to(G.device)
        return G

