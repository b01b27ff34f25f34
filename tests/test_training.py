"""Alternating SubLoRA (`prune --rounds`, the paper's Algorithm 4): the gradient products the optimizers rely on,
the round loop's promises (budget after every round, --rounds 0 is the plain prune, repeatable, the written file
is what the report measured, train_batches() is what is trained on), σ-only training, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_faithful import reloaded
from test_peft_interop import GPT2_CALIB, peft_loss
from test_prune_calibrated import CALIB, make_problem

from sublora_cli.commands.prune import PruneOptions, prune
from sublora_cli.formats import PrunedModule, read_adapter
from sublora_cli.model.calibrated import open_calibration
from sublora_cli.pipeline.spectra import adapter_spectra
from sublora_cli.training.loop import (
    SigmaState,
    StepGradient,
    TrainSettings,
    after_prune,
    as_adapter,
    cosine_lr,
    initial_state,
    train,
)
from sublora_cli.training.optimizers import OPTIMIZERS

peft = pytest.importorskip("peft")
from conftest import save_adapter  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
ROUND_KEYS = {
    "round", "steps", "training_loss_first", "training_loss_last", "loss_after_training", "loss_after_selection",
    "loss_after", "predicted_increase",
    "refit_accepted", "rank", "ranks", "seconds", "training_seconds", "heldout_after", "written",
}  # fmt: skip

# The tiny MLP problem with a loss that differentiates the model w.r.t. its inputs, as a PINN's does: the
# gradient in ΔW then flows through a double backward, which a product of activations and output gradients misses.
INPUT_DERIVATIVE_LOSS = CALIB.replace(
    "def loss(model, batch):\n    return (model(batch) - target(batch)).pow(2).mean()",
    "def loss(model, batch):\n"
    "    x = batch.clone().requires_grad_(True)\n"
    "    u = model(x)\n"
    "    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)\n"
    "    return (u - target(x)).pow(2).mean() + (du.sum(-1) - 1).pow(2).mean()",
)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return make_problem(tmp_path_factory.mktemp("training") / "problem")


def untied_weights(model: torch.nn.Module) -> set[int]:
    """The ids of the parameters that appear under one name only."""
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    return {key for key, count in names.items() if count == 1}


def dense_gradients(sigma_model, adapter, factors, batch) -> list[torch.Tensor]:
    """∂L/∂ΔW of every module as the out×in matrix, from the base layers' own weight gradients (ΔW adds to W)."""
    layers = [sigma_model.model.get_submodule(m.name) for m in adapter.modules]
    for layer in layers:
        layer.weight.requires_grad_(True)
    terms = [[(f.scale * f.B, f.A.T)] for f in factors]
    with sigma_model.using_factors(terms), torch.enable_grad():
        grads = torch.autograd.grad(sigma_model.loss(sigma_model.sigma, batch), [layer.weight for layer in layers])
    for layer in layers:
        layer.weight.requires_grad_(False)
    result = []
    for module, layer, grad in zip(adapter.modules, layers, grads, strict=True):
        if type(layer).__name__ == "Conv1D" or isinstance(layer, torch.nn.Embedding):
            grad = grad.T  # stored (in, out) / (num, dim); ΔW is out×in / dim×num
        result.append(grad.reshape(module.shape))
    return result


