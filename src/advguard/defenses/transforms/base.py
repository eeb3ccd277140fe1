"""Input transforms as defenses, and the adapter that puts them in front of a model.

An :class:`InputTransform` maps a batch in the model's raw input space to a batch of the same
shape inside the same bounds. It declares two facts that decide how it must be attacked:

* ``differentiable = False``: its gradient is zero, undefined or meaningless (quantization,
  median filters implemented with sorting, JPEG through Pillow). Plain gradient attacks then
  see masked gradients and overstate robustness; the evaluation runner attacks through it with
  BPDA (Athalye et al. 2018): forward through the real transform, backward through
  :meth:`InputTransform.approximation` (the identity by default, "straight-through").
* ``randomized = True``: its output depends on a random draw (noise, random resizing). The
  runner attacks it with EOT (expectation over transformation).

:class:`TransformedClassifier` turns any adapter into a defended one with the same protocol;
white-box when the wrapped model is. It is what ``advguard`` evaluates, serves and reports on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from advguard.errors import InputError
from advguard.models.base import (
    Classifier,
    ClassifierBase,
    LossFn,
    WhiteBoxClassifier,
    is_white_box,
)
from advguard.models.wrappers import straight_through


class InputTransform:
    """Base class: subclasses set ``name``/``differentiable``/``randomized`` and ``__call__``."""

    name: str = "transform"
    differentiable: bool = True
    randomized: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable stand-in used by BPDA on the backward pass (default: identity)."""
        return x

    def params(self) -> dict[str, Any]:
        """Parameters recorded in reports (override to list them)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "differentiable": self.differentiable,
            "randomized": self.randomized,
            "params": self.params(),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def bpda(transform: InputTransform, x: torch.Tensor) -> torch.Tensor:
    """Forward value ``transform(x)``, gradient of ``transform.approximation(x)``."""
    with torch.no_grad():
        out = transform(x.detach())
    return straight_through(out, transform.approximation(x))


class TransformedClassifier(ClassifierBase):
    """``model(transforms(x))`` with the adapter protocol of ``model``.

    With ``bpda=True`` every non-differentiable transform is replaced on the backward pass
    by its :meth:`~InputTransform.approximation` (forward values are unchanged, so predictions
    are exactly those of the defended model). Queries are counted by the wrapped model.
    """

    def __init__(
        self, model: Classifier, transforms: Sequence[InputTransform], *, bpda: bool = False
    ) -> None:
        transforms = list(transforms)
        if not transforms:
            raise InputError("TransformedClassifier needs at least one transform")
        for t in transforms:
            if not isinstance(t, InputTransform):
                raise InputError(f"not an InputTransform: {t!r}")
        super().__init__(
            num_classes=model.num_classes, input_shape=model.input_shape, bounds=model.bounds
        )
        self.inner = model
        self.transforms = transforms
        self.bpda = bool(bpda)
        self.device = getattr(model, "device", torch.device("cpu"))
        self.queries = model.queries  # share the counter
        self._white: WhiteBoxClassifier | None = None
        if is_white_box(model):  # expose the gradient path only when the model has one
            self._white = model
            self.forward = self._forward
            self.value_and_grad = self._value_and_grad

    # -- what the runner and the sanity checks read ---------------------------
    @property
    def nondifferentiable(self) -> list[str]:
        """Names of the transforms that need BPDA."""
        return [t.name for t in self.transforms if not t.differentiable]

    @property
    def randomized(self) -> bool:
        return any(t.randomized for t in self.transforms)

    def with_bpda(self) -> TransformedClassifier:
        """The same defended model, differentiable through BPDA (for attacks only)."""
        return TransformedClassifier(self.inner, self.transforms, bpda=True)

    def describe(self) -> dict[str, Any]:
        return {
            "transforms": [t.describe() for t in self.transforms],
            "bpda": self.bpda,
            "model": type(self.inner).__name__,
        }

    # -- protocol ----------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds
        for t in self.transforms:
            x = bpda(t, x) if (self.bpda and not t.differentiable) else t(x)
        return x.clamp(lo, hi)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._white is None:  # not reached: the gradient path is bound only for white-box
            raise InputError(f"{type(self.inner).__name__} has no gradients")
        return self._white.forward(self.apply(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.inner.logits(self.apply(x.to(self.device, self.dtype)))

    def _value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient through the transforms; zero where they cut the graph (masking)."""
        x = x.detach().to(self.device, self.dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = self._forward(x)
            loss = loss_fn(logits)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
            else:
                grad = None
        if grad is None:  # the transform detached its output: no gradient reaches x
            grad = torch.zeros_like(x)
        self.queries.gradient += len(x)
        return logits.detach(), loss.detach(), grad.detach()
