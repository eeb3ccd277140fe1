"""White-box adapter around a PyTorch ``nn.Module``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from advguard.errors import InputError
from advguard.models.base import ClassifierBase, LossFn
from advguard.models.devices import resolve_device


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dim 1), part of the model, not of the data."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if (std_t <= 0).any():
            raise InputError(f"std must be positive, got {std}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.ndim - 2) if x.ndim > 2 else [1, -1]
        return (x - self.mean.view(shape)) / self.std.view(shape)


class TorchClassifier(ClassifierBase):
    """Wrap an ``nn.Module`` that maps raw inputs (after ``preprocess``) to logits.

    Parameters
    ----------
    module:
        The network, used in place (not copied). While a call of this adapter runs, the
        network (and ``preprocess``) is in eval mode; afterwards every submodule's
        train/eval flag is what it was. ``requires_grad`` of the parameters is never
        changed: gradients are taken with respect to the inputs only, so the parameters'
        ``.grad`` stay untouched (unless a caller runs ``backward()`` on the logits of
        :meth:`forward` itself).
    input_shape:
        Shape of one raw input, without the batch dimension.
    num_classes:
        Number of output logits.
    bounds:
        Valid range of raw inputs (attacks never leave it).
    preprocess:
        Optional module applied before ``module`` (e.g. :class:`Normalize`).
        Attacks differentiate through it.
    device:
        Where the model runs (default: the module's device): ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``, ``"mps"`` or ``"auto"`` (checked by
        :func:`advguard.models.devices.resolve_device`); inputs are moved there. A
        ``device`` other than the module's moves the module there (``nn.Module.to`` works
        in place).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        bounds: tuple[float, float] = (0.0, 1.0),
        preprocess: nn.Module | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=tuple(input_shape), bounds=bounds)
        if not isinstance(module, nn.Module):
            raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.device = resolve_device(device) if device is not None else _module_device(module)
        self.module = module.to(self.device)
        self.preprocess = preprocess.to(self.device) if preprocess is not None else None
        self._eval_depth = 0
        self._saved_flags: list[tuple[nn.Module, bool]] = []

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the duration of the outermost call; the flags are restored after.

        Concurrent and nested calls share one eval period (a counter under a lock), so no
        call ever runs while another one has restored training mode."""
        with _MODE_LOCK:
            if self._eval_depth == 0:
                # only the submodules in training mode are switched (and later restored): a
                # module already in eval mode, the usual case, costs no attribute writes
                mods = [m for m in (self.module, self.preprocess) if m is not None]
                self._saved_flags = [
                    (sub, True) for m in mods for sub in m.modules() if sub.training
                ]
                for sub, _ in self._saved_flags:
                    sub.training = False
            self._eval_depth += 1
        try:
            yield
        finally:
            with _MODE_LOCK:
                self._eval_depth -= 1
                if self._eval_depth == 0:
                    for sub, was_training in self._saved_flags:
                        sub.training = was_training
                    self._saved_flags = []

    # differentiable path ----------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with autograd enabled w.r.t. ``x``; counts forward queries."""
        self.queries.forward += len(x)
        with self._eval_mode():
            if self.preprocess is not None:
                x = self.preprocess(x)
            return self.module(x)

    __call__ = forward

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x.to(self.device, self.dtype))

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(logits, per-sample loss, d loss / d x)`` for a batch.

        ``loss_fn`` maps logits to a per-sample loss that the attack maximises.
        Counts one forward and one gradient query per sample.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(x)
            loss = loss_fn(logits)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        self.queries.gradient += len(x)
        return logits.detach(), loss.detach(), grad.detach()

    def loss_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the cross-entropy loss w.r.t. raw inputs."""
        y = y.to(self.device)
        _, _, g = self.value_and_grad(
            self.to_tensor(x),
            lambda z: nn.functional.cross_entropy(z, y, reduction="none"),
        )
        return g


_MODE_LOCK = threading.Lock()  # guards only the eval-mode bookkeeping, never a computation


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