@pytest.mark.parametrize("case", ["mlp", "input-derivatives", "gpt2"])
def test_gradient_products_equal_those_of_the_dense_gradient(case, tmp_path):
    """Probes give G·Mᵀ and Nᵀ·G (and ∇B, ∇A) of the true ∂L/∂ΔW, for Linear, Conv1D and Embedding layers and
    for a loss with input derivatives."""
    if case == "gpt2":
        adapter_path = save_adapter("gpt2", tmp_path / "adapter")
        calib = tmp_path / "calib.py"
        calib.write_text(GPT2_CALIB)
    else:
        adapter_path, calib = make_problem(tmp_path / "p", INPUT_DERIVATIVE_LOSS if case != "mlp" else CALIB)
    adapter = read_adapter(adapter_path)
    spectra = adapter_spectra(adapter)
    calibrated = open_calibration(calib, adapter, spectra, dtype="float64")
    model = calibrated.sigma_model
    state = initial_state(adapter, spectra, "factors", torch.float64, model.device)
    batch = calibrated.batches[0]
    gradient = StepGradient(model, state.factors, batch, 0)
    G = dense_gradients(model, adapter, state.factors, batch)
    assert gradient.loss == pytest.approx(model.mean_loss(model.sigma, [batch]), rel=1e-10)
    g = torch.Generator().manual_seed(0)
    right = [torch.randn(3, f.A.shape[1], generator=g, dtype=torch.float64) for f in state.factors]
    left = [torch.randn(f.B.shape[0], 2, generator=g, dtype=torch.float64) for f in state.factors]
    # a weight tied elsewhere (GPT-2's wte is also its lm_head) has a gradient that is not ∂L/∂ΔW alone
    tied = untied_weights(model.model)
    checked = [i for i, m in enumerate(adapter.modules) if id(model.model.get_submodule(m.name).weight) in tied]
    assert len(checked) >= 2
    with torch.no_grad():  # as the optimizers call them: the probes must build their own graph
        products = gradient.gradient_times(right), gradient.times_gradient(left), gradient.factor_gradients()
    for i in checked:
        f, dense = state.factors[i], G[i]
        torch.testing.assert_close(products[0][i], dense @ right[i].T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(products[1][i], left[i].T @ dense, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(products[2][i][0], f.scale * dense @ f.A.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(products[2][i][1], f.scale * f.B.T @ dense, rtol=1e-9, atol=1e-12)
    calibrated.close()


def after_keeping_two(problem, train: str):
    """The tiny problem's calibration, adapter, spectra, a prune keeping 2 components per module, and the state
    the next round would start from."""
    adapter_path, calib = problem
    adapter = read_adapter(adapter_path)
    spectra = adapter_spectra(adapter)
    calibrated = open_calibration(calib, adapter, spectra, dtype="float64")
    state = initial_state(adapter, spectra, train, torch.float64, calibrated.sigma_model.device)
    pruned = [PrunedModule.keeping(m, s, [0, 1]) for m, s in zip(adapter.modules, spectra, strict=True)]
    return calibrated, adapter, spectra, pruned, after_prune(state, pruned, torch.Generator().manual_seed(0))


def test_a_prune_leaves_the_update_as_written_and_fresh_components_can_grow(problem):
    """After a prune the kept components are the written ones and the pruned ones come back as PEFT initialises
    them (B = 0, A ~ U(±1/√in)): the update is unchanged until training moves them, and training does."""
    calibrated, adapter, spectra, pruned, fresh = after_keeping_two(problem, "factors")
    model = calibrated.sigma_model
    for low_rank, p in zip(fresh.factors, pruned, strict=True):
        assert low_rank.B.shape == p.module.B.shape and low_rank.A.shape == p.module.A.shape
        torch.testing.assert_close(low_rank.scale * low_rank.B @ low_rank.A, p.spectrum.dense(), rtol=1e-10, atol=1e-12)
        assert not low_rank.B[:, 2:].any() and low_rank.A[2:].abs().max() <= 1 / p.module.shape[1] ** 0.5
    settings = TrainSettings("factors", "adam", 1e-2, 10, 0)
    trained, losses = train(model, fresh, calibrated.batches, settings, "test")
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert all(low_rank.B[:, 2:].abs().max() > 0 for low_rank in trained.factors)  # regrowing
    calibrated.close()


def test_sigma_training_moves_only_sigma_and_a_pruned_sigma_regrows(problem):
    calibrated, adapter, spectra, _, state = after_keeping_two(problem, "sigma")
    model = calibrated.sigma_model
    assert isinstance(state, SigmaState)
    sigma = state.sigma.view(len(spectra), -1)
    assert not sigma[:, 2:].any() and torch.allclose(sigma[:, :2], torch.stack([s.sigma[:2] for s in spectra]))
    trained, _ = train(model, state, calibrated.batches, TrainSettings("sigma", "adam", 1e-2, 10, 0), "test")
    assert trained.sigma.view(len(spectra), -1)[:, 2:].abs().max() > 0  # pruned σ regrow from 0
    for module, spectrum in zip(as_adapter(adapter, trained).modules, spectra, strict=True):
        delta = module.scale * module.B.double() @ module.A.double()
        U, V = spectrum.U, spectrum.V
        assert torch.linalg.norm(delta - U @ (U.T @ delta @ V) @ V.T) < 1e-6 * torch.linalg.norm(delta)
    calibrated.close()


def test_the_schedule_warms_up_peaks_and_ends_at_zero():
    rates = [cosine_lr(1.0, step, 100) for step in range(101)]
    assert rates[0] == pytest.approx(1 / 11) and rates[:10] == sorted(rates[:10])  # warm-up over the first tenth
    assert max(rates) == rates[10] == 1.0 and rates[55] == pytest.approx(0.5)
    assert rates[10:] == sorted(rates[10:], reverse=True) and rates[100] == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(1.0, 0, 5) == 1.0  # too short for a warm-up


def rounds_options(calib: Path, **changes) -> PruneOptions:
    settings = {"budget": "3", "calib": calib, "dtype": "float64", "rounds": 3, "train_steps": 15, "lr": 1e-2}
    return PruneOptions(**{**settings, **changes})


def without_timings(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    report.pop("timings")
    for r in report.get("rounds") or []:
        r.pop("seconds"), r.pop("training_seconds")
    return report


def test_rounds_zero_is_the_plain_prune(problem, tmp_path):
    """--rounds 0 (the default) writes exactly what the prune without training writes, whatever the training
    settings say."""
    adapter, calib = problem
    plain = prune(adapter, PruneOptions(budget="3", calib=calib), out_dir=tmp_path / "plain").report
    options = PruneOptions(budget="3", calib=calib, rounds=0, optimizer="lorsum", lr=5.0, train_steps=7)
    zero = prune(adapter, options, out_dir=tmp_path / "zero").report
    assert (tmp_path / "plain" / WEIGHTS).read_bytes() == (tmp_path / "zero" / WEIGHTS).read_bytes()
    assert zero["rounds"] is None and not (tmp_path / "zero" / "training.png").exists()
    plain, zero = without_timings(plain), without_timings(zero)
    plain.pop("options"), zero.pop("options")
    assert plain == zero


@pytest.mark.parametrize("budget", ["3", "300B"], ids=["rank", "bytes"])
def test_every_round_stays_within_the_budget_and_the_file_is_what_the_report_measured(problem, budget, tmp_path):
    adapter, calib = problem
    out = tmp_path / "out"
    report = prune(adapter, rounds_options(calib, budget=budget), out_dir=out).report
    assert len(report["rounds"]) == 3 and all(set(r) == ROUND_KEYS for r in report["rounds"])
    capacity = report["budget"]["capacity"]
    cost = {m["name"]: (sum(m["shape"]) * 4 if budget.endswith("B") else 1) for m in report["modules"]}
    for r in report["rounds"]:
        assert sum(cost[name] * rank for name, rank in r["ranks"].items()) <= capacity
        assert r["rank"] == sum(r["ranks"].values()) and r["steps"] == 15
    assert report["rounds"][-1]["loss_after"] == report["loss"]["after"]
    assert report["loss"]["predicted_increase"] is None and report["options"]["rounds"] == 3
    written = load_file(str(out / WEIGHTS))
    assert sum(t.shape[0] for k, t in written.items() if "lora_A" in k) == report["rounds"][-1]["rank"]
    loss_after, _ = reloaded(out, calib, torch.float32)  # the script's batches are float32
    assert report["loss"]["after"] == pytest.approx(loss_after, rel=1e-5)
    assert (out / "training.png").stat().st_size > 0
    assert "train" in report["timings"]


def test_training_lowers_the_loss_the_prune_alone_reaches(problem, tmp_path):
    """The point of the rounds: on a deep cut, training between prunes ends below the training-free prune."""
    adapter, calib = problem
    free = prune(adapter, PruneOptions(budget="2", calib=calib, dtype="float64"), out_dir=tmp_path / "free").report
    alternating = prune(adapter, rounds_options(calib, budget="2"), out_dir=tmp_path / "alt").report
    assert alternating["loss"]["after"] < free["loss"]["after"]


def test_training_png_shows_the_budget_and_the_training_free_prune(problem, tmp_path, saved_figures):
    """training.png answers "did the rounds beat a plain prune?": the training-free prune to the same budget is a
    reference line (and in the report), and the title names the budget."""
    adapter, calib = problem
    options = rounds_options(calib, budget="2")
    free = prune(adapter, replace(options, rounds=0), out_dir=tmp_path / "free").report
    report = prune(adapter, options, out_dir=tmp_path / "alt").report
    assert report["loss"]["training_free"] == pytest.approx(free["loss"]["after"], rel=1e-9)
    ((figure, _),) = [(f, p) for f, p in saved_figures if str(p).endswith("training.png")]
    (ax,) = figure.axes
    assert "budget 2 (rank 2 kept)" in ax.get_title()
    (reference,) = [line for line in ax.get_lines() if line.get_label() == "training-free prune, same budget"]
    assert reference.get_ydata()[0] == pytest.approx(free["loss"]["after"], rel=1e-9)
    assert ax.get_legend() is None and "training-free prune, same budget" in [
        t.get_text() for t in figure.legends[0].get_texts()
    ]  # the legend sits beside the axes


def test_runs_repeat_and_the_seed_matters(problem, tmp_path):
    adapter, calib = problem
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (0, 0, 1), strict=True):
        prune(adapter, rounds_options(calib, seed=seed, rounds=2), out_dir=out)
    a, b, c = ((out / WEIGHTS).read_bytes() for out in outs)
    assert a == b and a != c


@pytest.mark.parametrize(
    ("optimizer", "train", "lr"),
    [("adam", "factors", 3e-2), ("sgd", "factors", 0.3), ("altlora", "factors", 0.3), ("altlora+", "factors", 3e-2),
     ("lorsum", "factors", 0.3), ("adam", "sigma", 3e-2), ("sgd", "sigma", 10.0)],
)  # fmt: skip
def test_every_optimizer_trains_gpt2_and_the_written_file_reloads_in_peft(optimizer, train, lr, tmp_path):
    """A stock transformers GPT-2 (Conv1D, an embedding, modules_to_save, lora_only biases): each optimizer lowers
    the loss in training, and peft loads the written adapter with the loss the report gives."""
    adapter = save_adapter("gpt2", tmp_path / "adapter")
    calib = tmp_path / "calib.py"
    calib.write_text(GPT2_CALIB)
    options = PruneOptions(
        budget="60%", calib=calib, rounds=2, train_steps=6, optimizer=optimizer, train=train, lr=lr,
        curvature="fisher", dtype="float32",
    )  # fmt: skip
    report = prune(adapter, options, out_dir=tmp_path / "out").report
    first = report["rounds"][0]
    assert first["loss_after_training"] < report["loss"]["before"]
    assert report["loss"]["after"] == pytest.approx(peft_loss(tmp_path / "out", calib), rel=1e-5)


def test_a_bf16_adapter_is_trained_and_written_in_bf16(tmp_path):
    """Trained factors are rounded to the storage dtype before they are measured: the report is the file."""
    from test_faithful import CALIB_ONE_BATCH, adapter_in

    adapter = adapter_in(torch.bfloat16, tmp_path / "bf16")
    calib = tmp_path / "calib.py"
    calib.write_text(CALIB_ONE_BATCH)
    options = PruneOptions(budget="30", calib=calib, rounds=1, train_steps=5, dtype="float64", lr=1e-5)
    report = prune(adapter, options, out_dir=tmp_path / "out").report
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "out" / WEIGHTS)).values())
    loss_after, _ = reloaded(tmp_path / "out", calib, torch.float64)
    assert report["loss"]["after"] == pytest.approx(loss_after, rel=1e-5)


