"""Gradient and curvature of the calibration loss w.r.t. σ, the inputs of the second-order pruning model.

Three kinds (docs/curvature.md has the user-facing description and the `auto` rule):

* `exact`: the Hessian H, R Hessian-vector products (HVPs) per batch.
* `diag`: its diagonal, from the same HVPs (there is no cheaper exact diagonal for a general loss); saves the
  R×R memory, not time.
* `fisher`: the empirical Fisher F = mean_n g_n g_nᵀ over per-sample σ-gradients g_n, full R×R with the
  cross-layer terms. One forward and one backward pass per batch (fisher.per_sample_gradients reads the
  per-sample gradients off per-row copies of σ in the adapted layers), so it scales to LLM adapters.

All three run through batchloop.over_batches: per-batch sums in float64, reduced once, then divided.

How the exact H is computed: reverse-over-reverse with plain autograd. Per batch, g = ∂L/∂σ is taken with
create_graph=True and the Hessian rows come from backward passes through g's retained graph, a chunk of unit
vectors at a time (`is_grads_batched`, i.e. vmap over the backward), the chunks spread over a pool of threads
(the autograd engine runs a CPU backward on the calling thread and releases the GIL inside ops; concurrent
backward passes through one retained graph are supported). torch.func (jacfwd/vmap(jvp(grad(f)))) would be
the textbook choice, but it refuses losses that call requires_grad_ / torch.autograd.grad themselves, which
every PINN loss does; plain autograd handles them as long as the user passes create_graph=True.

Measured on the elliptic sample (tanh MLP width 128, R = 100, 4 batches of 320 points, PINN loss with second
input derivatives, float64) on a shared 2-core machine, seconds for 100 HVPs of one batch, best of 3:
  one HVP per backward pass 2.22 · chunks of 4: 2.00 · 10: 2.21 · torch.func.vmap over the backward, chunks of
  10/50/100: 2.15/2.54/2.83 · forward-over-reverse (forward-mode dual σ through loss and backward): ~2.5× slower
  per HVP · the batch tiled K times with one σ copy per tile (a whole block of rows from one double backward):
  2.5-3× slower (K-fold forward and backward work, out of cache).
  chunks of 4 on 1 thread 2.53-3.4 · 2 intra-op threads 1.6-1.9 · 2 worker threads (1 intra-op thread each) 1.34-1.6
The HVPs of this loss are bound by arithmetic and memory traffic (elementwise ops on 320×128 tensors),
not by per-op overhead, so batching more rows per pass does not pay on the CPU (and the legacy vmap behind
is_grads_batched lacks a batching rule for tanh_backward); running chunks on all cores does. On a GPU the
same tensors are launch-bound and bigger chunks pay, hence CHUNK_GPU. bench/curvature.py measures all this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sublora_cli.constants import AUTO, AUTO_MAX_HVPS
from sublora_cli.core.methods import CURVATURES, NEEDS, Need, lookup, most_demanding
from sublora_cli.errors import SubloraError
from sublora_cli.model.batchloop import Meter, Sums, over_batches
from sublora_cli.model.fisher import per_sample_gradients
from sublora_cli.model.reparam import SigmaModel
from sublora_cli.model.script import check_loss
from sublora_cli.model.threads import default_threads, intra_op_thread_count, intra_op_threads

KINDS = tuple(CURVATURES)
CHUNK = 4  # Hessian rows per batched backward pass on the CPU (see the module docstring for the measurements)
CHUNK_GPU = 32  # on an accelerator the small ops are launch-bound: more rows per pass
# Time of the curvature in units of one warm loss evaluation over all batches, timed under the curvature's own
# intra-op thread count (Calibrated.steady_loss_seconds), measured on 2 busy CPU cores: one Hessian row per
# batch costs 0.8–2.0 (PINN samples); the Fisher 0.5–8 (its 2-thread passes vary most on busy cores).
# Timing the first, cold evaluation with torch's own thread pool instead made the estimate 20–75× too high.
SECONDS_PER_HVP_ROW = 1.5
SECONDS_FISHER = 3.0


@dataclass(frozen=True)
class Curvature:
    kind: str  # "exact" | "diag" | "fisher"
    loss: float  # mean calibration loss at the trained σ
    gradient: torch.Tensor  # (R,) float64, mean over batches (fisher: over samples)
    hessian: torch.Tensor | None  # (R, R) float64 (exact: H, fisher: F), symmetric
    hessian_diag: torch.Tensor  # (R,) float64
    seconds: float
    n_batches: int = 0
    n_samples: int = 0  # fisher: how many gradients F averages (samples, or batches without per_sample_loss)
    strategy: str = ""  # how it was computed, for the report (e.g. "reverse-over-reverse, chunks of 4, 2 threads")
    notes: tuple[str, ...] = ()  # warnings for the user (e.g. a Fisher over per-batch gradients)

    def selection_inputs(self, name: str) -> dict[str, torch.Tensor | None]:
        """The (gradient, hessian, hessian_diag) the selection of method `name` models the loss with.

        With the Fisher, every method that uses the curvature (not only the gradient) gets a zero gradient: F
        shrinks with the squared residuals while g shrinks only with the residuals, so next to the true g the
        quadratic term is on the wrong scale and −gᵀσ_P dominates the model. Dropping g is the stationarity the
        paper assumes; measured, it lifts the kept-set overlap with `exact` from 0.38–0.70 to 0.75–1.00
        (docs/curvature.md).
        """
        gradient = self.gradient
        if CURVATURES[self.kind].drops_gradient and lookup(name).needs_at_least("diagonal"):
            gradient = torch.zeros_like(gradient)
        return {"gradient": gradient, "hessian": self.hessian, "hessian_diag": self.hessian_diag}

    def notes_for(self, names: list[str]) -> list[str]:
        """The notes that matter to the methods `names`: those about the matrix (the Fisher's) concern only the
        methods that use it, not those that select on σ or the gradient alone."""
        return list(self.notes) if any(lookup(n).needs_at_least("diagonal") for n in names) else []

    @property
    def is_zero(self) -> bool:
        """g and H vanish identically: the loss does not depend on the adapter (a mis-wired script)."""
        h = self.hessian if self.hessian is not None else self.hessian_diag
        return not bool(self.gradient.any()) and not bool(h.any())


def estimate_cost(R: int, n_batches: int, kind: str, loss_seconds: float | None = None) -> dict:
    """What a curvature computation will take, for a message before starting it.

    hvps: Hessian-vector products (each about two to four forward+backward passes of one batch);
    passes: forward+backward passes that are not HVPs (one per batch for the gradient or the Fisher);
    seconds (when `loss_seconds`, the time of one evaluation of the loss over all batches, is given): all R
    HVPs per batch cost SECONDS_PER_HVP_ROW loss evaluations each, the Fisher SECONDS_FISHER of them.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}")
    cost = {
        "hessian_bytes": 8 * R * R if CURVATURES[kind].matrix else 8 * R,
        "hvps": R * n_batches if CURVATURES[kind].second_order else 0,
        "passes": n_batches,
    }
    if loss_seconds is not None:
        factor = SECONDS_PER_HVP_ROW * R if CURVATURES[kind].second_order else SECONDS_FISHER
        cost["seconds"] = factor * loss_seconds
    return cost


