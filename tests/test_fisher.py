"""--curvature fisher must be mean_n g_n g_nᵀ over the true per-sample σ-gradients (docs/curvature.md).

The reference gradients are brute force: each sample's loss on its own (a batch of one), differentiated with
plain autograd w.r.t. σ. The tool gets all of them from one backward pass per batch through its hooks.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TinyConvNet

from sublora_cli.core.svd import factor_svd
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import LoraModule
from sublora_cli.model.curvature import (
    AUTO_MAX_HVPS,
    KINDS,
    Curvature,
    choose_kind,
    compute_curvature,
    estimate_cost,
    resolve_kind,
)
from sublora_cli.model.reparam import SigmaModel
from sublora_cli.model.script import load_calibration


def lora(name: str, kind: str, out: int, inp: int, r: int, scale: float = 1.0, a_shape=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g) * 0.3
    return LoraModule(name, kind, A, B, scale * r, scale, tuple(a_shape or A.shape), tuple(B.shape))


def build(model, modules, per_sample):
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]
    return SigmaModel(
        model,
        modules,
        spectra,
        lambda m, b: per_sample(m, b).mean(),
        dtype=torch.float64,
        per_sample_loss_fn=per_sample,
    )


def take(batch, n: int):
    """Sample n of a batch as a batch of one (every tensor has the samples along dim 0)."""
    if isinstance(batch, dict):
        return {k: v[n : n + 1] for k, v in batch.items()}
    return tuple(v[n : n + 1] for v in batch)


def brute_force(sm: SigmaModel, per_sample, batches):
    """Per-sample σ-gradients and losses, one autograd call per sample."""
    grads, losses = [], []
    for batch in batches:
        size = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
        for n in range(size):
            s = sm.sigma.clone().requires_grad_(True)
            previous, sm._current = sm._current, s
            try:
                loss = per_sample(sm.model, take(batch, n))[0]
            finally:
                sm._current = previous
            grads.append(torch.autograd.grad(loss, s)[0])
            losses.append(float(loss.detach()))
    G = torch.stack(grads)
    return G, torch.tensor(losses, dtype=torch.float64)


def check(sm, per_sample, batches):
    G, losses = brute_force(sm, per_sample, batches)
    curv = compute_curvature(sm, batches, "fisher")
    assert curv.kind == "fisher" and curv.n_samples == G.shape[0] and curv.n_batches == len(batches)
    F_ref = G.T @ G / G.shape[0]
    torch.testing.assert_close(curv.hessian, F_ref, rtol=1e-8, atol=1e-8 * float(F_ref.abs().max()))
    torch.testing.assert_close(curv.hessian_diag, F_ref.diagonal(), rtol=1e-8, atol=1e-8 * float(F_ref.abs().max()))
    torch.testing.assert_close(curv.gradient, G.mean(0), rtol=1e-8, atol=1e-10)
    assert curv.loss == pytest.approx(float(losses.mean()), rel=1e-10)
    assert torch.equal(curv.hessian, curv.hessian.T) and curv.hessian.dtype == torch.float64
    # cross-layer blocks are there (not block diagonal)
    r0 = sm.offsets[1]
    assert curv.hessian[:r0, r0:].abs().max() > 0
    return curv


def test_fisher_linear_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def per_sample(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean(1)

    sm = build(model, [lora("0", "linear", 8, 5, 3, seed=1), lora("2", "linear", 8, 8, 4, seed=2)], per_sample)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)) for n in (6, 4, 7)]
    check(sm, per_sample, batches)


def test_fisher_gpt2_conv1d_and_embedding():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()

    def per_sample(m, b):
        ids = b["input_ids"]
        logits = m(input_ids=ids).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return ce.reshape(ids.shape[0], -1).mean(1)

    modules = [
        lora("transformer.h.0.attn.c_attn", "linear", 48, 16, 3, 2.0, seed=1),  # Conv1D: weight (16, 48)
        lora("transformer.h.1.mlp.c_fc", "linear", 64, 16, 4, 1.0, seed=2),
        lora("transformer.h.1.attn.c_proj", "linear", 16, 16, 2, 1.0, seed=4),
        lora("transformer.wte", "embedding", 16, 40, 3, 1.0, seed=3),  # ΔW is dim × vocab
    ]
    sm = build(model, modules, per_sample)
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 40, (n, 9), generator=g)} for n in (3, 4)]
    check(sm, per_sample, batches)


def test_fisher_conv2d():
    torch.manual_seed(0)
    model = TinyConvNet().eval()

    def per_sample(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    modules = [
        lora("conv", "conv", 8, 3 * 3 * 3, 4, 2.0, a_shape=(4, 3, 3, 3), seed=1),
        lora("head", "linear", 5, 128, 3, 0.5, seed=2),
    ]
    sm = build(model, modules, per_sample)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (5, 3)]
    check(sm, per_sample, batches)


def test_fisher_flattened_rows_and_input_derivatives():
    """A loss that flattens (N, T, d) to (N·T, d) and takes input derivatives (a PINN-style residual) per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))

    def per_sample(m, b):
        x = b[0].reshape(-1, 2).clone().requires_grad_(True)  # (N·T, 2): rows of sample n are contiguous
        u = m(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        residual = (du**2).sum(1) + u[:, 0] - b[1].reshape(-1)
        return (residual**2).reshape(b[0].shape[0], -1).mean(1)

    sm = build(model, [lora("2", "linear", 6, 6, 3, seed=1), lora("4", "linear", 1, 6, 1, seed=2)], per_sample)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 5, 2, generator=g), torch.randn(4, 5, generator=g)) for _ in range(2)]
    check(sm, per_sample, batches)


