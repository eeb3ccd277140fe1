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