def choose_kind(R: int, n_batches: int, name: str) -> tuple[str, str]:
    """The curvature `--curvature auto` computes for method `name`, with a one-sentence reason
    (docs/curvature.md); the method's entry in methods.py says what it needs."""
    return _auto_kind(R, n_batches, lookup(name).needs, name)


def _auto_kind(R: int, n_batches: int, need: Need, who: str) -> tuple[str, str]:
    """The cheapest curvature that meets `need` under the auto rule: none for a data-free selection; the Fisher's
    single pass per batch for the gradient alone; the exact diagonal or matrix while it costs at most
    AUTO_MAX_HVPS Hessian-vector products (R × batches), else the Fisher (for a diagonal: its diagonal)."""
    if need == "none":
        return "none", f"{who} is data-free: no curvature is computed."
    if need == "gradient":
        return "fisher", f"{who} needs only the gradient, which one forward+backward pass per batch gives (fisher)."
    hvps = R * n_batches
    if hvps > AUTO_MAX_HVPS:
        return "fisher", (
            f"R = {R} over {n_batches} batches would take {hvps:,} Hessian-vector products for the exact "
            f"{'diagonal' if need == 'diagonal' else 'Hessian'} (auto's limit is {AUTO_MAX_HVPS:,}); the empirical "
            "Fisher needs one forward+backward pass per batch."
        )
    if need == "diagonal":
        return "diag", (
            f"{who} needs only the Hessian's diagonal: R = {R} over {n_batches} batches is {hvps:,} Hessian-vector "
            f"products, within auto's limit of {AUTO_MAX_HVPS:,}, so the exact diagonal is computed (not the matrix)."
        )
    return "exact", (
        f"R = {R} over {n_batches} batches is {hvps:,} Hessian-vector products, within the {AUTO_MAX_HVPS:,} "
        "that auto computes exactly."
    )


