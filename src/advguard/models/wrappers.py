"""Adapters that wrap other adapters (same protocol in, same protocol out)."""

from __future__ import annotations

import torch

from advguard.errors import InputError
from advguard.models.base import (
    Classifier,
    ClassifierBase,
    LossFn,
    WhiteBoxClassifier,
    is_white_box,
)


class EOTClassifier(ClassifierBase):
    """Expectation over Transformation (Athalye et al. 2018) for randomized models.

    ``logits`` are averaged over ``samples`` draws, and ``value_and_grad`` returns the mean
    loss and mean gradient over ``samples`` draws, so gradient attacks optimise the expected
    loss instead of one noisy draw. Queries are counted by the wrapped model. Around a
    black-box model only the averaged ``logits`` exist (score-based attacks, judging).
    """

    def __init__(self, model: Classifier, samples: int = 10) -> None:
        if int(samples) < 1:
            raise InputError(f"samples must be >= 1, got {samples}")
        super().__init__(
            num_classes=model.num_classes, input_shape=model.input_shape, bounds=model.bounds
        )
        self.inner = model
        self.samples = int(samples)
        self.device = getattr(model, "device", torch.device("cpu"))
        self.queries = model.queries  # share the counter
        self._white: WhiteBoxClassifier | None = None
        if is_white_box(model):  # gradient path only when the wrapped model has one
            self._white = model
            self.forward = self._forward
            self.value_and_grad = self._value_and_grad

    def _gradient_model(self) -> WhiteBoxClassifier:
        if self._white is None:  # not reached: the gradient path is bound only for white-box
            raise InputError(f"EOT around {type(self.inner).__name__} has no gradients")
        return self._white

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self._gradient_model()
        return torch.stack([inner.forward(x) for _ in range(self.samples)]).mean(0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.to(self.device, self.dtype)
            return torch.stack([self.inner.logits(x) for _ in range(self.samples)]).mean(0)

    def _value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = self._gradient_model()
        z_sum, loss_sum, g_sum = inner.value_and_grad(x, loss_fn)
        for _ in range(self.samples - 1):
            z, loss, g = inner.value_and_grad(x, loss_fn)
            z_sum = z_sum + z
            loss_sum = loss_sum + loss
            g_sum = g_sum + g
        k = float(self.samples)
        return z_sum / k, loss_sum / k, g_sum / k


def straight_through(value: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """BPDA's core (Athalye, Carlini & Wagner 2018, sec. 4.1): forward ``value``, backward
    through ``approximation`` (a differentiable stand-in computed from the same input)."""
    return value.detach() + (approximation - approximation.detach())  # exact forward value


class SurrogateGradientClassifier(ClassifierBase):
    """BPDA through a learned surrogate of the whole model, for undeclared defenses.

    Athalye et al. 2018 (sec. 4.1) replace a non-differentiable layer ``f`` by a differentiable
    ``g ~ f`` on the backward pass. When a model hides a random, non-differentiable
    preprocessing inside itself, the layer cannot be named, so ``g`` approximates the *whole*
    model: a white-box ``surrogate`` trained on the model's own answers (Papernot et al. 2017).
    ``logits`` are those of ``model`` (an :class:`EOTClassifier` averages them over draws);
    ``value_and_grad`` returns ``model``'s logits and loss with the gradient of the loss through
    the surrogate's logits (``d loss / d z`` at the true logits, times the surrogate Jacobian).
    Queries of ``model`` are counted by ``model``; surrogate gradients are counted on the
    surrogate's own counter, not as target gradients.
    """

    def __init__(self, model: Classifier, surrogate: Classifier) -> None:
        if not is_white_box(surrogate):
            raise InputError("the surrogate must be a white-box model (forward/value_and_grad)")
        if tuple(surrogate.input_shape) != tuple(model.input_shape) or int(
            surrogate.num_classes
        ) != int(model.num_classes):
            raise InputError("the surrogate must take the model's inputs and classes")
        super().__init__(
            num_classes=model.num_classes, input_shape=model.input_shape, bounds=model.bounds
        )
        self.inner = model
        self.surrogate = surrogate
        self.device = getattr(model, "device", torch.device("cpu"))
        self.queries = model.queries

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(x.to(self.device, self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits, differentiable through the surrogate."""
        value = self.logits(x.detach())
        approx = self.surrogate.forward(x.to(self.surrogate.device)).to(value)
        return straight_through(value, approx)

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().to(self.device, self.dtype).requires_grad_(True)
        with torch.enable_grad():
            z = self.forward(x)
            loss = loss_fn(z)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        self.surrogate.queries.gradient += len(x)
        return z.detach(), loss.detach(), grad.detach()
