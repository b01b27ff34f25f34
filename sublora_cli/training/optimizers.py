"""Optimizers for the fine-tune phase of the alternating train-and-prune loop (the SubLoRA paper's Algorithm 4).

Each optimizer updates the factors of ΔW = s·B A (B: out×r, A: r×in) of every adapted module from one batch's
gradient. The full-matrix gradient G = ∂L/∂ΔW is never formed: the caller hands a `Gradient` that gives the
LoRA factor gradients (∇_B L = s·G Aᵀ, ∇_A L = s·Bᵀ G) and, at the cost of one extra forward+backward pass per
call, products of G with other A- or B-shaped matrices. The optimizers are pure tensor math on float32/float64
master copies; they read every gradient product before they write any factor, so a `Gradient` may compute its
products lazily from the factors it was taken at.

* `sgd`: B and A step jointly along their LoRA gradients.
* `adam`: Adam with bias correction on B and A jointly, optional decoupled (AdamW) weight decay.
* `altlora`: the AltLoRA paper's Algorithm 1. Steps alternate: an A-step moves A along the scaled gradient
  (1/s²)(BᵀB)⁻¹∇_A L, which changes ΔW by −lr times the projection of G onto B's column space (the best rank-r
  approximation of a full step through A alone); the next B-step does the same through B with the new A. The
  momentum of a factor lives in the subspace of the other factor, so before it is mixed with the new gradient it
  is transported into the other factor's current subspace (the paper's Theorem 2). With zero damping every
  update of ΔW is independent (up to the 1e-12 floor below) of the factorisation (B, A) → (BR, R⁻¹A) (the paper's
  Theorem 4).
* `altlora+`: the AltLoRA paper's AltLoRA+ ("Algorithm 2", described there as AltLoRA with an AdamW-style second
  moment). Our reading: AltLoRA's scaled gradient g̃ and transported first moment M, plus an elementwise second
  moment V ← β2 V + (1−β2) g̃² that is *not* transported (the paper states AltLoRA+ is invariant only up to the
  second moment), both bias-corrected by the number of updates of that factor, and the step
  X ← X − lr (M̂/(√V̂ + eps) + γX).
* `lorsum`: LoRSum (the LoRSum paper): the full gradient step on the product, s·W⁺ = ΔW − lr·G, projected back to
  rank r by `sweeps` warm-started alternating-least-squares sweeps from (B, A) — B ← W⁺Aᵀ(AAᵀ)⁻¹, then
  A ← (BᵀB)⁻¹BᵀW⁺ — an implicit block power method, so no SVD and no dense G or W⁺. The sweeps run in the
  power method's orthonormal form (B ← an orthonormal basis of W⁺Aᵀ by QR, A ← BᵀW⁺: the same product as the
  least-squares pair, with no Gram matrix to invert, which is what keeps it finite after a prune). G Aᵀ comes free
  with the factor gradients, so a step costs 2·sweeps − 1 extra passes (one `times_gradient` for the first sweep, one
  `gradient_times` and one `times_gradient` for each further sweep, each batched over all modules). Afterwards each
  component is rebalanced (same product, ‖B column‖ = ‖A row‖) so B and A stay on one scale for whatever optimizer
  runs next.

The r×r Gram matrices AltLoRA and AltLoRA+ invert are singular for a freshly re-initialised component (PEFT starts B's
column at zero), so they are damped: λ = damping·trace(Gram)/r plus a floor of 1e-12·(1 + trace/r). The damping
keeps a zero column finite (its scaled A-gradient is then zero and its B-step grows it); damping=0 leaves only the
floor, for checks of exact invariance.

The learning rates mean different things, so each optimizer has its own default: altlora and lorsum step on the ΔW
scale (lr = 1 is a full step, which solves a whitened least-squares problem at once), adam and altlora+ move each
factor entry by about lr (normalised steps), and sgd's step is lr times the raw factor gradient.

Optimizer state is per module and per shape: make a new optimizer when the factors change rank (after a prune).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sublora_cli.errors import SubloraError, closest_names

GRAM_FLOOR = 1e-12  # relative floor on the Gram damping: keeps an all-zero factor's solve finite when damping=0


@dataclass
class LowRank:
    """One module's trainable term ΔW = scale · B @ A (B: out×r, A: r×in), master copies in float32 or float64."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float


