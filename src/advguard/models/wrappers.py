"""Adapters that wrap other adapters (same protocol in, same protocol out)."""

from __future__ import annotations

from typing import Any

import torch

from advguard.errors import InputError
from advguard.models.base import ClassifierBase, LossFn, is_white_box


class EOTClassifier(ClassifierBase):
    """Expectation over Transformation (Athalye et al. 2018) for randomized models.

    ``logits`` are averaged over ``samples`` draws, and ``value_and_grad`` returns the mean
    loss and mean gradient over ``samples`` draws, so gradient attacks optimise the expected
    loss instead of one noisy draw. Queries are counted by the wrapped model. Around a
    black-box model only the averaged ``logits`` exist (score-based attacks, judging).
    """

    def __init__(self, model: Any, samples: int = 10) -> None:
        if int(samples) < 1:
            raise InputError(f"samples must be >= 1, got {samples}")
        super().__init__(
            num_classes=model.num_classes, input_shape=model.input_shape, bounds=model.bounds
        )
        self.inner = model
        self.samples = int(samples)
        self.device = getattr(model, "device", torch.device("cpu"))
        self.queries = model.queries  # share the counter
        if is_white_box(model):  # gradient path only when the wrapped model has one
            self.forward = self._forward
            self.value_and_grad = self._value_and_grad

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.inner.forward(x) for _ in range(self.samples)]).mean(0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.to(self.device, self.dtype)
            return torch.stack([self.inner.logits(x) for _ in range(self.samples)]).mean(0)

    def _value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_sum, loss_sum, g_sum = self.inner.value_and_grad(x, loss_fn)
        for _ in range(self.samples - 1):
            z, loss, g = self.inner.value_and_grad(x, loss_fn)
            z_sum = z_sum + z
            loss_sum = loss_sum + loss
            g_sum = g_sum + g
        k = float(self.samples)
        return z_sum / k, loss_sum / k, g_sum / k
