"""STRIP: flag trojaned inputs at run time by how little their prediction changes under blending.

Gao, Xu, Wang, Chen, Ranasinghe, Nepal 2019, "STRIP: A Defence Against Trojan Attacks on Deep
Neural Networks", ACSAC. Each input is superimposed with ``n`` clean images drawn from a held
clean set (here a linear blend ``(1 - w) x + w x_clean`` with ``w`` = ``blend``, clipped to the
bounds); a trojaned input keeps predicting the target class whatever it is mixed with, so the
mean Shannon entropy of the ``n`` predicted distributions is low. The score is the *negative*
entropy (higher = more suspicious). The threshold is calibrated at a target false-positive rate
on held-out clean inputs with the split-conformal rule of
:mod:`advguard.defenses.detectors.base`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from advguard.defenses.detectors.base import Detector
from advguard.errors import InputError
from advguard.models.base import ArrayLike


class StripDetector(Detector):
    """``fit(x_clean)`` stores the images used for superimposition; ``calibrate(x_heldout, fpr)``
    sets ``threshold``; ``score(x)`` / ``is_adversarial(x)`` as for every detector."""

    name = "strip"
    needs_fit = True
    batch_size = 64

    def __init__(self, model: Any, *, n: int = 32, blend: float = 0.5, seed: int = 0) -> None:
        super().__init__(model)
        if n < 1 or not 0 < blend < 1:
            raise InputError(f"STRIP needs n >= 1 and blend in (0, 1), got {n}, {blend}")
        self.n = int(n)
        self.blend = float(blend)
        self.seed = int(seed)
        self._pool: torch.Tensor | None = None

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if len(x) < 2:
            raise InputError("STRIP needs at least 2 clean images to superimpose")
        self._pool = x.detach().clone()

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self._pool is not None
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = self.model.bounds
        pick = torch.randint(len(self._pool), (len(x), self.n), generator=g)
        others = self._pool[pick.reshape(-1)].to(x.device)  # (B*n, ...)
        rep = x.repeat_interleave(self.n, dim=0)
        mixed = ((1 - self.blend) * rep + self.blend * others).clamp(lo, hi)
        logits = self.model.logits(mixed).float()
        logp = torch.log_softmax(logits, dim=1)
        ent = -(logp.exp() * logp).sum(dim=1).reshape(len(x), self.n).mean(dim=1)
        return -ent

    def is_adversarial(self, x: ArrayLike) -> np.ndarray:
        """Bool per input: flagged as trojaned (score above the calibrated threshold)."""
        return self.detect(x)

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "blend": self.blend, "seed": self.seed}
