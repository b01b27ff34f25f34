"""Stage 1 of a round of alternating SubLoRA (the paper's Algorithm 4): train the adapter on the script's
train_batches() (its batches() when it defines none) for a number of steps, without the rank constraint.

What is trained (`--train`):
- `factors`: B and A of every component, the paper's setting, with one of the factor optimizers (optimizers.py).
  The model sees each module's update as scale·B·A through `SigmaModel.using_factors`; components pruned in the
  previous round come back as fresh LoRA components (A random, B zero, as PEFT initialises), so they can regrow.
- `sigma`: the singular values alone, U and V frozen (the LoLDU idea in SVD form: R parameters in all); a pruned σ
  restarts from 0 and may regrow.

The trained state becomes an adapter again (`Adapter` with new factors, rounded to the storage dtype), so the
rest of the pipeline (SVD form, curvature, selection, refit, writer) runs on it unchanged and what is measured
is what is written. Master copies and optimizer state are float32 (float64 for a float64 model); the forward
runs in the model's dtype. The model stays in eval mode (dropout off): the rounds fine-tune the adapter, not the
model's stochastic regularisation. Under torchrun the batches are sharded and the gradients averaged by the same
rule as every other batch loop (model/batchloop.py: `step_batches`, `mean_across_processes`), so N processes take
the steps one process would take on N times the batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from sublora_cli.core.refit import written_spectrum
from sublora_cli.core.svd import Spectrum, balanced_factors
from sublora_cli.errors import SubloraError
from sublora_cli.formats import Adapter, LoraModule, PrunedModule
from sublora_cli.model.batchloop import mean_across_processes, step_batches
from sublora_cli.model.reparam import SigmaModel
from sublora_cli.model.script import check_loss
from sublora_cli.training.optimizers import OPTIMIZERS, LowRank, make_optimizer, make_sigma_optimizer

TRAINS = ("factors", "sigma")
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class TrainSettings:
    """How each round trains: what (`train`), how long (`steps`, one batch each), with which optimizer and peak
    learning rate (warm-up, then cosine decay to 0 over a round's steps), and the seed of re-initialised
    components."""

    train: str
    optimizer: str
    lr: float
    steps: int
    seed: int


def check_settings(train: str, optimizer: str) -> None:
    """σ-only training has one vector per adapter, no factors: only the optimizers that need none apply."""
    if train not in TRAINS:
        raise SubloraError(f"--train {train!r}: choose one of {', '.join(TRAINS)}.")
    if optimizer not in OPTIMIZERS:
        raise SubloraError(f"--optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")
    if train not in OPTIMIZERS[optimizer].trains:
        usable = [name for name, spec in OPTIMIZERS.items() if train in spec.trains]
        raise SubloraError(
            f"--optimizer {optimizer} trains LoRA factors (B and A); --train {train} trains the singular values "
            f"alone, where only {', '.join(usable)} apply."
        )


WARMUP = 0.1  # share of a round's steps over which the rate rises to its peak


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """The rate of `step` (from 0) in a round: a linear warm-up over the first tenth, then the peak decayed to 0
    along a half cosine, so each round ends at a settled point. The warm-up matters because every round starts
    a fresh optimizer at an adapter that is already (nearly) trained: Adam's first steps move every entry by
    about the full rate whatever the gradient, which on the PINN samples raised the loss 20-fold before
    training recovered it."""
    warmup = int(WARMUP * steps)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def master_dtype(sigma_model: SigmaModel) -> torch.dtype:
    return torch.float64 if sigma_model.dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# the state a round trains, and how a round's prune leaves it


@dataclass
class FactorState:
    """`--train factors`: every module's factors (master copies)."""

    factors: list[LowRank]


@dataclass
class SigmaState:
    """`--train sigma`: every module's U, V (fixed for all rounds), its LoRA scale, and the R-vector of signed σ."""

    spectra: list[Spectrum]
    scales: list[float]
    sigma: torch.Tensor


State = FactorState | SigmaState


def initial_state(
    adapter: Adapter, spectra: Sequence[Spectrum], train: str, dtype: torch.dtype, device: torch.device
) -> State:
    """Round 1 starts from the adapter as the user trained it."""
    if train == "sigma":
        sigma = torch.cat([s.sigma for s in spectra]).to(device=device, dtype=dtype)
        return SigmaState(list(spectra), [m.scale for m in adapter.modules], sigma)
    place = {"device": device, "dtype": dtype}
    return FactorState([LowRank(m.B.to(**place), m.A.to(**place), m.scale) for m in adapter.modules])


def after_prune(state: State, pruned: Sequence[PrunedModule], generator: torch.Generator) -> State:
    """The next round's start from this round's written adapter: the kept components as written (refit σ
    included); the pruned ones re-initialised (factors: as PEFT initialises a LoRA component; σ: zero)."""
    if isinstance(state, SigmaState):
        sigma = torch.cat([_in_basis(base, p.spectrum) for base, p in zip(state.spectra, pruned, strict=True)])
        return SigmaState(state.spectra, state.scales, sigma.to(state.sigma.detach()))
    factors = []
    for low_rank, p in zip(state.factors, pruned, strict=True):
        like = low_rank.B
        B, A = balanced_factors(p.spectrum, list(range(p.rank_after)), p.module.scale)
        fresh_B, fresh_A = fresh_components(p.module, p.module.rank - p.rank_after, generator)
        factors.append(
            LowRank(torch.cat([B, fresh_B], 1).to(like), torch.cat([A, fresh_A], 0).to(like), low_rank.scale)
        )
    return FactorState(factors)


def _in_basis(base: Spectrum, written: Spectrum) -> torch.Tensor:
    """The σ in the fixed basis of `base` of the written components: each written component is a signed
    component of the base (σ-only training never turns U or V; the SVD of the trained factors finds them again,
    up to sign, order and storage rounding), so it is matched to the base component it overlaps most, and
    every other σ is exactly 0."""
    overlap = (base.U.T @ written.U.to(base.U)) * (base.V.T @ written.V.to(base.V))  # ±1 at the matches
    sigma = torch.zeros_like(base.sigma)
    if written.rank:
        match = overlap.abs().argmax(0)
        columns = torch.arange(written.rank)
        sigma[match] = torch.sign(overlap[match, columns]) * written.sigma.to(sigma)
    return sigma


def fresh_components(module: LoraModule, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` new components as PEFT initialises them, so the update is unchanged (one factor is zero) and
    training can grow them: linear and conv A ~ kaiming-uniform(a=√5), i.e. U(±1/√in), B = 0; embeddings the
    other way round (A = 0, B ~ N(0, 1)), as peft's lora_embedding_A/B."""
    out, inp = module.shape
    f64 = torch.float64
    if module.kind == "embedding":
        return torch.randn(out, count, generator=generator, dtype=f64), torch.zeros(count, inp, dtype=f64)
    A = (torch.rand(count, inp, generator=generator, dtype=f64) * 2 - 1) / math.sqrt(inp)
    return torch.zeros(out, count, dtype=f64), A


def as_adapter(adapter: Adapter, state: State) -> Adapter:
    """The trained state as an adapter: each module's factors replaced, in the module's storage dtype (what will
    be written), at full rank; the selection and the writer take it from here."""
    modules = []
    for index, module in enumerate(adapter.modules):
        B, A = _factors_of(state, index)
        modules.append(replace(module, B=B.detach().to("cpu", module.B.dtype), A=A.detach().to("cpu", module.A.dtype)))
    return replace(adapter, modules=modules)


def _factors_of(state: State, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(state, FactorState):
        return state.factors[index].B, state.factors[index].A
    base = state.spectra[index]
    offset = sum(s.rank for s in state.spectra[:index])
    signed = written_spectrum(base, state.sigma[offset : offset + base.rank].detach(), range(base.rank))
    return balanced_factors(signed, list(range(base.rank)), state.scales[index])


# -----------------------------------------------------------------------------
# one step's gradient


class StepGradient:
    """The gradient of one batch's loss at the current factors (optimizers.Gradient). Products of ∂L/∂ΔW with other
    matrices come from zero-valued probes: adding P·M to ΔW with P = 0 leaves the loss as it is, and ∂L/∂P = G Mᵀ
    (likewise N·Q gives ∂L/∂Q = Nᵀ G), for every loss the script defines, derivatives of the model's inputs
    included, at the cost of one forward+backward per call."""

    def __init__(self, sigma_model: SigmaModel, factors: Sequence[LowRank], batch: object, batch_index: int):
        self._model, self._factors, self._batch, self._index = sigma_model, factors, batch, batch_index
        B = [f.B.detach().requires_grad_(True) for f in factors]
        A = [f.A.detach().requires_grad_(True) for f in factors]
        terms = [[(f.scale * b, a.T)] for f, b, a in zip(factors, B, A, strict=True)]
        loss, grads = self._backward(terms, [*B, *A])
        self.loss = loss
        self._grads = list(zip(grads[: len(B)], grads[len(B) :], strict=True))

    def factor_gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._grads

    @torch.enable_grad()  # optimizers call this under no_grad; the probes must be part of the graph
    def gradient_times(self, right: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """G_i M_iᵀ: the gradient in P_i of the loss with ΔW_i + P_i M_i, at P_i = 0."""
        pairs = self._with(right)
        probes = [_probe(f.B, f.B.shape[0], m.shape[0]) for f, m in pairs]
        return self._probe([(p, m.detach().T) for p, (_, m) in zip(probes, pairs, strict=True)], probes)

    @torch.enable_grad()
    def times_gradient(self, left: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """N_iᵀ G_i: the gradient in Q_i of the loss with ΔW_i + N_i Q_i, at Q_i = 0."""
        pairs = self._with(left)
        probes = [_probe(f.A, n.shape[1], f.A.shape[1]) for f, n in pairs]
        return self._probe([(n.detach(), p.T) for p, (_, n) in zip(probes, pairs, strict=True)], probes)

    def _with(self, matrices: Sequence[torch.Tensor]) -> list[tuple[LowRank, torch.Tensor]]:
        if len(matrices) != len(self._factors):
            raise ValueError(f"{len(self._factors)} modules but {len(matrices)} matrices")
        return list(zip(self._factors, matrices, strict=True))

    def _probe(self, extra: list[tuple[torch.Tensor, torch.Tensor]], probes: list[torch.Tensor]) -> list[torch.Tensor]:
        terms = [[(f.scale * f.B.detach(), f.A.detach().T), term] for f, term in zip(self._factors, extra, strict=True)]
        return self._backward(terms, probes)[1]

    def _backward(self, terms: list, leaves: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """Loss and gradient in `leaves` on this step's batch, summed over processes (mean over them)."""
        with torch.enable_grad(), self._model.using_factors(terms):  # the bases are built in the graph
            loss = _finite(self._model.loss(self._model.sigma, self._batch), self._index)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return mean_across_processes(float(loss.detach()), [g.detach() for g in grads])


def _finite(loss: object, batch_index: int) -> torch.Tensor:
    """The script's loss, checked as everywhere (check_loss), except that a NaN or infinite value is passed on:
    in training it means the step size diverged (train() says so), not that the script is wrong, and under
    torchrun every process must still join the reduction of the gradients."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and not bool(torch.isfinite(loss.detach()).all()):
        return loss
    return check_loss(loss, batch_index)


def _probe(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return torch.zeros(rows, columns, dtype=like.dtype, device=like.device, requires_grad=True)


# -----------------------------------------------------------------------------
# a round's training


def train(
    sigma_model: SigmaModel,
    state: State,
    batches: Sequence,
    settings: TrainSettings,
    stage: str,
    progress: Progress | None = None,
    pace: Callable[[float], None] | None = None,
) -> tuple[State, list[float]]:
    """`settings.steps` steps from `state`; returns the trained state and the training loss of every step.
    `pace` gets the seconds per step once, early: timed over steps 2–4 (the first is a cold start) or, in a
    shorter round, over every step."""
    if isinstance(state, SigmaState):
        step_fn = _sigma_steps(sigma_model, state, settings)
    else:
        step_fn = _factor_steps(sigma_model, state, settings)
    losses: list[float] = []
    timed_from, timed_to = (1, 4) if settings.steps > 4 else (0, settings.steps)
    for step, index, batch in step_batches(batches, settings.steps):
        if step == timed_from:
            started = time.perf_counter()
        loss = step_fn(batch, index, cosine_lr(settings.lr, step, settings.steps))
        if not math.isfinite(loss):
            raise _diverged(f"{stage}, step {step + 1}: the loss is {loss:g}", settings)
        losses.append(loss)
        if pace is not None and step + 1 == timed_to:
            pace((time.perf_counter() - started) / (timed_to - timed_from))
        if progress is not None:
            progress(stage, step + 1, settings.steps)
    if not _finite_state(state):  # once per round: a non-finite factor makes the next step's loss non-finite
        raise _diverged(f"{stage}, step {settings.steps}: the factors are no longer finite", settings)
    return state, losses


def _diverged(where: str, settings: TrainSettings) -> SubloraError:
    return SubloraError(
        f"Training diverged at {where} (--optimizer {settings.optimizer}, --lr {settings.lr:g}). Lower --lr; "
        "nothing was written."
    )


def _finite_state(state: State) -> bool:
    tensors = [state.sigma] if isinstance(state, SigmaState) else [t for f in state.factors for t in (f.B, f.A)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _factor_steps(sigma_model: SigmaModel, state: FactorState, settings: TrainSettings) -> Callable:
    optimizer = make_optimizer(settings.optimizer, state.factors)

    def step(batch: object, index: int, lr: float) -> float:
        gradient = StepGradient(sigma_model, state.factors, batch, index)
        optimizer.step(gradient, lr)
        return gradient.loss

    return step


def _sigma_steps(sigma_model: SigmaModel, state: SigmaState, settings: TrainSettings) -> Callable:
    sigma_model.rebase(state.spectra)
    leaf = state.sigma.requires_grad_(True)
    optimizer = make_sigma_optimizer(settings.optimizer, leaf, settings.lr)

    def step(batch: object, index: int, lr: float) -> float:
        with torch.enable_grad():
            loss = _finite(sigma_model.loss(leaf.to(sigma_model.dtype), batch), index)
            (grad,) = torch.autograd.grad(loss, [leaf], allow_unused=True, materialize_grads=True)
        value, (grad,) = mean_across_processes(float(loss.detach()), [grad])
        leaf.grad = grad.to(leaf)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        return value

    return step

