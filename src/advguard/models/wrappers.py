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
    loss instead of one noisy draw. Queries are counted by the wrapped model.
    """

    def __init__(self, model: Any, samples: int = 10) -> None:
        if not is_white_box(model):
            raise InputError("EOT needs a white-box (gradient) model")
        if int(samples) < 1:
            raise InputError(f"samples must be >= 1, got {samples}")
        super().__init__(
            num_classes=model.num_classes, input_shape=model.input_shape, bounds=model.bounds
        )
        self.inner = model
        self.samples = int(samples)
        self.device = model.device
        self.queries = model.queries  # share the counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.inner.forward(x) for _ in range(self.samples)]).mean(0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x.to(self.device, self.dtype))

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_sum = loss_sum = g_sum = None
        for _ in range(self.samples):
            z, loss, g = self.inner.value_and_grad(x, loss_fn)
            z_sum = z if z_sum is None else z_sum + z
            loss_sum = loss if loss_sum is None else loss_sum + loss
            g_sum = g if g_sum is None else g_sum + g
        k = float(self.samples)
        return z_sum / k, loss_sum / k, g_sum / k  # type: ignore[operator]
