"""SPSA attack, Uesato, O'Donoghue, van den Oord & Kohli, ICML 2018.

"Adversarial Risk and the Dangers of Evaluating Against Weak Attacks"
(https://arxiv.org/abs/1802.05666), sec. 3 and Algorithm 1. Score-based black-box: the
gradient of the logit-margin loss is estimated by simultaneous perturbation stochastic
approximation (Spall 1992) from ``model.logits`` alone, never from ``value_and_grad``, so the
attack is blind to gradient masking (zero, noisy or reversed gradients):

* per iteration, ``samples`` Rademacher directions ``v`` (entries +-1) are drawn; the
  gradient estimate is ``mean_v (L(x + delta v) - L(x - delta v)) / (2 delta) * v``
  (``2 * samples`` queries per sample and iteration);
* the estimate drives an Adam step of size ``lr`` (the paper's optimiser), followed by the
  projection onto the epsilon ball and the bounds;
* loss to *minimise*: untargeted ``z_y - max_{j != y} z_j``, targeted
  ``max_{j != t} z_j - z_t`` (the paper's margin loss); a sample stops being queried as soon as
  the loss is negative (it is fooled), and unfooled samples return the iterate with the lowest
  loss.

Against a randomized model, give it an :class:`~advguard.models.wrappers.EOTClassifier` so that
every query is averaged over several draws (Athalye et al. 2018, EOT); SPSA's own averaging
over directions also smooths the noise (Uesato et al., sec. 3).

Query accounting: ``AttackResult.queries`` gives the model queries spent per sample (one for
the initial loss, ``2 * samples`` per iteration); with an EOT model each query costs
``samples`` draws of the wrapped model.
"""

from __future__ import annotations

import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.norms import project, random_in_ball
from advguard.attacks.randomness import SampleRandom
from advguard.models.base import Classifier


class SPSA(Attack):
    """SPSA (Uesato et al. 2018): gradient-free Adam on a finite-difference gradient estimate.

    Parameters
    ----------
    steps:
        Iterations (each spends ``2 * samples`` queries per sample).
    samples:
        Rademacher directions per iteration (the paper's batch size is 128 on ImageNet;
        small inputs need fewer).
    delta:
        Finite-difference step (the paper's 0.01).
    lr:
        Adam step size (the paper's 0.01), in input units.
    random_start:
        Start from a uniform random point of the ball instead of the clean input.
    """

    name = "spsa"
    norms = ("linf", "l2")
    needs_gradients = False
    supports_targeted = True
    tracks_queries = True

    def __init__(
        self,
        *,
        norm: str | float = "linf",
        steps: int = 100,
        samples: int = 32,
        delta: float = 0.01,
        lr: float = 0.01,
        random_start: bool = False,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.steps = check.steps("steps", steps, allow_large=allow_large)
        self.samples = check.samples("samples", samples, allow_large=allow_large)
        self.delta = check.number("delta", delta, low=0.0, high=1e3, low_open=True)
        self.lr = check.number("lr", lr, low=0.0, high=1e3, low_open=True)
        self.random_start = check.flag("random_start", random_start)

    @staticmethod
    def _loss(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Margin to minimise: negative once the sample is fooled (or hits the target)."""
        if t is None:
            return -losses.margin(z, y)
        return -losses.margin_targeted(z, t)

    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        assert epsilon is not None  # not a minimum-norm attack: the base class checked it
        lo, hi = model.bounds
        n = len(x)
        shape = x.shape[1:]
        xr = x.clone()
        if self.random_start:
            xr = (x + random_in_ball(x, self.norm, epsilon, rng)).clamp(lo, hi)
        best = xr.clone()
        best_loss = self._loss(model.logits(xr), y, targets)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        m = torch.zeros_like(x)
        v2 = torch.zeros_like(x)
        b1, b2, tiny = 0.9, 0.999, 1e-8
        active = (best_loss >= 0).nonzero().squeeze(1)
        k = self.samples
        for it in range(1, self.steps + 1):
            if len(active) == 0:
                break
            xa, ya = xr[active], y[active]
            ta = None if targets is None else targets[active]
            na = len(active)
            v = rng.subset(active).sign(("step", it), (k, *shape), dtype=x.dtype).to(x.device)
            xp = (xa[:, None] + self.delta * v).flatten(0, 1)
            xm = (xa[:, None] - self.delta * v).flatten(0, 1)
            yr = ya.repeat_interleave(k)
            tr = None if ta is None else ta.repeat_interleave(k)
            lp = self._loss(model.logits(xp), yr, tr).view(na, k)
            lm = self._loss(model.logits(xm), yr, tr).view(na, k)
            queries[active] += 2 * k
            coef = ((lp - lm) / (2 * self.delta)).view(na, k, *([1] * len(shape)))
            g = (coef * v).mean(1)
            m[active] = b1 * m[active] + (1 - b1) * g
            v2[active] = b2 * v2[active] + (1 - b2) * g * g
            mh = m[active] / (1 - b1**it)
            vh = v2[active] / (1 - b2**it)
            step = xa - self.lr * mh / (vh.sqrt() + tiny)
            xa = (x[active] + project(step - x[active], self.norm, epsilon)).clamp(lo, hi)
            xr[active] = xa
            loss = self._loss(model.logits(xa), ya, ta)
            queries[active] += 1
            better = loss < best_loss[active]
            if better.any():
                best[active[better]] = xa[better]
                best_loss[active[better]] = loss[better]
            active = active[best_loss[active] >= 0]
        return RunResult(best, queries=queries, info={"queries_per_iteration": 2 * k})