class Gradient(Protocol):
    """The loss gradient at the current factors for one step (one batch). G_i = ∂L/∂ΔW_i (out×in) of module i is
    never formed: only its products are available."""

    def factor_gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(∇_B L, ∇_A L) = (scale·G Aᵀ, scale·Bᵀ G) per module, at the factors the gradient was taken at."""
        ...

    def gradient_times(self, right: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """G_i @ M_iᵀ per module for A-shaped M_i (r'×in) → out×r'. All modules in one call (it costs the caller one
        extra forward+backward pass per call, so call it as few times as possible)."""
        ...

    def times_gradient(self, left: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """N_iᵀ @ G_i per module for B-shaped N_i (out×r') → r'×in. Same cost note."""
        ...


class FactorOptimizer(Protocol):
    def step(self, gradient: Gradient, lr: float) -> None:
        """Update every LowRank's B and/or A in place (assign new tensors to .B/.A or update in place) for one step."""
        ...


def _require(condition: bool, message: str) -> None:
    """Reject a hyper-parameter the math cannot run with, as a user-facing error."""
    if not condition:
        raise SubloraError(message)


def _check_beta(name: str, value: float) -> None:
    _require(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}.")


def _check_non_negative(name: str, value: float) -> None:
    _require(value >= 0.0, f"{name} must be ≥ 0, got {value}.")


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a master factor in place, so tensors the caller holds (e.g. autograd leaves) stay the same objects.
    Every step runs under torch.no_grad(): the update is not part of any graph."""
    target.copy_(value)


def _as_master(gradient: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """A gradient in the master's dtype and device: the caller may compute in lower precision elsewhere."""
    return gradient.to(dtype=master.dtype, device=master.device)


def _damped_solve(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """(Gram + λI)⁻¹ rhs for an r×r Gram matrix, λ relative to its mean diagonal (see the module docstring).

    Solved in float64 whatever the masters' dtype: after a prune the Gram matrices hold the kept components
    (order 1) next to re-initialised ones with a zero side (order λ), a condition number float32 cannot solve
    (LoRSum diverged to NaN in float32 on the shipped PINN adapters); r×r solves cost nothing next to a pass."""
    rank = gram.shape[0]
    gram64 = gram.to(torch.float64)
    mean_diagonal = torch.trace(gram64) / max(rank, 1)
    lam = damping * mean_diagonal + GRAM_FLOOR * (1.0 + mean_diagonal)
    eye = torch.eye(rank, dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram64 + lam * eye, rhs.to(torch.float64)).to(rhs.dtype)


def _adam_ratio(
    first: torch.Tensor, second: torch.Tensor, count: int, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """M̂/(√V̂ + eps) with Adam's bias correction after `count` updates."""
    first_hat = first / (1.0 - betas[0] ** count)
    second_hat = second / (1.0 - betas[1] ** count)
    return first_hat / (second_hat.sqrt() + eps)


class SGD:
    """Plain gradient descent on B and A jointly (both from the same gradient)."""

    def __init__(self, modules: list[LowRank]):
        self.modules = modules

    @torch.no_grad()
    def step(self, gradient: Gradient, lr: float) -> None:
        for module, (grad_b, grad_a) in zip(self.modules, gradient.factor_gradients(), strict=True):
            _write(module.B, module.B - lr * _as_master(grad_b, module.B))
            _write(module.A, module.A - lr * _as_master(grad_a, module.A))


@dataclass
class _Moments:
    """Adam's running moments of one tensor, in float32 at least."""

    first: torch.Tensor
    second: torch.Tensor

    @classmethod
    def zeros_like(cls, master: torch.Tensor) -> _Moments:
        dtype = torch.promote_types(master.dtype, torch.float32)
        return cls(torch.zeros_like(master, dtype=dtype), torch.zeros_like(master, dtype=dtype))


class Adam:
    """Adam per tensor on B and A jointly, with decoupled (AdamW-style) weight decay."""

    def __init__(
        self,
        modules: list[LowRank],
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        _check_beta("beta1", beta1)
        _check_beta("beta2", beta2)
        _require(eps > 0.0, f"eps must be > 0, got {eps}.")
        _check_non_negative("weight_decay", weight_decay)
        self.modules = modules
        self.betas = (beta1, beta2)
        self.eps = eps
        self.weight_decay = weight_decay
        self.moments = [(_Moments.zeros_like(m.B), _Moments.zeros_like(m.A)) for m in modules]
        self.count = 0

    @torch.no_grad()
    def step(self, gradient: Gradient, lr: float) -> None:
        self.count += 1
        grads = gradient.factor_gradients()
        for module, (moments_b, moments_a), (grad_b, grad_a) in zip(self.modules, self.moments, grads, strict=True):
            new_b = self._updated(module.B, grad_b, moments_b, lr)
            new_a = self._updated(module.A, grad_a, moments_a, lr)
            _write(module.B, new_b)
            _write(module.A, new_a)

    def _updated(self, master: torch.Tensor, grad: torch.Tensor, moments: _Moments, lr: float) -> torch.Tensor:
        """The master after one Adam step; the moments are updated in place."""
        grad = grad.to(dtype=moments.first.dtype, device=master.device)
        beta1, beta2 = self.betas
        moments.first.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        moments.second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        value = master.to(moments.first.dtype)
        ratio = _adam_ratio(moments.first, moments.second, self.count, self.betas, self.eps)
        return value - lr * (ratio + self.weight_decay * value)


@dataclass
class _FactorState:
    """AltLoRA's state of one factor, held in the A orientation (r × n): for B it is stored transposed."""

    momentum: torch.Tensor | None = None
    partner: torch.Tensor | None = None  # the other factor (m × r) the momentum is aligned with
    second: torch.Tensor | None = None  # AltLoRA+ only
    count: int = 0


@dataclass
class _ModuleState:
    a: _FactorState = field(default_factory=_FactorState)
    b: _FactorState = field(default_factory=_FactorState)


class AltLoRA:
    """The AltLoRA paper's Algorithm 1: alternating scaled-gradient steps on A (even steps) and B (odd steps), with
    momentum transported into the current subspace.

    Both half-steps are one routine in the A orientation: a B-step is an A-step on the transposed problem
    ΔWᵀ = s·Aᵀ Bᵀ, where Bᵀ plays A and Aᵀ plays B (the paper's B-step formulas are exactly the transposes).
    """

    def __init__(self, modules: list[LowRank], beta1: float = 0.9, weight_decay: float = 0.0, damping: float = 1e-6):
        _check_beta("beta1", beta1)
        _check_non_negative("weight_decay", weight_decay)
        _check_non_negative("damping", damping)
        self.modules = modules
        self.beta1 = beta1
        self.weight_decay = weight_decay
        self.damping = damping
        self.states = [_ModuleState() for _ in modules]
        self.count = 0

    @torch.no_grad()
    def step(self, gradient: Gradient, lr: float) -> None:
        a_step = self.count % 2 == 0
        grads = gradient.factor_gradients()
        for module, state, (grad_b, grad_a) in zip(self.modules, self.states, grads, strict=True):
            if a_step:
                new_a = self._half_step(module.A, module.B, _as_master(grad_a, module.A), state.a, module.scale, lr)
                _write(module.A, new_a)
            else:
                grad_bt = _as_master(grad_b, module.B).T
                new_bt = self._half_step(module.B.T, module.A.T, grad_bt, state.b, module.scale, lr)
                _write(module.B, new_bt.T)
        self.count += 1

    def _half_step(
        self,
        own: torch.Tensor,
        partner: torch.Tensor,
        grad: torch.Tensor,
        state: _FactorState,
        scale: float,
        lr: float,
    ) -> torch.Tensor:
        """The new value of `own` (r×n), where ΔW = scale·partner @ own (partner: m×r) and grad = ∇_own L."""
        gram = partner.T @ partner
        scaled_grad = _damped_solve(gram, grad, self.damping) / scale**2
        transported = torch.zeros_like(own)
        if state.momentum is not None:
            transported = _damped_solve(gram, partner.T @ (state.partner @ state.momentum), self.damping)
        state.momentum = self.beta1 * transported + (1.0 - self.beta1) * scaled_grad
        state.partner = partner.clone()
        state.count += 1
        return own - lr * (self._direction(state, scaled_grad) + self.weight_decay * own)

    def _direction(self, state: _FactorState, scaled_grad: torch.Tensor) -> torch.Tensor:
        """AltLoRA steps along its (transported) momentum."""
        return state.momentum


class AltLoRAPlus(AltLoRA):
    """AltLoRA with an elementwise, untransported, bias-corrected second moment of the scaled gradient (our reading
    of the AltLoRA paper's AltLoRA+, whose algorithm body the paper text we follow does not give)."""

    def __init__(
        self,
        modules: list[LowRank],
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        damping: float = 1e-6,
    ):
        super().__init__(modules, beta1=beta1, weight_decay=weight_decay, damping=damping)
        _check_beta("beta2", beta2)
        _require(eps > 0.0, f"eps must be > 0, got {eps}.")
        self.beta2 = beta2
        self.eps = eps

    def _direction(self, state: _FactorState, scaled_grad: torch.Tensor) -> torch.Tensor:
        squared = scaled_grad * scaled_grad
        previous = torch.zeros_like(squared) if state.second is None else state.second
        state.second = self.beta2 * previous + (1.0 - self.beta2) * squared
        return _adam_ratio(state.momentum, state.second, state.count, (self.beta1, self.beta2), self.eps)


class LoRSum:
    """LoRSum: the full step on ΔW projected back to rank r by warm-started alternating least squares, in the
    orthonormal form of a block power method (see the module docstring for the cost in extra passes)."""

    def __init__(self, modules: list[LowRank], sweeps: int = 2):
        _require(isinstance(sweeps, int) and sweeps >= 1, f"sweeps must be an integer ≥ 1, got {sweeps}.")
        self.modules = modules
        self.sweeps = sweeps

    @torch.no_grad()
    def step(self, gradient: Gradient, lr: float) -> None:
        """All product calls happen before any factor is written (they are taken at the current factors)."""
        steps = [lr / m.scale for m in self.modules]
        grads_b = [grad_b for grad_b, _ in gradient.factor_gradients()]
        g_times_a = [g / m.scale for g, m in zip(_as_masters(grads_b, self.modules, "B"), self.modules, strict=True)]
        a_k = [m.A for m in self.modules]
        for sweep in range(self.sweeps):
            if sweep > 0:
                g_times_a = _as_masters(gradient.gradient_times(a_k), self.modules, "B")
            q_k = [_column_basis(m, a, ga, c) for m, a, ga, c in zip(self.modules, a_k, g_times_a, steps, strict=True)]
            q_times_g = _as_masters(gradient.times_gradient(q_k), self.modules, "A")
            a_k = [(q.T @ m.B) @ m.A - c * qg for m, q, qg, c in zip(self.modules, q_k, q_times_g, steps, strict=True)]
        for module, new_b, new_a in zip(self.modules, q_k, a_k, strict=True):
            balanced_b, balanced_a = _rebalanced(new_b, new_a)
            _write(module.B, balanced_b)
            _write(module.A, balanced_a)


def _column_basis(module: LowRank, a_k: torch.Tensor, g_times_a_k: torch.Tensor, step: float) -> torch.Tensor:
    """The B half-sweep: the least-squares B for a fixed Aₖ is W⁺Aₖᵀ(AₖAₖᵀ)⁻¹, whose column space is that of
    W⁺Aₖᵀ = B(A Aₖᵀ) − step·G Aₖᵀ; an orthonormal basis Q of it (QR) gives the same product after the A half-sweep
    A = QᵀW⁺, without inverting a Gram matrix. That matters after a prune: re-initialised components make AₖAₖᵀ
    and BᵀB nearly singular, and the inverse form let the factors of the shipped PINN adapters grow without bound
    (norms 3 → 76 in 12 steps, then NaN), while Q A never exceeds W⁺ projected onto span(Q)."""
    w_plus_a_k = module.B @ (module.A @ a_k.T) - step * g_times_a_k
    return torch.linalg.qr(w_plus_a_k.to(torch.float64)).Q.to(w_plus_a_k.dtype)


def _as_masters(products: Sequence[torch.Tensor], modules: list[LowRank], like: str) -> list[torch.Tensor]:
    """Products from the caller in the dtype and device of each module's B or A."""
    return [_as_master(p, getattr(m, like)) for p, m in zip(products, modules, strict=True)]


def _rebalanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B D, D⁻¹ A) with D diagonal so each B column and A row have equal norms: the product is unchanged, and the
    factors keep one scale (components with a zero side are left as they are)."""
    b_norms = torch.linalg.vector_norm(b, dim=0)
    a_norms = torch.linalg.vector_norm(a, dim=1)
    both = (b_norms > 0) & (a_norms > 0)
    d = torch.where(both, torch.sqrt(a_norms / torch.where(both, b_norms, 1.0)), 1.0)
    return b * d, a / d[:, None]


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry: what the CLI and the training loop need to know about an optimizer."""

    cls: type
    default_lr: float  # peak learning rate for the factors (measured on the shipped samples: bench/alternating.py)
    products: bool  # whether it calls gradient_times/times_gradient (extra passes per step)
    description: str
    sigma_lr: float | None = None  # peak learning rate for σ-only training, where it applies
    sigma_cls: type[torch.optim.Optimizer] | None = None  # the torch optimizer of σ-only training (one vector)

    @property
    def trains(self) -> tuple[str, ...]:
        """Which of "factors", "sigma" it applies to: σ alone only where the entry names a σ optimizer."""
        return ("factors", "sigma") if self.sigma_cls is not None else ("factors",)


# Defaults, measured in two rounds of 100 steps after a cut to 30 % of the rank of the shipped PINN adapters
# (elliptic k2, Allen–Cahn ε=0.1, hyperbolic β=2 and β=4): fine-tuning rates for an adapter that is already
# trained. The next value up made at least one of them end worse than the training-free prune: adam 1e-3 and
# altlora+ 1e-4 (elliptic k2), altlora 0.1 and lorsum 0.03 (hyperbolic β=2), sgd 0.01 (hyperbolic β=2, β=4).
# σ-only training: adam 1e-3 beat 1e-4 and 1e-5 on elliptic k2; sgd's is not tuned. Per run: --lr.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(SGD, 3e-3, False, "plain gradient descent", sigma_lr=1e-2, sigma_cls=torch.optim.SGD),
    "adam": OptimizerSpec(Adam, 1e-5, False, "Adam (the SubLoRA paper's)", sigma_lr=1e-3, sigma_cls=torch.optim.Adam),
    "altlora": OptimizerSpec(
        AltLoRA, 3e-2, False, "AltLoRA: alternating A/B scaled-gradient steps with transported momentum"
    ),
    "altlora+": OptimizerSpec(AltLoRAPlus, 1e-5, False, "AltLoRA+: AltLoRA with an Adam-style second moment"),
    "lorsum": OptimizerSpec(
        LoRSum, 1e-2, True, "LoRSum: full step on ΔW projected to rank r by ALS (2·sweeps−1 extra passes)"
    ),
}


def make_optimizer(name: str, modules: list[LowRank], **hyper: float) -> FactorOptimizer:
    """The named optimizer over `modules`; SubloraError for an unknown name or a setting it does not take."""
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise SubloraError(
            f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.{closest_names(name, OPTIMIZERS)}"
        )
    accepted = [p for p in inspect.signature(spec.cls).parameters if p != "modules"]
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise SubloraError(
            f"Optimizer {name!r} has no setting {', '.join(unknown)}; it takes: {', '.join(accepted) or 'none'}."
        )
    return spec.cls(modules, **hyper)


def make_sigma_optimizer(name: str, leaf: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """The named optimizer over the σ vector of `--train sigma` (its registry entry's `sigma_cls`)."""
    spec = OPTIMIZERS.get(name)
    if spec is None or spec.sigma_cls is None:
        usable = [n for n, s in OPTIMIZERS.items() if s.sigma_cls is not None]
        raise SubloraError(f"--optimizer {name} does not train σ alone; use {' or '.join(usable)} with --train sigma.")
    return spec.sigma_cls([leaf], lr=lr)
