"""The base model with every adapted module in SVD form, W + U diag(σ) Vᵀ, and all σ in one vector.

Forward hooks add each module's low-rank term to the base layer's output, reading σ from the SigmaModel,
so the user's `loss(model, batch)` calls `model(...)` as usual while the loss becomes a function of σ alone:
the curvature code differentiates it with plain autograd, and pruning is `sigma * kept_mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from sublora_cli.core.svd import Spectrum
from sublora_cli.errors import SubloraError, closest_names
from sublora_cli.formats.base import LoraModule
from sublora_cli.model.batchloop import Sums, over_batches
from sublora_cli.model.script import check_loss

if TYPE_CHECKING:
    from sublora_cli.model.capture import Capture

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def layer_kind(layer: nn.Module) -> str:
    """Which LoRA kind a base layer takes; SubloraError for layers the tool cannot re-parametrise."""
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":  # GPT-2's Conv1D: no hard import
        return "linear"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    raise SubloraError(
        f"{type(layer).__module__}.{type(layer).__name__} is not a layer sublora can re-parametrise; "
        "supported: nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv1d/2d/3d."
    )


def delta_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of ΔW as a matrix, in the layout LoRA's B (out×r) and A (r×in) use for this layer."""
    w = layer.weight
    if type(layer).__name__ == "Conv1D":  # weight stored (in, out)
        return int(w.shape[1]), int(w.shape[0])
    if isinstance(layer, nn.Embedding):  # ΔW is dim × num_embeddings
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w[0].numel())


