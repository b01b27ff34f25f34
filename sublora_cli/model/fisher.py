"""Per-sample σ-gradients for the empirical Fisher, from one forward and one backward pass per batch (the
per-row σ leaves that make it one pass are model/capture.py's)."""

from __future__ import annotations

import torch

from sublora_cli.errors import SubloraError
from sublora_cli.model.capture import Capture
from sublora_cli.model.reparam import SigmaModel
from sublora_cli.model.script import check_per_sample_loss


def per_sample_gradients(
    sigma_model: SigmaModel, batch, batch_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses ℓ (N,) and σ-gradients G (N, R) of one batch at the trained σ."""
    if sigma_model.per_sample_loss_fn is None:
        raise SubloraError("The calibration script defines no per_sample_loss(model, batch).")
    capture = Capture()
    with torch.enable_grad():
        with sigma_model.capturing(capture):
            batch = sigma_model.on_device(batch)
            losses = check_per_sample_loss(sigma_model.per_sample_loss_fn(sigma_model.model, batch), batch_index)
        G = capture.per_sample(losses, sigma_model.sigma, batch_index)
    return losses.detach(), G


