"""One loop over calibration batches with one reduce step (where a data-parallel all-reduce goes): the exact and
diagonal Hessian, the Fisher and the mean loss all pass through it, and sharding plus a sum over shards in the
reduce gives the single-process result."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sublora_cli.core.svd import factor_svd
from sublora_cli.errors import SubloraError
from sublora_cli.formats.base import LoraModule
from sublora_cli.model import batchloop
from sublora_cli.model.batchloop import Sums, over_batches
from sublora_cli.model.curvature import compute_curvature
from sublora_cli.model.reparam import SigmaModel


def add_batch(index: int, batch, sums: Sums, meter) -> None:
    sums.add("value", float(batch.sum()))
    sums.add("vector", batch.double())
    sums.add("rows", batch.double()[:2], at=slice(1, 3))
    sums.add_gram("gram", batch.double()[None])
    sums.add("batches", 1)


def zeros() -> Sums:
    return Sums(
        value=0.0,
        vector=torch.zeros(3, dtype=torch.float64),
        rows=torch.zeros(3, dtype=torch.float64),
        gram=torch.zeros(3, 3, dtype=torch.float64),
        batches=0,
    )


BATCHES = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 4.0]), torch.tensor([2.0, 0.0, -2.0])]


def test_totals_are_the_per_batch_sums_reduced_once_each_with_progress():
    reduced, seen = [], []

    def record(name, total):
        reduced.append(name)
        return total

    totals = over_batches(BATCHES, add_batch, zeros(), progress=lambda *a: seen.append(a), stage="s", reduce=record)
    X = torch.stack(BATCHES).double()
    assert totals["value"] == sum(float(b.sum()) for b in BATCHES) and totals["batches"] == 3
    assert torch.equal(totals["vector"], X.sum(0)) and torch.equal(totals["rows"][1:], X[:, :2].sum(0))
    torch.testing.assert_close(totals["gram"], X.T @ X, rtol=1e-15, atol=0)
    assert sorted(reduced) == sorted(totals) and len(reduced) == len(set(reduced))
    assert seen == [("s", 0, 3), ("s", 1, 3), ("s", 2, 3), ("s", 3, 3)]


def test_a_doubling_reduce_doubles_every_total():
    """A stand-in for the all-reduce over two processes that saw the same batches."""
    plain = over_batches(BATCHES, add_batch, zeros())
    doubled = over_batches(BATCHES, add_batch, zeros(), reduce=lambda name, total: 2 * total)
    for name, total in plain.items():
        assert torch.equal(torch.as_tensor(doubled[name]), torch.as_tensor(2 * total)), name


def test_finer_progress_from_the_step_is_not_repeated():
    seen = []

    def step(index, batch, sums, meter):
        if index == 0:  # reports its own work; batch 1 reports none
            meter.advance(1)
            meter.advance(3)

    over_batches([0, 1], step, Sums(), progress=lambda *a: seen.append(a), work_per_batch=4)
    assert seen == [("curvature", 0, 8), ("curvature", 1, 8), ("curvature", 4, 8), ("curvature", 8, 8)]


# ---- the callers: curvature (exact, diag, fisher) and the mean loss


def lora(name: str, out: int, inp: int, r: int, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g) * 0.5
    return LoraModule(name, "linear", A, B, float(r), 1.0, tuple(A.shape), tuple(B.shape))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    modules = [lora("0", 6, 3, 3, 1), lora("2", 2, 6, 2, 2)]
    spectra = [factor_svd(m.B, m.A, m.scale) for m in modules]

    def per_sample(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean(1)

    def mean(m, b):
        return per_sample(m, b).mean()

    sm = SigmaModel(model, modules, spectra, mean, dtype=torch.float64, per_sample_loss_fn=per_sample)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)) for n in (4, 5, 3)]
    return sm, batches


COUNTS = ("batches", "samples")
QUANTITIES = {
    "exact": {"loss", "batches", "gradient", "hessian"},
    "diag": {"loss", "batches", "gradient", "diag"},
    "fisher": {"loss", "samples", "batches", "gradient", "fisher"},
}


@pytest.mark.parametrize("kind", sorted(QUANTITIES))
def test_curvature_reduces_each_quantity_once(setup, monkeypatch, kind):
    sm, batches = setup
    reduced = []
    monkeypatch.setattr(batchloop, "across_processes", lambda name, total: reduced.append(name) or total)
    compute_curvature(sm, batches, kind)
    assert sorted(reduced) == sorted(QUANTITIES[kind])
    reduced.clear()
    sm.mean_loss(sm.sigma, batches)
    assert sorted(reduced) == ["batches", "loss"]


@pytest.mark.parametrize("kind", sorted(QUANTITIES))
def test_means_are_taken_after_the_reduce(setup, monkeypatch, kind):
    """Doubling every total (two processes that saw the same batches) keeps the means; doubling the sums but
    not the counts doubles loss, gradient and curvature."""
    sm, batches = setup
    plain, plain_loss = compute_curvature(sm, batches, kind), sm.mean_loss(sm.sigma, batches)
    monkeypatch.setattr(batchloop, "across_processes", lambda name, total: 2 * total)
    twice = compute_curvature(sm, batches, kind)
    assert twice.loss == pytest.approx(plain.loss, rel=1e-15) and twice.n_batches == 2 * plain.n_batches
    torch.testing.assert_close(twice.gradient, plain.gradient, rtol=1e-15, atol=0)
    torch.testing.assert_close(twice.hessian_diag, plain.hessian_diag, rtol=1e-15, atol=0)
    assert sm.mean_loss(sm.sigma, batches) == pytest.approx(plain_loss, rel=1e-15)
    monkeypatch.setattr(batchloop, "across_processes", lambda name, total: total if name in COUNTS else 2 * total)
    doubled = compute_curvature(sm, batches, kind)
    assert doubled.loss == pytest.approx(2 * plain.loss, rel=1e-14)
    torch.testing.assert_close(doubled.gradient, 2 * plain.gradient, rtol=1e-14, atol=0)
    torch.testing.assert_close(doubled.hessian_diag, 2 * plain.hessian_diag, rtol=1e-14, atol=0)
    assert sm.mean_loss(sm.sigma, batches) == pytest.approx(2 * plain_loss, rel=1e-14)


def two_ranks(monkeypatch, call):
    """call() as rank 0 of a simulated two-process run: rank 1 first computes its shard (every other batch),
    then rank 0 computes its own and adds rank 1's totals in the reduce (what the all-reduce would do)."""

    def shard(rank):
        return lambda batches: ((i, b) for i, b in enumerate(batches) if i % 2 == rank)

    def keep(name, total):
        other[name] = total.clone() if isinstance(total, torch.Tensor) else total  # callers divide in place
        return total

    other: dict = {}
    monkeypatch.setattr(batchloop, "this_process", shard(1))
    monkeypatch.setattr(batchloop, "across_processes", keep)
    call()
    monkeypatch.setattr(batchloop, "this_process", shard(0))
    monkeypatch.setattr(batchloop, "across_processes", lambda name, total: total + other[name])
    return call()


