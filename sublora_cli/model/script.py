"""The user's calibration script (docs/design.md §4): load it by path and call its functions through one place.

The script is user code. Everything it raises becomes a SubloraError that carries the user's own traceback
(trimmed to the frames that matter to them), and every value it returns is checked before the pipeline
relies on it, so a mistake in the script reads as a mistake in the script and not as a crash of the tool.
What it prints goes to stderr: stdout belongs to the tool (`--json`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sublora_cli.constants import DEFAULT_MAX_BATCHES, META_DEVICE
from sublora_cli.errors import SubloraError

REQUIRED = ("load_model", "batches", "loss")
OPTIONAL = ("evaluate", "per_sample_loss", "train_batches", "heldout_batches")
PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # sublora_cli/, every layer
TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class UserCodeError(SubloraError):
    """The calibration script raised; the message holds its traceback."""


def user_traceback(exc: BaseException) -> str:
    """The exception's traceback from the first frame of user code on, without our or torch's inner frames.

    User code is the script and whatever it imports (e.g. a helper module next to it). The frame that
    raised is always kept, even inside torch (a shape mismatch in a matmul says where it happened). A
    SyntaxError has no user frame; its message names the file and line.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    first = next((i for i, f in enumerate(frames) if not _ours(f.filename)), len(frames))
    frames = frames[first:]
    if len(frames) > 1 and _ours(frames[-1].filename):  # raised by our guard (os._exit): the script's call is last
        frames = frames[:-1]
    if frames:
        frames = [f for f in frames[:-1] if not _ours(f.filename) and not f.filename.startswith(TORCH_DIR)] + [
            frames[-1]
        ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "Traceback (most recent call last):\n" + "".join(lines).rstrip()


def _ours(filename: str) -> bool:
    return filename.startswith((PACKAGE_DIR, "<frozen importlib"))


def run_user(fn: Callable, *args, what: str, script: Path) -> Any:
    """Call one of the script's functions under `user_code`; anything it raises becomes a UserCodeError with its
    traceback. `what` names the call ("in loss(model, batch)", "while being imported")."""
    try:
        with user_code():
            return fn(*args)
    except SubloraError:
        raise
    except ExitCalled as e:
        raise UserCodeError(
            f"The calibration script {script} called os._exit({e.code}) {what}, which would end sublora without a "
            "result and with an exit code that means something else. Return a value or raise an exception "
            f"instead.\n{user_traceback(e)}"
        ) from e
    except (Exception, SystemExit) as e:  # sys.exit() in a script is a script error too; Ctrl-C is not
        raise UserCodeError(f"The calibration script {script} raised {what}:\n{user_traceback(e)}") from e


class ExitCalled(BaseException):
    """The script called os._exit(code) while `user_code` watched it."""

    def __init__(self, code: int):
        super().__init__(f"os._exit({code})")
        self.code = code


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """While the script runs: everything it writes to stdout goes to stderr — Python's `print` and, at the level of
    the process, file descriptor 1 (child processes, os.write(1, …), sys.__stdout__) — so `--json` stays
    parseable; and os._exit raises ExitCalled instead of ending the process with no message (a forked child's
    os._exit still exits: multiprocessing ends its workers that way)."""
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            stream.flush()
    saved_fd = _redirect_fd(1, to=2)
    real_exit, owner = os._exit, os.getpid()

    def exit_called(code: int) -> None:
        if os.getpid() != owner:
            real_exit(code)
        raise ExitCalled(code)

    os._exit = exit_called
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os._exit = real_exit
        if sys.__stdout__ is not None:
            sys.__stdout__.flush()  # what the script buffered for fd 1 goes where fd 1 pointed while it ran
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _redirect_fd(fd: int, to: int) -> int | None:
    """Point `fd` at `to`; a copy of the old `fd` to restore, or None when either is closed (nothing to protect)."""
    try:
        saved = os.dup(fd)
    except OSError:
        return None
    try:
        os.dup2(to, fd)
    except OSError:
        os.close(saved)
        return None
    return saved


def _check_losses(value: Any, what: str, where: str, type_hint: str, shape_ok: bool, shape_hint: str) -> torch.Tensor:
    """The checks loss and per_sample_loss share: a floating tensor of an accepted shape, every entry finite."""
    if not isinstance(value, torch.Tensor):
        raise SubloraError(f"{what} returned a {type(value).__name__}{where}; {type_hint}")
    if not shape_ok:
        raise SubloraError(f"{what} returned a tensor of shape {tuple(value.shape)}{where}; {shape_hint}")
    if not value.is_floating_point():
        raise SubloraError(f"{what} returned a tensor of dtype {value.dtype}{where}; it must be floating point.")
    finite = torch.isfinite(value.detach()).reshape(-1)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        sample = f" for sample {bad}" if value.numel() > 1 else ""
        raise SubloraError(
            f"{what} returned {float(value.detach().reshape(-1)[bad])}{sample}{where} (batch indices count from 0 "
            "in the order batches() yields them); the loss must be finite."
        )
    return value


def check_loss(value: Any, batch_index: int | None = None) -> torch.Tensor:
    """The loss must be a finite scalar tensor (one element); returns it as a 0-d tensor."""
    return _check_losses(
        value,
        "loss(model, batch)",
        f" on batch {batch_index}" if batch_index is not None else "",
        type_hint="it must return a scalar torch.Tensor that depends on the model's output (not a float: the tool "
        "differentiates it).",
        shape_ok=isinstance(value, torch.Tensor) and value.numel() == 1,
        shape_hint="it must be a scalar (reduce it, e.g. with .mean()).",
    ).reshape(())


def check_per_sample_loss(value: Any, batch_index: int | None = None) -> torch.Tensor:
    """per_sample_loss must return a finite 1-D floating tensor, one loss per sample (a scalar counts as one)."""
    return _check_losses(
        value,
        "per_sample_loss(model, batch)",
        f" on batch {batch_index}" if batch_index is not None else "",
        type_hint="it must return a 1-D torch.Tensor with one loss per sample, computed from the model's output "
        "(e.g. the loss with reduction='none', averaged over everything but the batch dimension).",
        shape_ok=isinstance(value, torch.Tensor) and (value.dim() <= 1 or value.numel() == value.shape[0]),
        shape_hint="it must be 1-D, one loss per sample (reduce every dimension but the batch dimension, e.g. "
        ".mean(dim=1)).",
    ).reshape(-1)


def check_metrics(value: Any) -> dict[str, float]:
    """evaluate(model) must return {name: number}; a number: a Python/NumPy scalar or 1-element tensor."""
    if not isinstance(value, dict):
        raise SubloraError(
            f"evaluate(model) returned a {type(value).__name__}; it must return a dict of metric name to "
            "number, e.g. {'rel_l2': 0.01}."
        )
    metrics = {}
    for key, v in value.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(key, str) or isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise SubloraError(
                f"evaluate(model) returned {{{key!r}: {v!r}}}; it must return a dict of str → number, "
                "e.g. {'rel_l2': 0.01}."
            )
        metrics[key] = float(v)  # NaN/Inf are kept: a metric that diverged after pruning is information
    return metrics


@dataclass(frozen=True)
class CalibrationScript:
    """The functions of a calibration script as it defines them; call them through the call_* methods."""

    path: Path
    load_model: Callable[[], nn.Module]
    batches: Callable[[], Iterable]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    per_sample_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None  # optional: one loss per sample
    train_batches: Callable[[], Iterable] | None = None  # optional: what --rounds trains on (else batches())
    heldout_batches: Callable[[], Iterable] | None = None  # optional: measured, never fitted (holdout.py)

    def call_load_model(self) -> nn.Module:
        model = run_user(self.load_model, what="in load_model()", script=self.path)
        if not isinstance(model, nn.Module):
            raise SubloraError(
                f"load_model() in {self.path} returned a {type(model).__name__}; it must return a torch.nn.Module."
            )
        if any(p.is_meta for p in model.parameters()):
            raise SubloraError(
                f"load_model() in {self.path} returned a model with parameters on the meta device: {META_DEVICE}. "
                "Load the weights (e.g. without init_empty_weights, or with device_map='cpu')."
            )
        return model

    def call_batches(
        self, max_batches: int = DEFAULT_MAX_BATCHES, progress: Callable[[str, int, int | None], None] | None = None
    ) -> list:
        """All calibration batches as a list (they are used more than once), collected one at a time with
        `progress("batches", count, None)`, so that a batches() that never ends stops at `max_batches`."""
        return self._batches_of(self.batches, "batches", max_batches, progress)

    def call_train_batches(
        self, max_batches: int = DEFAULT_MAX_BATCHES, progress: Callable[[str, int, int | None], None] | None = None
    ) -> list | None:
        """The batches of train_batches() as a list, like call_batches; None when the script defines none (the
        training rounds then use the calibration batches)."""
        if self.train_batches is None:
            return None
        return self._batches_of(self.train_batches, "train_batches", max_batches, progress)

    def call_heldout_batches(
        self, max_batches: int = DEFAULT_MAX_BATCHES, progress: Callable[[str, int, int | None], None] | None = None
    ) -> list | None:
        """The batches of heldout_batches() as a list, like call_batches; None when the script defines none."""
        if self.heldout_batches is None:
            return None
        return self._batches_of(self.heldout_batches, "heldout_batches", max_batches, progress)

    def _batches_of(
        self,
        function: Callable[[], Iterable],
        name: str,
        max_batches: int,
        progress: Callable[[str, int, int | None], None] | None,
    ) -> list:
        if max_batches < 1:
            raise SubloraError(f"--max-batches {max_batches}: must be 1 or more.")
        returned = run_user(function, what=f"in {name}()", script=self.path)
        try:
            iterator = iter(returned)
        except TypeError:
            raise SubloraError(
                f"{name}() in {self.path} returned a {type(returned).__name__}, which is not iterable; it must "
                "return (or yield) its batches: a list or generator of the values that "
                "loss(model, batch) takes, e.g. [tensor_1, tensor_2] or `yield batch` in a loop."
            ) from None
        batches = run_user(
            lambda: self._collect(iterator, name, max_batches, progress), what=f"in {name}()", script=self.path
        )
        if not batches:
            raise SubloraError(f"{name}() in {self.path} yielded no batches; the set must not be empty.")
        return batches

    def _collect(
        self,
        iterator: Iterator,
        name: str,
        max_batches: int,
        progress: Callable[[str, int, int | None], None] | None,
    ) -> list:
        batches: list = []
        for batch in iterator:
            if len(batches) == max_batches:
                raise SubloraError(
                    f"{name}() in {self.path} yielded more than {max_batches:,} batches (--max-batches); does "
                    "it loop forever (a `while True` generator, an endless data loader)? Make it yield a finite "
                    "set, e.g. with itertools.islice(loader, 64), or raise --max-batches."
                )
            batches.append(batch)
            if progress:
                progress(name, len(batches), None)
        if progress:
            progress(name, len(batches), len(batches))
        return batches

    def call_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The user's loss with exceptions converted; check_loss checks the value where the batch is known."""
        return run_user(self.loss, model, batch, what="in loss(model, batch)", script=self.path)

    def call_per_sample_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The user's per-sample losses with exceptions converted; check_per_sample_loss checks the value."""
        if self.per_sample_loss is None:
            raise SubloraError(f"The calibration script {self.path} defines no per_sample_loss(model, batch).")
        return run_user(self.per_sample_loss, model, batch, what="in per_sample_loss(model, batch)", script=self.path)

    def call_evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if self.evaluate is None:
            return None
        return check_metrics(run_user(self.evaluate, model, what="in evaluate(model)", script=self.path))


def load_calibration(path: str | Path) -> CalibrationScript:
    """Import the script at `path` (this runs its code) and pick out its functions.

    The script's directory goes on sys.path, as when running `python script.py`, so it can import helpers
    that sit next to it.
    """
    path = Path(path)
    if not path.exists():
        raise SubloraError(f"Calibration script {path} does not exist.")
    if not path.is_file():
        raise SubloraError(f"Calibration script {path} is not a file; --calib takes a Python file.")
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = f"sublora_calibration_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SubloraError(f"Calibration script {path} could not be loaded as Python (does it end in .py?).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the script look their module up here
    try:
        run_user(spec.loader.exec_module, module, what="while being imported", script=path)
    except UserCodeError:
        sys.modules.pop(name, None)
        raise

    defined = sorted(
        k for k, v in vars(module).items() if callable(v) and not isinstance(v, type) and not k.startswith("_")
    )
    functions = {}
    has_per_sample = getattr(module, "per_sample_loss", None) is not None
    for key in (*REQUIRED, *OPTIONAL):
        fn = getattr(module, key, None)
        optional = key in OPTIONAL or (key == "loss" and has_per_sample)
        if fn is None and not optional:
            raise SubloraError(
                f"The calibration script {path} does not define {key}(); it must define load_model(), "
                "batches() and loss(model, batch) (evaluate(model), per_sample_loss(model, batch), "
                "train_batches() and heldout_batches() are optional; with per_sample_loss, loss may be left out "
                "and defaults to its mean). "
                f"It defines: {', '.join(defined) or 'no functions'}."
            )
        if fn is not None and not callable(fn):
            raise SubloraError(f"In the calibration script {path}, {key} is a {type(fn).__name__}, not a function.")
        functions[key] = fn
    if functions["loss"] is None:
        functions["loss"] = _mean_of(functions["per_sample_loss"])
    return CalibrationScript(path=path, **functions)


def _mean_of(per_sample_loss: Callable[[nn.Module, Any], torch.Tensor]) -> Callable[[nn.Module, Any], torch.Tensor]:
    """loss(model, batch) for a script that defines only per_sample_loss: the mean of the per-sample losses."""

    def loss(model, batch):
        value = per_sample_loss(model, batch)
        return value.mean() if isinstance(value, torch.Tensor) and value.numel() > 1 else value

    return loss
