"""The data-free objectives: `magnitude` minimises the Frobenius error of the whole ΔW (keeps the largest Σσ², per
byte under a bytes budget), `balanced` minimises the largest per-module relative error."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_kohya import SD15, kohya_file

from sublora_cli.core.budget import Budget
from sublora_cli.core.select import RankBounds, select
from sublora_cli.formats import read_adapter

torch.set_num_threads(1)
WEAK = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_magnitude_ranks_by_sigma_squared_per_byte():
    """Four cheap σ = 1 against one dear σ = 3 costing all four: σ per byte keeps the four (error² 9), σ² per byte
    the one (error² 4), the smaller Frobenius error."""
    sigma = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    cost = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    selection = select("magnitude", sigma, Budget(cost, 4.0, unit="bytes"), RankBounds.from_ranks([4, 1]))
    assert selection.kept.tolist() == [False, False, False, False, True]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_under_a_rank_budget_magnitude_keeps_the_largest_sigma(seed, budget):
    """With equal costs σ² and σ order alike: the b largest σ over all modules."""
    rng = np.random.default_rng(seed)
    sigma = torch.tensor(rng.exponential(size=12), dtype=torch.float64)
    selection = select("magnitude", sigma, Budget.ranks(budget, 12), RankBounds.from_ranks([5, 4, 3]))
    assert set(torch.nonzero(selection.kept).flatten().tolist()) == set(torch.argsort(-sigma)[:budget].tolist())


def module_errors(sigma: torch.Tensor, kept: torch.Tensor, ranks: list[int]) -> list[float]:
    """Each module's relative squared Frobenius error ‖ΔW_m − ΔW_m'‖² / ‖ΔW_m‖² when `kept` components stay."""
    return [
        float(s[~k].square().sum() / s.square().sum())
        for s, k in zip(sigma.split(ranks), kept.split(ranks), strict=True)
    ]


def spectra(seed: int, n_modules: int) -> tuple[list[int], torch.Tensor]:
    """Modules of different ranks, norms and decays, each σ sorted descending as the SVD form gives them."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 5, n_modules).tolist()
    parts = [np.sort(rng.exponential(size=r) * 10 ** rng.uniform(-2, 2))[::-1] for r in ranks]
    return ranks, torch.tensor(np.concatenate(parts), dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 12))
def test_balanced_minimises_the_largest_module_error_under_a_rank_budget(seed, n_modules, budget):
    ranks, sigma = spectra(seed, n_modules)
    budget = min(budget, sum(ranks))
    selection = select("balanced", sigma, Budget.ranks(budget, sum(ranks)), RankBounds.from_ranks(ranks))
    assert int(selection.kept.sum()) == budget
    best = min(  # every split of the budget over the modules, each keeping its largest σ
        max(module_errors(sigma, prefix_mask(ranks, split), ranks))
        for split in itertools.product(*(range(r + 1) for r in ranks))
        if sum(split) == budget
    )
    assert max(module_errors(sigma, selection.kept, ranks)) <= best + 1e-12


def prefix_mask(ranks: list[int], keep: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.arange(r) < k for r, k in zip(ranks, keep, strict=True)])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.floats(0.0, 1.0))
def test_balanced_drops_no_module_while_every_first_component_fits(seed, n_modules, spare):
    """Under a bytes budget that pays for one component of every module and a share of the rest."""
    ranks, sigma = spectra(seed, n_modules)
    per_module = np.random.default_rng(seed + 1).integers(1, 6, n_modules).astype(float)
    cost = torch.tensor(np.repeat(per_module, ranks), dtype=torch.float64)
    capacity = float(per_module.sum()) + spare * float(cost.sum() - per_module.sum())
    selection = select("balanced", sigma, Budget(cost, capacity, unit="bytes"), RankBounds.from_ranks(ranks))
    assert float(cost[selection.kept].sum()) <= capacity + 1e-9
    assert max(module_errors(sigma, selection.kept, ranks)) < 1.0


def whole_error(before, after) -> tuple[float, float]:
    """‖ΔW − ΔW'‖F / ‖ΔW‖F over the whole file, and the largest per-module relative error, from two files."""
    written = {m.name: m.scale * m.B.double() @ m.A.double() for m in read_adapter(after).modules}
    errors, norms = [], []
    for m in read_adapter(before).modules:
        delta = m.scale * m.B.double() @ m.A.double()
        residual = delta - written.get(m.name, torch.zeros_like(delta))
        errors.append(float(residual.square().sum()))
        norms.append(float(delta.square().sum()))
    return (sum(errors) / sum(norms)) ** 0.5, max((e / n) ** 0.5 for e, n in zip(errors, norms, strict=True))


def test_the_written_files_errors_are_the_reports_and_the_objectives_trade_them(tmp_path, run_cli):
    """On a kohya file (LoCon conv included) with one module 20× weaker than the others, under one bytes budget:
    magnitude drops that module and has the smaller whole-file error, balanced keeps it and has the smaller
    worst-module error, and the report's figures are those of the file as written."""
    path = kohya_file(tmp_path / "sd15.safetensors", SD15, dtype=torch.float32)
    tensors = load_file(str(path))
    tensors[f"{WEAK}.lora_up.weight"] *= 0.05
    save_file(tensors, str(path))
    measured, kept = {}, {}
    for method in ("magnitude", "balanced"):
        out = tmp_path / method
        result = run_cli("prune", path, "--budget", "3KB", "--method", method, "--out", out, "--json")
        assert result.code == 0, result.stderr
        totals = json.loads(result.stdout)["totals"]
        measured[method] = whole_error(path, out / path.name)
        kept[method] = load_file(str(out / path.name)).keys()
        assert (totals["relative_error"], totals["worst_module_error"]) == pytest.approx(measured[method], rel=1e-5)
    assert f"{WEAK}.alpha" not in kept["magnitude"] and f"{WEAK}.alpha" in kept["balanced"]
    assert measured["magnitude"][1] == 1.0
    assert measured["magnitude"][0] < measured["balanced"][0]
    assert measured["balanced"][1] < measured["magnitude"][1]
