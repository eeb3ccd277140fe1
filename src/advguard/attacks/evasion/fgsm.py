"""Fast Gradient (Sign) Method, Goodfellow et al. 2015 ("Explaining and Harnessing...").

The smallest complete attack, and the template for new ones: copy this file, implement
``_run`` (return a :class:`~advguard.attacks.base.RunResult`), validate constructor
arguments with :mod:`advguard._validate`, and register the class in
``attacks/registry.py``. The base class does the rest (input checks, skipping samples
already misclassified, the final clip, the success check, query accounting), and
``tests/test_attack_contract.py`` checks the common promises for every registered attack.
"""

from __future__ import annotations

import torch

from advguard.attacks import losses
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.norms import normalize
from advguard.attacks.randomness import SampleRandom
from advguard.models.base import Classifier, is_white_box


class FGSM(Attack):
    """One gradient step of size ``epsilon``: sign step for Linf, normalized step for L2."""

    name = "fgsm"
    norms = ("linf", "l2")

    def __init__(
        self, *, norm: str | float = "linf", seed: int = 0, allow_large: bool = False
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)

    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        assert is_white_box(model)  # needs_gradients: the base class checked it
        assert epsilon is not None  # not a minimum-norm attack: the base class checked it
        _, _, g = model.value_and_grad(x, losses.for_goal("ce", y, targets))
        return RunResult(x + epsilon * normalize(g, self.norm))
