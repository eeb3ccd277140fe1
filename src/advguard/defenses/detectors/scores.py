"""Detectors that score inputs from model outputs: feature squeezing, ensemble disagreement,
and confidence (entropy / maximum probability)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from advguard.defenses.detectors.base import Detector
from advguard.defenses.transforms.base import InputTransform, bpda
from advguard.errors import InputError
from advguard.models.base import is_white_box


def _proba(model: Any, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Probabilities; with ``grad`` through the model's differentiable ``forward``."""
    if grad:
        if not is_white_box(model):
            raise InputError(
                f"a differentiable detector score needs white-box models, got "
                f"{type(model).__name__}"
            )
        return torch.softmax(model.forward(x).double(), dim=1)
    return torch.softmax(model.logits(x).double(), dim=1)


class FeatureSqueezingDetector(Detector):
    """Feature squeezing (Xu, Evans & Qi 2018, NDSS).

    ``score(x) = max_s || softmax(f(x)) - softmax(f(s(x))) ||_1`` over the squeezers ``s``
    (in ``[0, 2]``). Adversarial perturbations tuned to ``f`` tend not to survive squeezing,
    so the prediction moves; benign predictions barely do. Default squeezers are the paper's
    MNIST choice: 1-bit depth reduction and a 2x2 median filter (for colour images the paper
    used 5-bit depth, 2x2 median and non-local means). No fitting needed; calibrate the
    threshold on held-out benign data.
    """

    name = "feature-squeezing"
    differentiable = True

    def __init__(self, model: Any, squeezers: Sequence[InputTransform] | None = None) -> None:
        super().__init__(model)
        if squeezers is None:
            from advguard.defenses.transforms.image import BitDepthReduction, MedianSmoothing

            squeezers = [BitDepthReduction(1, bounds=model.bounds), MedianSmoothing(2)]
        squeezers = list(squeezers)
        if not squeezers:
            raise InputError("FeatureSqueezingDetector needs at least one squeezer")
        for s in squeezers:
            if not isinstance(s, InputTransform):
                raise InputError(f"not an InputTransform: {s!r}")
        self.squeezers = squeezers

    def _score(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        lo, hi = self.model.bounds
        p = _proba(self.model, x, grad)

        def squeeze(s: InputTransform) -> torch.Tensor:
            # for attacks: BPDA through the non-differentiable squeezers
            return (bpda(s, x) if grad and not s.differentiable else s(x)).clamp(lo, hi)

        dist = [(p - _proba(self.model, squeeze(s), grad)).abs().sum(1) for s in self.squeezers]
        return torch.stack(dist).amax(0)

    def params(self) -> dict[str, Any]:
        return {"squeezers": [s.describe() for s in self.squeezers]}


class DisagreementDetector(Detector):
    """Disagreement of an ensemble: mean pairwise total-variation distance of probabilities.

    ``score(x) = mean_{i<j} 0.5 * || p_i(x) - p_j(x) ||_1`` (in ``[0, 1]``). Adversarial
    examples crafted on one member often transfer only partly to the others. The models must
    share ``input_shape``, ``bounds`` and ``num_classes``; the first defines the input checks.
    """

    name = "disagreement"
    differentiable = True

    def __init__(self, models: Sequence[Any]) -> None:
        models = list(models)
        if len(models) < 2:
            raise InputError(f"DisagreementDetector needs at least two models, got {len(models)}")
        super().__init__(models[0])

        def sig(m: Any) -> tuple[Any, ...]:
            return (tuple(m.input_shape), tuple(m.bounds), int(m.num_classes))

        for m in models[1:]:
            if not all(hasattr(m, a) for a in ("input_shape", "bounds", "num_classes", "logits")):
                raise InputError(f"not a classifier adapter: {type(m).__name__}")
            if sig(m) != sig(models[0]):
                raise InputError(
                    "all models of a DisagreementDetector must share input_shape, bounds and "
                    f"num_classes; got {sig(m)} and {sig(models[0])}"
                )
        self.models = models

    def _score(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        ps = [
            _proba(m, x.to(getattr(m, "device", x.device)), grad).to(x.device) for m in self.models
        ]
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        pairs = 0
        for i in range(len(ps)):
            for j in range(i + 1, len(ps)):
                total += 0.5 * (ps[i] - ps[j]).abs().sum(1)
                pairs += 1
        return total / pairs

    def params(self) -> dict[str, Any]:
        return {"models": [type(m).__name__ for m in self.models]}


class ConfidenceDetector(Detector):
    """Low-confidence score (the OOD baseline of Hendrycks & Gimpel 2017).

    ``kind="entropy"``: ``-sum_c p_c log p_c``; ``kind="max_prob"``: ``1 - max_c p_c``.
    Catches minimum-norm attacks (CW, DeepFool) that stop just past the decision boundary;
    blind to high-confidence adversarial examples (CW with a large ``confidence``, PGD run to
    convergence), which it scores as very benign.

    It needs only the model's probabilities, so it also scores a text model's strings
    (:func:`~advguard.defenses.detectors.base.is_text_model`: ``predict_proba(list[str])``,
    e.g. a :class:`~advguard.attacks.text.TextClassifier`); ``score`` then takes a list (or
    1-D object array) of strings. A numeric model's probabilities are ``softmax(logits)`` in
    float64 (differentiable); a text model's are its ``predict_proba``, in float64.
    """

    name = "confidence"
    differentiable = True
    text_capable = True
    KINDS = ("entropy", "max_prob")

    def __init__(self, model: Any, kind: str = "entropy") -> None:
        super().__init__(model)
        if kind not in self.KINDS:
            raise InputError(f"unknown kind {kind!r}; use one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.name = f"confidence-{kind}"

    def _score(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return self._from_proba(_proba(self.model, x, grad))

    def _score_texts(self, texts: list[str]) -> torch.Tensor:
        p = np.asarray(self.model.predict_proba(texts), dtype=np.float64)
        k = int(self.model.num_classes)
        if p.shape != (len(texts), k) or not np.isfinite(p).all():
            raise InputError(
                f"{type(self.model).__name__}.predict_proba answered shape {p.shape} (expected "
                f"{(len(texts), k)}) or non-finite values"
            )
        return self._from_proba(torch.from_numpy(p))

    def _from_proba(self, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "entropy":
            return -(p * torch.log(p.clamp_min(1e-300))).sum(1)
        return 1.0 - p.amax(1)

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind}
