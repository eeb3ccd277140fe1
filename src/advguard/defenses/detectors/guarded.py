"""A classifier guarded by a detector, as one model, so attacks can target both at once.

:class:`DetectorGuardedClassifier` answers with ``K + 1`` classes: the classifier's ``K``
and a *reject* class (index ``K``) that wins exactly when the detector flags the input
(score above its calibrated threshold). The evaluation runner knows the reject class: a
rejected input is never counted as fooled, and a rejected benign input counts as an error
(the detector's false-positive cost shows in clean accuracy).

The reject logit is ``max_j z_j + sharpness * (score - threshold)`` (the construction of
Carlini & Wagner 2017, "Adversarial Examples Are Not Easily Detected", sec. 4), computed
with a differentiable score (BPDA through non-differentiable squeezers), so gradient attacks
minimise the classifier's margin and the detector's score jointly. Use targeted attacks
(``apgd-t``): an untargeted attack may stop at the reject class, which the runner does not
accept as success.
"""

from __future__ import annotations

from typing import Any

import torch

from advguard import _validate as check
from advguard.defenses.detectors.base import Detector
from advguard.errors import InputError
from advguard.models.base import (
    Classifier,
    ClassifierBase,
    LossFn,
    WhiteBoxClassifier,
    is_white_box,
)


class DetectorGuardedClassifier(ClassifierBase):
    """``model`` behind ``detector`` (calibrated); ``K + 1`` outputs, reject = index ``K``."""

    def __init__(self, model: Classifier, detector: Detector, *, sharpness: float = 100.0) -> None:
        if not isinstance(detector, Detector):
            raise InputError(f"not a Detector: {type(detector).__name__}")
        if detector.threshold is None:
            raise InputError(
                "the detector has no threshold; call detector.calibrate(x_benign_heldout, fpr) "
                "before guarding a model with it"
            )
        check.positive("sharpness", sharpness)
        super().__init__(
            num_classes=model.num_classes + 1, input_shape=model.input_shape, bounds=model.bounds
        )
        self.inner = model
        self.detector = detector
        self.sharpness = float(sharpness)
        self.reject_class = model.num_classes
        self.device = getattr(model, "device", torch.device("cpu"))
        self.queries = model.queries  # share the counter
        self._white: WhiteBoxClassifier | None = None
        if is_white_box(model) and detector.differentiable:
            self._white = model
            self.forward = self._forward
            self.value_and_grad = self._value_and_grad

    def _combine(self, z: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        if self.detector.threshold is None:  # checked in __init__; refuse a reset detector
            raise InputError("the detector lost its threshold; calibrate it again")
        thr = float(self.detector.threshold)
        reject = z.amax(1) + self.sharpness * (score.to(z.dtype) - thr)
        return torch.cat([z, reject[:, None]], dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Exact decisions: the classifier's logits and the detector's own (non-BPDA) score."""
        with torch.no_grad():
            x = x.to(self.device, self.dtype)
            return self._combine(self.inner.logits(x), self.detector.score_tensor(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._white is None:  # not reached: the gradient path is bound only for white-box
            raise InputError(f"{type(self.inner).__name__} has no gradients")
        return self._combine(self._white.forward(x), self.detector.score_tensor(x, grad=True))

    def _value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().to(self.device, self.dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = self._forward(x)
            loss = loss_fn(logits)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        self.queries.gradient += len(x)
        return logits.detach(), loss.detach(), grad.detach()

    def describe(self) -> dict[str, Any]:
        return {
            "detector": self.detector.describe(),
            "reject_class": self.reject_class,
            "sharpness": self.sharpness,
            "model": type(self.inner).__name__,
        }