TRAIN_BATCHES = """
def train_batches():
    Path(__file__).with_name("train_batches_called").write_text("yes")
    g = torch.Generator().manual_seed(7)
    return [torch.randn(16, 3, generator=g) * 2 for _ in range(2)]
"""


def test_train_batches_are_what_the_rounds_train_on(problem, tmp_path):
    adapter, calib = problem
    script = tmp_path / "calib.py"
    script.write_text(calib.read_text() + TRAIN_BATCHES)
    (tmp_path / "base.safetensors").write_bytes((calib.parent / "base.safetensors").read_bytes())
    with_train = prune(adapter, rounds_options(script, rounds=1), out_dir=tmp_path / "a").report
    without = prune(adapter, rounds_options(calib, rounds=1), out_dir=tmp_path / "b").report
    assert (tmp_path / "train_batches_called").read_text() == "yes"
    assert with_train["rounds"][0]["loss_after_training"] != without["rounds"][0]["loss_after_training"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--rounds", "2"], 1, "needs a calibration script"),
        (["--rounds", "2", "--train", "sigma", "--optimizer", "altlora"], 1, "only sgd, adam apply"),
        (["--rounds", "2", "--budget", "auto", "--max-loss-increase", "5%"], 1, "needs a fixed --budget"),
        (["--rounds", "-1"], 2, "is below 0"),
        (["--train-steps", "0"], 2, "is below 1"),
        (["--lr", "0"], 2, "is not positive"),
        (["--optimizer", "lbfgs"], 2, "is not one of"),
        (["--train", "everything"], 2, "is not one of"),
        (["--rounds", "1", "--optimizer", "sgd", "--lr", "1e30"], 1, "Training diverged"),
    ],
    ids=["no-calib", "sigma-altlora", "auto-budget", "negative-rounds", "no-steps", "zero-lr", "optimizer",
         "train", "diverges"],
)  # fmt: skip
def test_bad_training_settings_are_refused_and_nothing_is_written(problem, args, code, message, tmp_path, run_cli):
    adapter, calib = problem
    with_calib = [] if args == ["--rounds", "2"] else ["--calib", calib]
    budget = [] if "--budget" in args else ["--budget", "3"]
    out = tmp_path / "out"
    result = run_cli("prune", adapter, *with_calib, *budget, *args, "--out", out)
    assert result.code == code, result.stderr
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_train_batches_that_are_not_batches_are_refused(problem, tmp_path, run_cli):
    adapter, calib = problem
    script = tmp_path / "calib.py"
    script.write_text(calib.read_text() + "\ndef train_batches():\n    return 3\n")
    (tmp_path / "base.safetensors").write_bytes((calib.parent / "base.safetensors").read_bytes())
    result = run_cli("prune", adapter, "--calib", script, "-b", 3, "--rounds", 1, "--out", tmp_path / "out")
    assert result.code == 1 and "train_batches() in" in result.stderr and "not iterable" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_training_leaves_nothing_written(problem, tmp_path):
    adapter, calib = problem
    out = tmp_path / "out"
    paths = [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = [sys.executable, "-m", "sublora_cli", "prune", str(adapter), "--calib", str(calib), "-b", "3",
               "--rounds", "100", "--train-steps", "100000", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # import, calibration, and into the first round's training
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], stderr


def test_the_optimizer_registry_names_what_each_trains():
    assert set(OPTIMIZERS) == {"sgd", "adam", "altlora", "altlora+", "lorsum"}
    assert {name for name, spec in OPTIMIZERS.items() if "sigma" in spec.trains} == {"sgd", "adam"}
    assert all(spec.default_lr > 0 for spec in OPTIMIZERS.values())


def test_two_torchrun_processes_train_as_one(problem, tmp_path):
    """Under torchrun each process takes every N-th training batch and the gradients are averaged: with the same
    batch on both processes that is exactly one process's step, so the rounds end at the same adapter."""
    from test_distributed import launch

    adapter, calib = problem
    script = tmp_path / "calib.py"
    three_batches = "return [torch.randn(16, 3, generator=g) for _ in range(3)]"
    one_batch_twice = "b = torch.randn(16, 3, generator=g); return [b, b]"
    script.write_text(calib.read_text().replace(three_batches, one_batch_twice))
    (tmp_path / "base.safetensors").write_bytes((calib.parent / "base.safetensors").read_bytes())
    reports = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        args = ["-m", "sublora_cli", "prune", str(adapter), "--calib", str(script), "-b", "3", "--dtype", "float64",
                "--rounds", "2", "--train-steps", "6", "--lr", "0.01", "--out", str(out)]  # fmt: skip
        for result in launch(args, world):
            assert result.returncode == 0, result.stderr
        reports[world] = json.loads((out / "sublora_report.json").read_text())
    one, two = reports[1], reports[2]
    assert two["distributed"]["world_size"] == 2
    assert [m["kept"] for m in one["modules"]] == [m["kept"] for m in two["modules"]]
    for a, b in zip(one["rounds"], two["rounds"], strict=True):
        assert b["loss_after_training"] == pytest.approx(a["loss_after_training"], rel=1e-12)
    assert two["loss"]["after"] == pytest.approx(one["loss"]["after"], rel=1e-12)


@pytest.mark.parametrize("optimizer", ["adam", "lorsum"])
def test_a_kohya_file_with_a_conv_layer_is_trained_and_written_in_its_format(optimizer, tmp_path, run_cli):
    """Rounds on a kohya single file (a Linear and a LoCon Conv2d, names mapped onto the model): the written file
    is kohya's again and `eval` measures on it the loss the report gives (lorsum: conv probes included)."""
    import textwrap

    from test_kohya import CALIB as KOHYA_CALIB
    from test_kohya import kohya_file

    shapes = {"lora_unet_down_blocks_0_proj_in": (8, 6, 3, None), "lora_unet_down_blocks_0_conv1": (2, 2, 2, 3)}
    path = kohya_file(tmp_path / "k.safetensors", shapes, dtype=torch.float32)
    calib = tmp_path / "calib.py"
    calib.write_text(textwrap.dedent(KOHYA_CALIB))
    args = ["--rounds", 2, "--train-steps", 5, "--optimizer", optimizer, "--lr", "0.01"]
    result = run_cli("prune", path, "--calib", calib, "--budget", 3, *args, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input"]["format"] == "kohya" and len(report["rounds"]) == 2
    written = tmp_path / "out" / path.name
    assert all(key.startswith("lora_unet_") for key in load_file(str(written)))
    measured = run_cli("eval", written, "--calib", calib, "--json")
    assert json.loads(measured.stdout)["loss"] == pytest.approx(report["loss"]["after"], rel=1e-6)


def test_the_training_time_is_estimated_up_front_and_after_the_first_round(problem, tmp_path, run_cli):
    """Issue 21: `--rounds 1000000000` ran with no estimate until killed; the total is said at once."""
    adapter, calib = problem
    out = tmp_path / "o"
    result = run_cli("prune", adapter, "--calib", calib, "-b", 3, "--rounds", 2, "--train-steps", 6, "-o", out)
    assert result.code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "training: 2 round(s) × 6 steps, about" in text and "ms a step), plus a prune after each round" in text
    assert text.index("training: 2 round(s)") < text.index("round 1 took")  # said during round 1, not after
    assert "round 1 took" in text and "all 2 rounds about" in text
