"""Projected Gradient Descent, Madry et al. 2018; L1 steps after Tramer & Boneh 2019 (SLIDE)."""

from __future__ import annotations

import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.evasion._gradient import State, gradient_descent
from advguard.attacks.norms import flat, normalize, project, random_in_ball
from advguard.attacks.randomness import SampleRandom
from advguard.models.base import Classifier, WhiteBoxClassifier, is_white_box

_LOSSES = ("ce", "margin")


class PGD(Attack):
    """PGD with random start and restarts, untargeted or targeted, for Linf, L2 and L1.

    Parameters
    ----------
    steps:
        Gradient steps per restart.
    step_size:
        Absolute step size. Default ``rel_step_size * epsilon``.
    rel_step_size:
        Step size relative to epsilon when ``step_size`` is not given
        (default ``2.5 / steps``, Madry et al.'s rule, so the iterate can cross the ball).
    random_start:
        Start from a uniform random point of the ball (recommended).
    restarts:
        Independent random starts; a sample counts as fooled if any restart fools it.
    loss:
        ``"ce"`` (cross-entropy) or ``"margin"`` (Carlini-Wagner logit margin).
    l1_sparsity:
        For L1, the share of coordinates *not* moved per step (SLIDE's percentile q).

    A sample leaves the batch as soon as one iterate fools the model (that iterate
    is returned); the others return the iterate with the highest loss seen.
    """

    name = "pgd"
    norms = ("linf", "l2", "l1")

    def __init__(
        self,
        *,
        norm: str | float = "linf",
        steps: int = 40,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        l1_sparsity: float = 0.95,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.steps = check.steps("steps", steps, allow_large=allow_large)
        self.step_size = None if step_size is None else check.positive("step_size", step_size)
        self.rel_step_size = (
            2.5 / self.steps
            if rel_step_size is None
            else check.positive("rel_step_size", rel_step_size)
        )
        self.random_start = check.flag("random_start", random_start)
        self.restarts = check.restarts("restarts", restarts, allow_large=allow_large)
        self.loss = check.choice("loss", loss, _LOSSES)
        self.l1_sparsity = check.number(
            "l1_sparsity", l1_sparsity, low=0.0, high=1.0, high_open=True
        )

    def _direction(self, g: torch.Tensor, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        if self.norm != "l1":
            return normalize(g, self.norm)
        # SLIDE: move only the coordinates with the largest |gradient| that can still move.
        g = g.clone()
        g[((x <= lo) & (g < 0)) | ((x >= hi) & (g > 0))] = 0
        a = flat(g).abs()
        k = max(1, round((1 - self.l1_sparsity) * a.shape[1]))
        thresh = a.topk(k, dim=1).values[:, -1:]
        d = flat(g).sign() * (a >= thresh).to(g.dtype) * (a > 0).to(g.dtype)
        return normalize(d.view_as(g), "l1")

    def _descend(
        self,
        model: WhiteBoxClassifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float,
        targets: torch.Tensor | None,
        rng: SampleRandom,
        *,
        early_stop: bool,
    ) -> torch.Tensor:
        """The PGD loop on the gradient engine (``early_stop=False``: every step runs)."""
        lo, hi = model.bounds
        alpha = self.step_size if self.step_size is not None else self.rel_step_size * epsilon
        norm = self.norm

        def start(s: State, gen: SampleRandom) -> torch.Tensor:
            x0 = s["x0"]
            if not self.random_start:
                return x0.clone()
            return (x0 + random_in_ball(x0, norm, epsilon, gen)).clamp(lo, hi)

        def step(grad: torch.Tensor, xr: torch.Tensor, s: State) -> torch.Tensor:
            xr = xr + alpha * self._direction(grad, xr, lo, hi)
            return (s["x0"] + project(xr - s["x0"], norm, epsilon)).clamp(lo, hi)

        return gradient_descent(
            model,
            x,
            y,
            targets,
            rng,
            steps=self.steps,
            restarts=self.restarts,
            loss=lambda yy, tt: losses.for_goal(self.loss, yy, tt),
            start=start,
            step=step,
            early_stop=early_stop,
        )

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
        return RunResult(self._descend(model, x, y, epsilon, targets, rng, early_stop=True))
