"""SigmaModel at the trained σ must be the base model plus s·B·A, for every layer type it supports."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import TinyConvNet, tiny_gpt2

from sublora_cli.core.svd import factor_svd
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import LoraModule
from sublora_cli.model.reparam import SigmaModel


def lora(name: str, kind: str, out: int, inp: int, r: int, scale: float, a_shape=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g) * 0.3
    return LoraModule(name, kind, A, B, scale * r, scale, tuple(a_shape or A.shape), tuple(B.shape))


def build(model, modules, loss_fn=None, dtype=torch.float64):
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]
    return SigmaModel(model, modules, spectra, loss_fn or (lambda m, b: m(b).sum()), dtype=dtype)


def delta(m: LoraModule) -> torch.Tensor:
    return m.scale * m.B.double() @ m.A.double()


def small_gpt2():
    return tiny_gpt2(n_layer=1, n_embd=16, vocab_size=40, n_positions=16)


def test_linear_and_conv2d_match_merged_weights():
    torch.manual_seed(0)
    base = TinyConvNet().double().eval()
    conv = lora("conv", "conv", 8, 3 * 3 * 3, 4, 2.0, a_shape=(4, 3, 3, 3))
    head = lora("head", "linear", 5, 128, 4, 0.5, seed=1)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.conv.weight += delta(conv).reshape(8, 3, 3, 3)
        merged.head.weight += delta(head)
    sm = build(base, [conv, head])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(sm.model(x), merged(x), rtol=1e-10, atol=1e-10)
    assert sm.offsets == [0, 4] and sm.size == 8


def test_gpt2_conv1d_and_embedding_match_merged_weights():
    base = small_gpt2().double()
    c_attn = lora("transformer.h.0.attn.c_attn", "linear", 48, 16, 4, 2.0)  # Conv1D weight is (16, 48)
    wte = lora("transformer.wte", "embedding", 16, 40, 3, 1.0, seed=2)  # ΔW is dim × vocab
    merged = copy.deepcopy(base)
    merged.lm_head.weight = nn.Parameter(base.lm_head.weight.clone())  # LoRA on wte leaves the tied head alone
    with torch.no_grad():
        merged.transformer.h[0].attn.c_attn.weight += delta(c_attn).T
        merged.transformer.wte.weight += delta(wte).T
    sm = build(base, [c_attn, wte], loss_fn=lambda m, b: m(input_ids=b).logits.sum())
    ids = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(sm.model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-9, atol=1e-9)


def test_matches_peft_on_conv_and_gpt2():
    """The same factors applied by peft itself: the reference the written adapter will be loaded with."""
    from peft import LoraConfig, get_peft_model

    cases = [
        (TinyConvNet(), ["conv", "head"], {"x": torch.randn(2, 3, 8, 8)}),
        (small_gpt2(), ["c_attn", "wte"], {"input_ids": torch.randint(0, 40, (2, 7))}),
    ]
    for base, targets, inputs in cases:
        torch.manual_seed(1)
        peft_model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        ).eval()
        modules = []
        for name, layer in peft_model.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                A, B, kind = layer.lora_A["default"].weight, layer.lora_B["default"].weight, "linear"
                a_shape = tuple(A.shape)
                if A.dim() == 4:
                    A, B, kind = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), "conv"
            elif hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
                A, B, kind = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], "embedding"
                a_shape = tuple(A.shape)
            else:
                continue
            scale = layer.scaling["default"]
            modules.append(LoraModule(name, kind, A.detach(), B.detach(), scale * A.shape[0], scale, a_shape, B.shape))
        assert len(modules) == 2
        with torch.no_grad():
            expected = peft_model(**inputs)
            sm = build(base, modules, dtype=torch.float32)
            got = sm.model(**inputs)
        if not isinstance(got, torch.Tensor):
            got, expected = got.logits, expected.logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mask_zero_gives_base_model_and_loss_is_differentiable():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    reference = copy.deepcopy(base)
    sm = build(base, [lora("0", "linear", 5, 6, 3, 1.0), lora("2", "linear", 3, 5, 2, 1.0, seed=3)])
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(sm.loss(sm.sigma * 0, x), reference(x).sum())
    s = sm.sigma.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sm.loss(s, x), s)
    assert g.shape == (5,) and g.abs().sum() > 0
    assert all(not p.requires_grad for p in sm.model.parameters())
    assert sm.mean_loss(sm.sigma * 0, [x, x]) == pytest.approx(reference(x).sum().item())
    assert sm.evaluate(sm.sigma * 0, lambda m: {"out": m(x).sum().item()}) == {
        "out": pytest.approx(reference(x).sum().item())
    }
    # outside loss/evaluate the model uses the trained σ again
    assert not torch.allclose(sm.model(x), reference(x))


def test_errors_name_the_problem():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with pytest.raises(SubloraError, match=r"'1\.weight'.*no such module"):
        build(base, [lora("1.weight", "linear", 5, 6, 2, 1.0)])
    with pytest.raises(SubloraError, match="LayerNorm"):
        build(base, [lora("1", "linear", 5, 5, 2, 1.0)])
    with pytest.raises(SubloraError, match="5x7"):
        build(base, [lora("0", "linear", 5, 7, 2, 1.0)])
    attention = nn.ModuleDict({"query": nn.Linear(2, 2), "value": nn.Linear(2, 2)})
    with pytest.raises(SubloraError, match="Closest names: query"):
        build(attention, [lora("qeury", "linear", 2, 2, 1, 1.0)])


def test_batches_reach_the_loss_on_the_model_device():
    """Targets used next to the model's output are moved with the model (a GPU run with CPU-built batches);
    nested structure, dtypes and non-tensors are kept. On the CPU the very same tensors are passed through."""
    seen = {}

    def loss_fn(model, batch):
        seen["batch"] = batch
        return (model(batch["x"]).sum(1) - batch["y"]).square().mean()

    base = nn.Sequential(nn.Linear(4, 3)).double()
    sm = build(base, [lora("0", "linear", 3, 4, 2, 1.0)], loss_fn=loss_fn)
    batch = {"x": torch.randn(5, 4), "y": torch.zeros(5, dtype=torch.float32), "meta": ("a", [torch.arange(3)])}
    sm.loss(sm.sigma, batch)
    moved = seen["batch"]
    assert moved["x"] is batch["x"] and moved["y"].dtype == torch.float32
    assert moved["meta"][0] == "a" and moved["meta"][1][0] is batch["meta"][1][0]
    assert sm.on_device(torch.ones(2)).device == sm.device