@pytest.mark.parametrize("kind", sorted(QUANTITIES))
def test_sharded_batches_summed_in_the_reduce_match_one_process(setup, monkeypatch, kind):
    sm, batches = setup
    single, single_loss = compute_curvature(sm, batches, kind), sm.mean_loss(sm.sigma, batches)
    sharded = two_ranks(monkeypatch, lambda: compute_curvature(sm, batches, kind))
    assert sharded.loss == pytest.approx(single.loss, rel=1e-14) and sharded.n_batches == 3
    assert sharded.n_samples == single.n_samples
    torch.testing.assert_close(sharded.gradient, single.gradient, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sharded.hessian_diag, single.hessian_diag, rtol=1e-12, atol=1e-14)
    if single.hessian is not None:
        torch.testing.assert_close(sharded.hessian, single.hessian, rtol=1e-12, atol=1e-14)
    assert two_ranks(monkeypatch, lambda: sm.mean_loss(sm.sigma, batches)) == pytest.approx(single_loss, rel=1e-14)


def test_no_batches_is_an_error_unless_another_process_had_some(setup, monkeypatch):
    sm, batches = setup
    with pytest.raises(SubloraError, match="No calibration batches"):
        sm.mean_loss(sm.sigma, [])
    # a rank whose shard is empty: the reduce brings the other ranks' batches
    others = {"loss": 3.0, "batches": 2}
    monkeypatch.setattr(batchloop, "this_process", lambda batches: iter(()))
    monkeypatch.setattr(batchloop, "across_processes", lambda name, total: total + others[name])
    assert sm.mean_loss(sm.sigma, batches) == 1.5
