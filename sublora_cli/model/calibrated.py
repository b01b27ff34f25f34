"""The calibration stage: the user's script, its base model re-parametrised in SVD form, and the loss and
metrics of the adapter with any subset of its components kept.

Every measured figure of the report (loss before/after, evaluate() metrics) comes from here. A σ mask
(`loss(kept)`) is what the selection reasons about; the written adapter is that mask after its factors are
rounded to the storage dtype, so "after" is measured with `loss_of(spectra)` on the SVD of the factors exactly as
they are written (tests check that it equals the loss of the written adapter reloaded in peft).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sublora_cli.constants import AUTO_MAX_EXACT_SECONDS, AUTO_PLACEMENT, DEFAULT_MAX_BATCHES, META_DEVICE, MODEL_DTYPES
from sublora_cli.core.methods import CURVATURES, Need
from sublora_cli.core.svd import Spectrum
from sublora_cli.errors import SubloraError, closest_names
from sublora_cli.formats import Adapter
from sublora_cli.model import distributed
from sublora_cli.model.curvature import (
    AUTO,
    Curvature,
    compute_curvature,
    estimate_cost,
    resolve_kind,
)
from sublora_cli.model.holdout import split_batches
from sublora_cli.model.reparam import SigmaModel
from sublora_cli.model.script import CalibrationScript, check_loss, load_calibration
from sublora_cli.model.threads import intra_op_thread_count, intra_op_threads

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


def resolve_device(name: str) -> torch.device | None:
    """A torch device the machine actually has, or a clear error (not a CUDA traceback later on); None for
    auto."""
    if name == AUTO_PLACEMENT:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SubloraError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from e
    if device.type == "meta":
        raise SubloraError(f"--device {name}: {META_DEVICE}; use --device cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SubloraError(f"--device {name}: this machine has no CUDA device; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SubloraError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SubloraError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    return device


def resolve_dtype(name: str) -> torch.dtype | None:
    if name == AUTO_PLACEMENT:
        return None
    if name not in DTYPES:
        raise SubloraError(f"--dtype {name!r}: choose one of {AUTO_PLACEMENT}, {', '.join(DTYPES)}.")
    return DTYPES[name]


def attention_kernel_for(kind: str) -> AbstractContextManager:
    """The scaled-dot-product attention kernels a curvature pass of `kind` may use.

    Second derivatives (exact, diag, and auto, which may pick them) need the math kernel: the fused CPU and
    CUDA kernels have no double backward, and they are what a stock transformers model uses by default
    (attn_implementation="sdpa"). The math kernel computes the same attention from plain ops, so the model
    needs no change. The Fisher needs first derivatives only and keeps the fast kernels.
    """
    return nullcontext() if kind in CURVATURES and not CURVATURES[kind].second_order else sdpa_kernel(SDPBackend.MATH)


@dataclass
class Calibrated:
    """A calibration script bound to one adapter; `kept` masks select which components are active.

    `batches` are what is fitted (gradient, curvature, refit); `heldout` are only ever measured (holdout.py):
    every `heldout_*` figure is None when there are none."""

    script: CalibrationScript
    sigma_model: SigmaModel
    batches: list
    heldout: list = field(default_factory=list)
    holdout_note: str = ""

    @property
    def sigma(self) -> torch.Tensor:
        return self.sigma_model.sigma

    def masked(self, kept: torch.Tensor | None) -> torch.Tensor:
        """σ with the pruned components zeroed (all of σ when `kept` is None)."""
        if kept is None:
            return self.sigma
        return torch.where(kept.to(self.sigma.device), self.sigma, torch.zeros_like(self.sigma))

    def loss(self, kept: torch.Tensor | None = None) -> float:
        """Mean calibration loss with only the `kept` components active."""
        return self.sigma_model.mean_loss(self.masked(kept), self.batches)

    def heldout_loss(self, kept: torch.Tensor | None = None) -> float | None:
        """Mean loss over the held-out batches with only the `kept` components active."""
        return self.sigma_model.mean_loss(self.masked(kept), self.heldout) if self.heldout else None

    def steady_loss_seconds(self, kind: str, clock: Callable[[], float] = time.perf_counter) -> float:
        """Seconds of one loss evaluation over all batches once warm, under the threading the curvature `kind`
        runs with: the unit of its time estimate (`clock`: wall time for the message; the process's CPU time
        for auto's choice, so that it does not flip with how busy the machine is).

        Timed on the first batch after an untimed call, so first-call costs (lazy initialisation, thread-pool
        start-up) are left out, and with the curvature's intra-op thread count: on busy cores torch's own
        thread pool can be 10-100× slower than the single thread each HVP worker uses.
        """
        first = self.batches[:1]
        with intra_op_thread_count(intra_op_threads(kind, self.sigma.device)):
            self.sigma_model.mean_loss(self.sigma, first)
            best = min(_seconds(lambda: self.sigma_model.mean_loss(self.sigma, first), clock) for _ in range(2))
        return best * len(self.batches)

    def metrics(self, kept: torch.Tensor | None = None) -> dict[str, float] | None:
        """The script's evaluate(model) with only the `kept` components active; None if it defines none."""
        if self.script.evaluate is None:
            return None
        return self.sigma_model.evaluate(self.masked(kept), self.script.call_evaluate)

    def loss_of(self, spectra: Sequence[Spectrum]) -> float:
        """Mean calibration loss with each module replaced by its spectrum in `spectra` (e.g. the SVD of the
        factors as they will be stored); a spectrum may have fewer components than the module."""
        with self.sigma_model.using(spectra) as sigma:
            return self.sigma_model.mean_loss(sigma, self.batches)

    def heldout_loss_of(self, spectra: Sequence[Spectrum]) -> float | None:
        """Mean held-out loss with each module replaced by its spectrum in `spectra`; None without held-out data."""
        if not self.heldout:
            return None
        with self.sigma_model.using(spectra) as sigma:
            return self.sigma_model.mean_loss(sigma, self.heldout)

    def metrics_of(self, spectra: Sequence[Spectrum]) -> dict[str, float] | None:
        """The script's evaluate(model) with each module replaced by its spectrum in `spectra`."""
        if self.script.evaluate is None:
            return None
        with self.sigma_model.using(spectra) as sigma:
            return self.sigma_model.evaluate(sigma, self.script.call_evaluate)

    def choose_curvature(self, requested: str, methods: list[str], at_least: Need = "none") -> tuple[str, str]:
        """The curvature kind to compute for `methods`, with its reason (curvature.resolve_kind), except that
        `auto` never picks a second-order kind (exact, diag) that would take more than AUTO_MAX_EXACT_SECONDS by
        its estimate, or that this model cannot differentiate twice (one Hessian-vector product on the first batch
        is tried first): it takes the Fisher instead."""
        kind, reason = resolve_kind(requested, self.sigma_model.size, len(self.batches), methods, at_least)
        if requested != AUTO or kind not in CURVATURES or not CURVATURES[kind].second_order:
            return kind, reason
        seconds = self.steady_loss_seconds(kind, time.process_time)
        cost = estimate_cost(self.sigma_model.size, len(self.batches), kind, seconds)
        if cost["seconds"] > AUTO_MAX_EXACT_SECONDS:
            return "fisher", (
                f"{reason} But they would take about {cost['seconds'] / 60:.1f} min of CPU time by estimate, past "
                f"auto's {AUTO_MAX_EXACT_SECONDS:.0f} s, so auto computes the empirical Fisher (one pass per batch)."
            )
        failure = self.second_order_failure()
        if failure is None:
            return kind, reason
        return "fisher", (
            f"{reason} But a Hessian-vector product on batch 0 failed ({failure}), so auto "
            "computes the empirical Fisher, which needs first derivatives only."
        )

    def second_order_failure(self) -> str | None:
        """Why the loss cannot be differentiated twice in σ (the first line of torch's error), or None when one
        Hessian-vector product on the first batch, under the curvature's attention kernel, works."""
        s = self.sigma.detach().clone().requires_grad_(True)
        with attention_kernel_for("exact"), torch.enable_grad():
            loss = check_loss(self.sigma_model.loss(s, self.batches[0]), 0)
            try:
                if not loss.requires_grad:
                    return None
                (g,) = torch.autograd.grad(loss, s, create_graph=True, allow_unused=True, materialize_grads=True)
                if g.requires_grad:
                    torch.autograd.grad(g[0], s, allow_unused=True)
            except RuntimeError as e:
                return str(e).splitlines()[0]
        return None

    def curvature(
        self, kind: str, max_hessian_gb: float, progress: Callable[[str, int, int], None] | None = None
    ) -> Curvature:
        """Gradient and Hessian (or an approximation) of the loss over σ; refuses a loss blind to the adapter."""
        with attention_kernel_for(kind):
            curvature = compute_curvature(
                self.sigma_model, self.batches, kind, max_hessian_gb=max_hessian_gb, progress=progress
            )
        if curvature.is_zero:
            raise SubloraError(
                f"The calibration loss of {self.script.path} does not depend on the adapter: its gradient and "
                f"{curvature.kind} curvature over all {self.sigma_model.size} singular values are exactly zero. "
                "Check that loss(model, batch) uses the model's output for the adapted modules (and not, e.g., "
                "a different model or detached tensors), and that the loss is not piecewise linear in them "
                "(ReLU-only networks have zero second derivatives)."
            )
        return curvature

    def close(self) -> None:
        self.sigma_model.remove()


def _seconds(call: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    call()
    return clock() - start


def load_carried_tensors(model: torch.nn.Module, adapter: Adapter) -> None:
    """Put the adapter's non-LoRA tensors (modules_to_save, trained biases) into the base model, as peft does on
    load, so the calibration loss is the loss of the adapter as users will run it."""
    state = model.state_dict(keep_vars=True)
    for key, value in adapter.carried.items():
        name = adapter.format.model_tensor_name(key)
        if name not in state:
            raise SubloraError(
                f"The adapter carries {key} (modules_to_save or a trained bias) for {name!r}, but the model from "
                f"load_model() has no such parameter.{closest_names(name, state)} Does load_model() return the "
                "adapter's base model?"
            )
        target = state[name]
        if tuple(target.shape) != tuple(value.shape):
            raise SubloraError(
                f"The adapter carries {key} of shape {tuple(value.shape)} but the model's {name} is "
                f"{tuple(target.shape)}; is this the right base model?"
            )
        with torch.no_grad():
            target.copy_(value)


def module_paths(model: torch.nn.Module, adapter: Adapter) -> list[str]:
    """Where each adapted module sits in the calibration model, as the adapter's format maps its names (kohya
    files spell module paths with `_` for `.`, so they are matched against the names the model has)."""
    names = [name for name, _ in model.named_modules()]
    return [adapter.format.module_path(m.name, names) for m in adapter.modules]


def open_calibration(
    calib: Path,
    adapter: Adapter,
    spectra: list[Spectrum],
    device: str = AUTO_PLACEMENT,
    dtype: str = AUTO_PLACEMENT,
    max_batches: int = DEFAULT_MAX_BATCHES,
    progress: Callable[[str, int, int | None], None] | None = None,
    holdout: str | float = 0,
) -> Calibrated:
    """Run the script's load_model() and batches() (at most `max_batches`), set the held-out batches aside
    (`holdout`: holdout.split_batches; the commands default to auto, a library caller gets none unless it asks)
    and hook the adapter's modules into the model."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with distributed.agreeing():  # under torchrun: load_model() failing on one process fails them all, at once
        script = load_calibration(calib)
        model = script.call_load_model()
        load_carried_tensors(model, adapter)
        batches = script.call_batches(max_batches, progress)
        defined = script.heldout_batches is not None
        split = split_batches(
            batches, holdout, (lambda: script.call_heldout_batches(max_batches, progress)) if defined else None
        )
        sigma_model = SigmaModel(
            model,
            adapter.modules,
            spectra,
            script.call_loss,
            device=torch_device,
            dtype=torch_dtype,
            per_sample_loss_fn=script.call_per_sample_loss if script.per_sample_loss is not None else None,
            paths=module_paths(model, adapter),
        )
    check_batches_alike("batches", batches)
    return Calibrated(
        script=script, sigma_model=sigma_model, batches=split.fit, heldout=split.heldout, holdout_note=split.note
    )


def check_batches_alike(name: str, batches: list) -> None:
    """Under torchrun every process must hold the same batches (each computes its share, batch i on process
    i mod N); a script that shards by rank itself would silently give each process a different loss."""
    distributed.check_same(
        f"what {name}() yields",
        batches_summary(batches),
        f"Every process must load the same batches in the same order: sublora shards them itself, so {name}() "
        "must not split the data by rank (no DistributedSampler, no RANK-dependent slicing).",
    )


def batches_summary(batches: list) -> str:
    """The count and a digest of the batches' shapes and (rounded) sums: equal wherever the same data was loaded."""
    digest = hashlib.sha256()

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            total = float(value.detach().double().sum()) if value.numel() else 0.0
            digest.update(f"T{tuple(value.shape)}{value.dtype}{total:.6g};".encode())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(f"K{key!r}".encode())
                visit(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r};".encode() if isinstance(value, int | float | str | bool) else b"?")

    for batch in batches:
        visit(batch)
    return f"{len(batches)} batches, digest {digest.hexdigest()[:12]}"