def test_without_per_sample_loss_fisher_uses_batch_gradients_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    modules = [lora("0", "linear", 4, 3, 2, seed=1), lora("2", "linear", 2, 4, 2, seed=2)]
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]

    def loss(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    sm = SigmaModel(model, modules, spectra, loss, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)) for _ in range(3)]
    grads = []
    for b in batches:
        s = sm.sigma.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(sm.loss(s, b), s)[0])
    G = torch.stack(grads)
    curv = compute_curvature(sm, batches, "fisher")
    torch.testing.assert_close(curv.hessian, G.T @ G / 3, rtol=1e-10, atol=1e-14)
    assert curv.n_samples == 3 and len(curv.notes) == 2 and "per_sample_loss" in curv.notes[1]
    exact = compute_curvature(sm, batches, "exact")
    torch.testing.assert_close(curv.gradient, exact.gradient, rtol=1e-10, atol=1e-14)
    assert curv.loss == pytest.approx(exact.loss, rel=1e-12)


def test_fisher_errors_are_clear():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    modules = [lora("0", "linear", 4, 3, 2, seed=1)]
    batches = [(torch.randn(6, 3), torch.randn(6, 2))]
    # rows of the adapted layer (6) are not a multiple of the number of per-sample losses (4)
    sm = build(model, modules, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1)[:4])
    with pytest.raises(SubloraError, match="not a multiple of 4"):
        compute_curvature(sm, batches, "fisher")
    sm = build(model, modules, lambda m, b: (m(b[0]) - b[1]) ** 2)  # (6, 2): not one loss per sample
    with pytest.raises(SubloraError, match="1-D"):
        compute_curvature(sm, batches, "fisher")
    sm = build(model, modules, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1) / 0.0)
    with pytest.raises(SubloraError, match="finite"):
        compute_curvature(sm, batches, "fisher")
    sm = build(model, modules, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1))
    with pytest.raises(SubloraError, match="Fisher matrix"):
        compute_curvature(sm, batches, "fisher", max_hessian_gb=1e-12)


SCRIPT = """
import torch

def load_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g) for _ in range(2)]

def per_sample_loss(model, batch):
    return model(batch).pow(2)[:, 0]
"""