def find_layer(model: nn.Module, module: LoraModule, path: str | None = None) -> nn.Module:
    """The base layer a LoRA module adapts (at `path` in the model, by default the module's name), checked for
    type and shape."""
    try:
        layer = model.get_submodule(path if path is not None else module.name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SubloraError(
            f"The adapter adapts module {module.name!r}, but the model from load_model() has no such "
            f"module.{closest_names(module.name, names)} "
            "Does load_model() return the base model the adapter was trained on?"
        ) from None
    kind = layer_kind(layer)
    if kind != module.kind:
        raise SubloraError(
            f"Module {module.name}: the adapter holds {module.kind} LoRA factors but the model's layer is a "
            f"{type(layer).__name__}."
        )
    if delta_shape(layer) != module.shape:
        raise SubloraError(
            f"Module {module.name}: the adapter's update is {module.shape[0]}x{module.shape[1]} (out x in) "
            f"but the model's {type(layer).__name__} takes {delta_shape(layer)[0]}x{delta_shape(layer)[1]}; "
            "is this the right base model?"
        )
    if kind == "conv":
        if layer.groups != 1:
            raise SubloraError(f"Module {module.name}: grouped convolutions (groups={layer.groups}) are not supported.")
        if any(d != 1 for d in layer.dilation):  # peft's lora_A conv is built without the base's dilation
            raise SubloraError(
                f"Module {module.name}: dilated convolutions (dilation={layer.dilation}) are not supported."
            )
        if tuple(module.a_shape[1:]) != tuple(layer.weight.shape[1:]):
            raise SubloraError(
                f"Module {module.name}: lora_A has shape {tuple(module.a_shape)} but the convolution's "
                f"kernel is {tuple(layer.weight.shape[1:])}."
            )
    return layer


def placed(model: nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """The model moved to `device` and cast to `dtype` where given; untouched where None (auto)."""
    move = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
    return model.to(**move) if move else model


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where σ and the model's inputs go: the first parameter's device and the first floating parameter's dtype
    (the CPU and float32 for a model without them)."""
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
    return device, dtype


class SigmaModel:
    """The base model with each adapted module re-parametrised as W + U diag(σ) Vᵀ; all σ in one R-vector.

    The model is cast to `dtype` and moved to `device` when they are given; None (`--device auto`/`--dtype
    auto`) leaves it as load_model() returned it, possibly spread over devices by the script (accelerate's
    device_map), and then σ lives on the first parameter's device in the first floating parameter's dtype.
    Tensors passed to `model(...)` go to that device and dtype; each module's low-rank term is computed on its
    own layer's device. The model is put in eval mode (dropout off) and its weights frozen, so gradients flow
    only to σ. Outside `loss`/`evaluate` the hooks use the trained σ, so `self.model` behaves like base model +
    adapter.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: list[LoraModule],
        spectra: list[Spectrum],
        loss_fn: Callable[[nn.Module, object], torch.Tensor],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        per_sample_loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
        paths: Sequence[str] | None = None,
    ):
        if len(modules) != len(spectra):
            raise ValueError(f"{len(modules)} modules but {len(spectra)} spectra")
        self.model = placed(model, device, dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.loss_fn = loss_fn
        self.per_sample_loss_fn = per_sample_loss_fn
        self._capture: Capture | None = None  # per-sample mode: hands each adapted layer call its σ leaf
        self._factored = False  # training mode (using_factors): each update is Σ U_t V_tᵀ, no σ
        self.device, self.dtype = placement(self.model)
        self.sigma = torch.cat([s.sigma for s in spectra]).to(device=self.device, dtype=self.dtype)
        self.offsets: list[int] = []
        self.modules = modules
        self._current = self.sigma  # the σ the hooks read
        layers = [
            find_layer(self.model, module, paths[index] if paths is not None else None)
            for index, module in enumerate(modules)
        ]
        self._devices = [layer.weight.device for layer in layers]  # where each module's low-rank term runs
        self._bases = self._bases_of(spectra)  # the (U, V) hooks read
        self._handles = [self.model.register_forward_pre_hook(self._cast_inputs, with_kwargs=True)]
        offset = 0
        for index, (module, spectrum, layer) in enumerate(zip(modules, spectra, layers, strict=True)):
            hook = self._hook(index, module, layer, offset, offset + spectrum.rank)
            self._handles.append(layer.register_forward_hook(hook, with_kwargs=True))
            self.offsets.append(offset)
            offset += spectrum.rank

    @property
    def size(self) -> int:
        return int(self.sigma.numel())

    def _cast_inputs(self, _model, args, kwargs):
        """Move tensors passed to model(...) to the model's device and floating ones to its dtype.

        Scripts build batches in float32 on the CPU; without this a float64 or GPU SigmaModel would need every
        script to convert its own inputs (the loss may still do so, e.g. to take input derivatives).
        """

        def cast(x):
            if not isinstance(x, torch.Tensor):
                return x
            return x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else x.dtype)

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def on_device(self, batch):
        """The batch with every tensor in it (through dicts, lists and tuples) on the model's device, dtype kept.

        The loss uses batch tensors next to the model's output (targets, boundary values); a script that builds
        its batches on the CPU must still work with --device cuda.
        """
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, dict):
            return type(batch)((k, self.on_device(v)) for k, v in batch.items())
        if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
            return type(batch)(self.on_device(v) for v in batch)
        return batch

    def _bases_of(self, spectra: Sequence[Spectrum]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._basis(m, s, d) for m, s, d in zip(self.modules, spectra, self._devices, strict=True)]

    def _basis(
        self, module: LoraModule, spectrum: Spectrum, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) on the layer's `device` as the hooks use them (V as conv kernels for a convolution), padded
        with zero components to the module's rank so that a spectrum of lower rank fits the module's slice of σ."""
        pad = module.rank - spectrum.rank
        if pad < 0:
            raise ValueError(f"module {module.name}: a spectrum of rank {spectrum.rank} exceeds rank {module.rank}")
        U = F.pad(spectrum.U, (0, pad)).to(device=device, dtype=self.dtype)
        V = F.pad(spectrum.V, (0, pad)).to(device=device, dtype=self.dtype)
        if module.kind == "conv":
            V = V.T.reshape(module.rank, *module.a_shape[1:]).contiguous()  # (r, in_ch, *k)
        return U, V

    @contextmanager
    def using(self, spectra: Sequence[Spectrum]) -> Iterator[torch.Tensor]:
        """Let the modules use other spectra, one per module (each of at most the module's rank), e.g. the SVD
        of the factors exactly as they will be written; yields their σ as one R-vector for `loss`/`evaluate`."""
        if len(spectra) != len(self.modules):
            raise ValueError(f"{len(self.modules)} modules but {len(spectra)} spectra")
        previous = self._bases
        self._bases = self._bases_of(spectra)
        try:
            yield torch.cat(
                [F.pad(s.sigma, (0, m.rank - s.rank)) for m, s in zip(self.modules, spectra, strict=True)]
            ).to(device=self.device, dtype=self.dtype)
        finally:
            self._bases = previous

    def rebase(self, spectra: Sequence[Spectrum]) -> None:
        """Make `spectra` the adapter's SVD form from now on (after a round of training changed the adapter): the
        bases the hooks read and σ, each module's spectrum padded with zero components to its rank."""
        with self.using(spectra) as sigma:
            bases = self._bases
        self._bases, self.sigma = bases, sigma
        self._current = self.sigma

    @contextmanager
    def using_factors(self, terms: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> Iterator[None]:
        """Let each module's update be Σ_t U_t V_tᵀ over its `terms` (pairs U: out×k, V: in×k) instead of
        U diag(σ) Vᵀ, for training: the terms may require grad (scale·B and Aᵀ of the factors being trained, and
        zero-valued probes whose gradient is a product with ∂L/∂ΔW). They are cast to the model's dtype and each
        layer's device here, so master copies stay in float32."""
        if len(terms) != len(self.modules):
            raise ValueError(f"{len(self.modules)} modules but {len(terms)} term lists")
        previous = self._bases
        self._bases = [self._factor_basis(m, t, d) for m, t, d in zip(self.modules, terms, self._devices, strict=True)]
        self._factored = True
        try:
            yield
        finally:
            self._bases, self._factored = previous, False

    def _factor_basis(
        self, module: LoraModule, terms: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        U = torch.cat([u for u, _ in terms], dim=1).to(device=device, dtype=self.dtype)
        V = torch.cat([v for _, v in terms], dim=1).to(device=device, dtype=self.dtype)
        if module.kind == "conv":
            V = V.T.reshape(V.shape[1], *module.a_shape[1:])
        return U, V

    def _hook(self, index: int, module: LoraModule, layer: nn.Module, start: int, stop: int):
        # U, V are read from self._bases rather than registered on the layer, so the user's model keeps its
        # state dict (and `using` can swap them)
        kind = module.kind
        if kind == "conv":
            conv = CONV_FN[len(module.a_shape) - 2]
            stride, padding = layer.stride, layer.padding

        def hook(_layer, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            U, V = self._bases[index]
            if kind == "linear":  # nn.Linear and GPT-2 Conv1D alike: x (…, in)
                h = x @ V
            elif kind == "embedding":  # token ids → rows of V
                h = V[x]
            else:  # conv with V's columns as kernels, scaled per channel, then a 1×1 conv with U
                h = conv(x, V, stride=stride, padding=padding)
            if not self._factored:  # in training (using_factors) the terms carry their own scale
                s = self._current[start:stop].to(V.device)  # a no-op unless the model spans devices
                if self._capture is not None:  # one σ copy per row of dim 0: the per-sample gradients' leaves
                    s = self._capture.leaf(module.name, h, s, start, stop, kind)
                elif kind == "conv":
                    s = s.reshape(-1, *([1] * (h.dim() - 2)))
                h = h * s
            if kind == "conv":
                delta = torch.einsum("or,nr...->no...", U, h)
            else:
                delta = h @ U.T
            return output + delta

        return hook

    @property
    def has_per_sample_loss(self) -> bool:
        return self.per_sample_loss_fn is not None

    @contextmanager
    def capturing(self, capture: Capture) -> Iterator[None]:
        """Let every adapted layer call take its σ from `capture` (fisher.per_sample_gradients) meanwhile."""
        self._capture = capture
        try:
            yield
        finally:
            self._capture = None

    def remove(self) -> None:
        """Take the hooks off the model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def loss(self, sigma: torch.Tensor, batch) -> torch.Tensor:
        """The user's loss on one batch with the adapted modules using `sigma`; differentiable in sigma."""
        previous, self._current = self._current, sigma
        try:
            return self.loss_fn(self.model, self.on_device(batch))
        finally:
            self._current = previous

    def mean_loss(self, sigma: torch.Tensor, batches: Iterable) -> float:
        """Mean loss over the batches, not differentiated in sigma.

        Autograd stays enabled: a PINN-style loss takes derivatives w.r.t. its inputs inside `loss`.
        """
        sigma = sigma.detach().to(device=self.device, dtype=self.dtype)

        def step(index: int, batch, sums: Sums, _meter) -> None:
            sums.add("loss", float(check_loss(self.loss(sigma, batch), index).detach()))
            sums.add("batches", 1)

        with torch.enable_grad():
            totals = over_batches(batches, step, Sums(loss=0.0, batches=0))
        if totals["batches"] == 0:
            raise SubloraError("No calibration batches to average the loss over.")
        return totals["loss"] / totals["batches"]

    def evaluate(self, sigma: torch.Tensor, evaluate_fn: Callable[[nn.Module], dict]) -> dict[str, float]:
        """Run the user's evaluate(model) with the adapted modules using `sigma`."""
        previous, self._current = self._current, sigma.detach().to(device=self.device, dtype=self.dtype)
        try:
            return evaluate_fn(self.model)
        finally:
            self._current = previous
