"""Fast Gradient (Sign) Method, Goodfellow et al. 2015 ("Explaining and Harnessing...")."""

from __future__ import annotations

import torch

from advguard.attacks import losses
from advguard.attacks.base import Attack
from advguard.attacks.norms import normalize


class FGSM(Attack):
    """One gradient step of size ``epsilon``: sign step for Linf, normalized step for L2."""

    name = "fgsm"
    norms = ("linf", "l2")

    def __init__(self, *, norm: str | float = "linf", seed: int = 0) -> None:
        super().__init__(norm=norm, seed=seed)

    def _run(self, model, x, y, epsilon, targets, generator) -> torch.Tensor:  # type: ignore[override]
        if targets is None:
            _, _, g = model.value_and_grad(x, lambda z: losses.ce(z, y))
        else:
            _, _, g = model.value_and_grad(x, lambda z: losses.ce_targeted(z, targets))
        return x + epsilon * normalize(g, self.norm)