def test_script_with_only_per_sample_loss(tmp_path):
    path = tmp_path / "calib.py"
    path.write_text(textwrap.dedent(SCRIPT))
    calib = load_calibration(path)
    assert calib.per_sample_loss is not None
    model = calib.call_load_model()
    batch = calib.call_batches()[0]
    torch.testing.assert_close(calib.call_loss(model, batch), model(batch).pow(2).mean())
    assert calib.call_per_sample_loss(model, batch).shape == (5,)
    path.write_text(textwrap.dedent(SCRIPT).replace("per_sample_loss", "loss_per_sample"))
    with pytest.raises(SubloraError, match="does not define loss"):
        load_calibration(path)
    path.write_text(textwrap.dedent(SCRIPT) + "\ndef loss(model, batch):\n    return model(batch).sum()\n")
    calib = load_calibration(path)
    torch.testing.assert_close(calib.call_loss(model, batch), model(batch).sum())  # the script's own loss wins
    path.write_text(textwrap.dedent(SCRIPT).replace("return model(batch)", "raise ValueError('boom'); return 0"))
    with pytest.raises(SubloraError, match="boom"):
        load_calibration(path).call_per_sample_loss(model, batch)


def test_auto_rule():
    assert "fisher" in KINDS and "auto" not in KINDS
    assert choose_kind(100, 4, "sublora")[0] == "exact"  # the PINN samples
    assert choose_kind(AUTO_MAX_HVPS, 1, "hessian")[0] == "exact"
    assert choose_kind(AUTO_MAX_HVPS + 1, 1, "sublora")[0] == "fisher"
    assert choose_kind(768, 8, "sublora-random")[0] == "fisher"  # GPT-2-small, rank 16 everywhere
    assert choose_kind(100, 4, "diag")[0] == "diag" and choose_kind(5000, 4, "diag")[0] == "fisher"
    assert choose_kind(10, 1, "linear")[0] == "fisher"
    assert choose_kind(10, 1, "magnitude")[0] == "none"
    for method in ("sublora", "diag", "linear", "exhaustive"):
        kind, reason = choose_kind(3000, 2, method)
        assert reason.endswith(".") and "\n" not in reason
    assert estimate_cost(1000, 4, "fisher") == {"hessian_bytes": 8_000_000, "hvps": 0, "passes": 4}
    # the time estimate, in loss evaluations: R rows for exact/diag (SECONDS_PER_HVP_ROW each), a few for fisher
    assert estimate_cost(100, 4, "exact", loss_seconds=0.01)["seconds"] == pytest.approx(100 * 1.5 * 0.01)
    assert estimate_cost(100, 4, "diag", loss_seconds=0.01)["seconds"] == pytest.approx(100 * 1.5 * 0.01)
    assert estimate_cost(100, 4, "fisher", loss_seconds=0.01)["seconds"] == pytest.approx(3 * 0.01)


def test_resolve_kind_follows_the_most_demanding_method():
    assert resolve_kind("diag", 10**6, 9, ["sublora"]) == ("diag", "--curvature diag was asked for.")
    assert resolve_kind("auto", 100, 4, ["magnitude", "linear", "sublora-random"])[0] == "exact"
    assert resolve_kind("auto", 100, 4, ["linear", "diag"])[0] == "diag"
    assert resolve_kind("auto", 100, 4, ["magnitude"])[0] == "none"  # a sweep of magnitude alone: nothing to predict
    assert resolve_kind("auto", AUTO_MAX_HVPS, 2, ["exhaustive"])[0] == "fisher"


def test_selection_drops_the_gradient_only_for_the_fisher_and_not_for_linear():
    g, H = torch.tensor([1.0, -2.0]), torch.eye(2)
    notes = ("a caveat about F",)
    fisher = Curvature("fisher", 0.0, g, H, H.diagonal(), 0.0, notes=notes)
    exact = Curvature("exact", 0.0, g, H, H.diagonal(), 0.0)
    assert not fisher.selection_inputs("sublora")["gradient"].any()
    assert not fisher.selection_inputs("diag")["gradient"].any()
    assert torch.equal(fisher.selection_inputs("linear")["gradient"], g)
    assert torch.equal(exact.selection_inputs("sublora")["gradient"], g)
    assert fisher.selection_inputs("hessian")["hessian"] is H
    assert fisher.notes_for(["linear"]) == [] and fisher.notes_for(["linear", "diag"]) == list(notes)


def test_compute_curvature_auto_resolves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sm = build(model, [lora("0", "linear", 4, 3, 2, seed=1)], lambda m, b: m(b).pow(2).mean(1))
    assert compute_curvature(sm, [torch.randn(4, 3, dtype=torch.float64)], "auto").kind == "exact"