def resolve_kind(
    requested: str, R: int, n_batches: int, methods: list[str], at_least: Need = "none"
) -> tuple[str, str]:
    """The curvature to compute for `methods` (one for prune, several for sweep), with the reason to print.

    `auto` meets the most demanding need among them (methods.py) and `at_least` (the refit's: "matrix").
    Data-free methods alone, with nothing else asking, get no curvature whatever was requested: nothing uses it.
    """
    need = max(most_demanding(methods), at_least, key=NEEDS.index)
    if need == "none":
        return _auto_kind(R, n_batches, need, " and ".join(methods))
    if requested != AUTO:
        return requested, f"--curvature {requested} was asked for."
    who = " and ".join(m for m in methods if lookup(m).needs == need)
    kind, reason = _auto_kind(R, n_batches, need, who or "the refit")
    return kind, reason if who else f"{reason} The refit of the kept σ steps with it (--no-refit skips it)."


def _hessian_rows(g: torch.Tensor, s: torch.Tensor, start: int, stop: int, batched: bool) -> torch.Tensor:
    """Rows start:stop of ∂g/∂s by backward passes through g's graph."""
    eye = torch.zeros(stop - start, s.numel(), dtype=s.dtype, device=s.device)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
    if batched:
        (rows,) = torch.autograd.grad(
            g, s, eye, retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        return rows
    rows = [torch.autograd.grad(g, s, e, retain_graph=True, allow_unused=True, materialize_grads=True)[0] for e in eye]
    return torch.stack(rows)


class _RowEngine:
    """Hessian rows of one batch's gradient graph, in chunks, on a pool of worker threads."""

    def __init__(self, chunk: int, threads: int):
        self.chunk, self.threads = max(1, chunk), max(1, threads)
        self.batched = self.chunk > 1
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def rows(self, g: torch.Tensor, s: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        batched = self.batched
        try:
            return _hessian_rows(g, s, start, stop, batched)
        except RuntimeError:
            if not batched:
                raise
            with self._lock:  # an op without a vmap batching rule: one backward pass per row from now on
                self.batched = False
            return _hessian_rows(g, s, start, stop, False)

    def run(self, g, s, R, batch_index: int, consume: Callable[[int, int, torch.Tensor], None]) -> None:
        """consume(start, stop, rows) on the calling thread for every chunk of rows, as they complete."""
        spans = [(a, min(a + self.chunk, R)) for a in range(0, R, self.chunk)]
        if self.pool is None:
            for a, b in spans:
                with _differentiating("the Hessian", batch_index):
                    consume(a, b, self.rows(g, s, a, b))
            return
        pending = {self.pool.submit(self.rows, g, s, a, b): (a, b) for a, b in spans}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    a, b = pending.pop(future)
                    with _differentiating("the Hessian", batch_index):
                        consume(a, b, future.result())
        finally:
            for future in pending:
                future.cancel()
            wait(pending)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def compute_curvature(
    sigma_model: SigmaModel,
    batches: list,
    kind: str = "exact",
    *,
    max_hessian_gb: float = 4.0,
    progress: Callable[[str, int, int], None] | None = None,
    chunk: int | None = None,
    threads: int | None = None,
) -> Curvature:
    """Mean gradient and curvature (`kind`: exact, diag, fisher, or auto) of the loss at the trained σ (float64).

    chunk: Hessian rows per batched backward pass (default CHUNK on the CPU, CHUNK_GPU elsewhere); threads:
    worker threads for the HVPs (default: torch's intra-op thread count on the CPU, 1 on an accelerator).
    """
    if kind == AUTO:
        kind = resolve_kind(AUTO, sigma_model.size, len(batches), ["sublora"])[0]
    if kind not in KINDS:
        raise SubloraError(f"Unknown curvature {kind!r}; choose one of {', '.join(KINDS)} or {AUTO}.")
    if not batches:
        raise SubloraError("No calibration batches to compute the curvature on.")
    R = sigma_model.size
    cost = estimate_cost(R, len(batches), kind)
    if CURVATURES[kind].matrix and cost["hessian_bytes"] > max_hessian_gb * 1e9:
        raise SubloraError(
            f"The {'exact Hessian' if kind == 'exact' else 'Fisher matrix'} over the adapter's R = {R} singular "
            f"values would take {cost['hessian_bytes'] / 1e9:.1f} GB in float64, above the limit of "
            f"{max_hessian_gb:g} GB. Use --curvature diag (diagonal only, R numbers) with --method diag or linear, "
            "raise --max-hessian-gb, or prune a smaller adapter."
        )
    if kind == "fisher":
        return _fisher(sigma_model, batches, progress)
    device = sigma_model.sigma.device
    if chunk is None:
        chunk = CHUNK if device.type == "cpu" else CHUNK_GPU
    if threads is None:
        threads = default_threads(device)
    with intra_op_thread_count(intra_op_threads(kind, device, threads)):
        return _exact(sigma_model, batches, kind, progress, chunk, threads)


def _exact(sigma_model, batches, kind, progress, chunk, threads) -> Curvature:
    """Sums over batches of the loss, g and H's rows (diag: their diagonal entries), one batch's HVPs at a time."""
    start_time = time.perf_counter()
    R = sigma_model.size
    device = sigma_model.sigma.device
    matrix = (
        {"hessian": torch.zeros(R, R, dtype=torch.float64, device=device)}
        if kind == "exact"
        else {"diag": torch.zeros(R, dtype=torch.float64, device=device)}
    )
    sums = Sums(loss=0.0, batches=0, gradient=torch.zeros(R, dtype=torch.float64, device=device), **matrix)
    engine = _RowEngine(chunk, threads)

    def step(index: int, batch, sums: Sums, meter: Meter) -> None:
        def consume(a: int, b: int, rows: torch.Tensor) -> None:
            rows = rows.detach().to(torch.float64)
            if kind == "exact":
                sums.add("hessian", rows, at=slice(a, b))
            else:
                sums.add("diag", rows[torch.arange(b - a), torch.arange(a, b)], at=slice(a, b))
            meter.advance(b - a)

        s = sigma_model.sigma.detach().clone().requires_grad_(True)
        loss = check_loss(sigma_model.loss(s, batch), index)
        sums.add("loss", float(loss.detach()))
        sums.add("batches", 1)
        if not loss.requires_grad:
            return
        with _differentiating("the gradient", index):
            (g,) = torch.autograd.grad(loss, s, create_graph=True, allow_unused=True, materialize_grads=True)
        sums.add("gradient", g.detach().to(torch.float64))
        if g.requires_grad:  # else the loss is linear in σ: H = 0 on this batch
            engine.run(g, s, R, index, consume)

    try:
        with torch.enable_grad():
            totals = over_batches(batches, step, sums, progress=progress, work_per_batch=R)
    finally:
        engine.close()

    n, gradient, hessian = totals["batches"], totals["gradient"], totals.get("hessian")
    gradient /= n
    if hessian is not None:
        hessian /= n  # in place: no second R×R matrix
        symmetrize_(hessian)
        diag = hessian.diagonal().clone()
    else:
        diag = totals["diag"]
        diag /= n
    batched = "batched backward passes" if engine.batched and engine.chunk > 1 else "one backward pass per row"
    return Curvature(  # on the CPU, whatever device the model ran on: selection is cheap next to this
        kind=kind,
        loss=totals["loss"] / n,
        gradient=gradient.cpu(),
        hessian=hessian.cpu() if hessian is not None else None,
        hessian_diag=diag.cpu(),
        seconds=time.perf_counter() - start_time,
        n_batches=n,
        strategy=f"reverse-over-reverse HVPs, {batched} of {engine.chunk} rows, {engine.threads} thread(s)",
    )


def _fisher(sigma_model: SigmaModel, batches: list, progress) -> Curvature:
    """F = mean_n g_n g_nᵀ, accumulated in place one batch at a time (one extra N×R block per batch)."""
    start_time = time.perf_counter()
    R = sigma_model.size
    device = sigma_model.sigma.device
    per_sample = sigma_model.has_per_sample_loss
    notes: tuple[str, ...] = (
        "With the Fisher, the selection drops the first-order term (all methods but linear) and the predicted "
        "increase ½σ_PᵀFσ_P is on the Fisher's scale, not the loss's: check the measured loss after pruning "
        "(docs/curvature.md).",
    )
    if not per_sample:
        notes += (
            f"The calibration script defines no per_sample_loss(model, batch), so the Fisher averages the "
            f"{len(batches)} per-batch gradients: a matrix of rank at most {len(batches)}, a poor stand-in for "
            "the Hessian. Define per_sample_loss (docs/curvature.md) or use --curvature exact.",
        )

    def step(index: int, batch, sums: Sums, _meter: Meter) -> None:
        if per_sample:
            with _differentiating("the per-sample gradients", index, order="once"):
                losses, G = per_sample_gradients(sigma_model, batch, index)
            sums.add("loss", float(losses.double().sum()))
        else:
            with torch.enable_grad():
                s = sigma_model.sigma.detach().clone().requires_grad_(True)
                loss = check_loss(sigma_model.loss(s, batch), index)
                g = torch.zeros_like(s)
                if loss.requires_grad:
                    with _differentiating("the gradient", index, order="once"):
                        (g,) = torch.autograd.grad(loss, s, allow_unused=True, materialize_grads=True)
            sums.add("loss", float(loss.detach()))
            G = g.detach()[None]
        G = G.to(torch.float64)
        sums.add_gram("fisher", G)
        sums.add("gradient", G.sum(0))
        sums.add("samples", G.shape[0])
        sums.add("batches", 1)

    sums = Sums(
        loss=0.0,
        samples=0,
        batches=0,
        gradient=torch.zeros(R, dtype=torch.float64, device=device),
        fisher=torch.zeros(R, R, dtype=torch.float64, device=device),
    )
    totals = over_batches(batches, step, sums, progress=progress)
    count = totals["samples"]
    if count == 0:
        raise SubloraError("per_sample_loss returned no samples on any batch; the Fisher needs at least one.")
    fisher, gradient = totals["fisher"], totals["gradient"]
    fisher /= count  # in place: no second R×R matrix
    gradient /= count
    symmetrize_(fisher)
    return Curvature(
        kind="fisher",
        loss=totals["loss"] / count,
        gradient=gradient.cpu(),
        hessian=fisher.cpu(),
        hessian_diag=fisher.diagonal().clone().cpu(),
        seconds=time.perf_counter() - start_time,
        n_batches=totals["batches"],
        n_samples=count,
        strategy="per-sample σ-gradients from one forward+backward pass per batch"
        if per_sample
        else "per-batch gradients (no per_sample_loss)",
        notes=notes,
    )


def symmetrize_(matrix: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """(M + Mᵀ)/2 in place, a block of rows at a time: no second R×R matrix."""
    n = matrix.shape[0]
    block = block or max(1, min(n, 2**18 // max(n, 1)))
    buffer = matrix.new_empty(block * n)  # allocated once: a fresh block per step would page-fault each time
    for a in range(0, n, block):
        b = min(n, a + block)
        mean = torch.add(matrix[a:b, a:], matrix[a:, a:b].T, out=buffer[: (b - a) * (n - a)].view(b - a, n - a))
        mean.mul_(0.5)
        matrix[a:b, a:] = mean
        matrix[a:, a:b] = mean.T
    return matrix


@contextmanager
def _differentiating(what: str, batch_index: int, order: str = "twice") -> Iterator[None]:
    """Explain a failure to differentiate the user's loss as a loss that is not (twice) differentiable."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        if "scaled_dot_product" in first and order == "twice":
            hint = (
                "PyTorch's fused attention (SDPA) has no second derivative here: return the model from "
                'load_model() with attn_implementation="eager" (transformers), or use --curvature fisher, which '
                "needs first derivatives only."
            )
        else:
            twice = " twice" if order == "twice" else ""
            hint = (
                f"The loss must be{twice} differentiable in the LoRA path: no .detach()/.item() on the model "
                "output, no non-differentiable ops, and create_graph=True in any torch.autograd.grad the loss "
                "itself calls."
            )
        raise SubloraError(
            f"Computing {what} of the calibration loss w.r.t. the adapter's singular values failed on batch "
            f"{batch_index}: {first} {hint}"
        ) from e


__all__ = [
    "AUTO",
    "AUTO_MAX_HVPS",
    "CHUNK",
    "KINDS",
    "Curvature",
    "choose_kind",
    "compute_curvature",
    "estimate_cost",
    "resolve_kind",
]
