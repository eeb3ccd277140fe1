"""Carlini & Wagner L2 attack, Carlini & Wagner 2017 ("Towards Evaluating the Robustness...")."""

from __future__ import annotations

import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.norms import flat
from advguard.attacks.randomness import SampleRandom
from advguard.models.base import Classifier, is_white_box

_UPPER_INIT = 1e10  # "no upper bound on c found yet"
_TANH_CLAMP = 1.0 - 1e-6  # keeps atanh finite for inputs exactly on the bounds


class CarliniWagnerL2(Attack):
    """Minimum-L2 attack of Carlini & Wagner, untargeted or targeted.

    Optimises ``w`` with ``x' = lo + (hi - lo) * (tanh(w) + 1) / 2`` (so ``x'`` always lies in
    the model's ``bounds``) to minimise ``||x' - x||_2^2 + c * f(x')`` with Adam, where
    ``f(x') = max(Z_y - max_{j != y} Z_j, -confidence)`` (untargeted) or
    ``f(x') = max(max_{j != t} Z_j - Z_t, -confidence)`` (targeted) on the logits ``Z``.
    The constant ``c`` is found per sample by binary search: it is multiplied by 10 while no
    upper bound (a ``c`` that succeeds) is known, then bisected.

    Parameters
    ----------
    confidence:
        Margin ``kappa`` by which the adversarial class must win (0: just cross the boundary).
    steps:
        Adam iterations per binary-search step.
    binary_search_steps:
        Number of values of ``c`` tried per sample.
    initial_const:
        First value of ``c``.
    learning_rate:
        Adam step size (in ``w``-space). The default 0.05 (not the paper's 0.01, which
        assumes 10,000 steps) lets 100 steps per ``c`` move pixels that sit on a bound.
    abort_early:
        Stop a sample's optimisation for the current ``c`` once its loss has not decreased
        by 0.01 % over the last ``steps // 10`` iterations.

    Returns the successful input with the smallest L2 perturbation found for each sample;
    samples never fooled (with the required confidence) are returned **unchanged** (the
    original input), so ``result.raw`` equals the input exactly where the attack failed.
    """

    name = "cw-l2"
    norms = ("l2",)
    minimum_norm = True
    supports_targeted = True

    def __init__(
        self,
        *,
        norm: str | float = "l2",
        confidence: float = 0.0,
        steps: int = 100,
        binary_search_steps: int = 9,
        initial_const: float = 1e-2,
        learning_rate: float = 0.05,
        abort_early: bool = True,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.confidence = check.non_negative("confidence", confidence)
        self.steps = check.steps("steps", steps, allow_large=allow_large)
        self.binary_search_steps = check.integer(
            "binary_search_steps", binary_search_steps, low=1, high=100
        )
        self.initial_const = check.positive("initial_const", initial_const)
        self.learning_rate = check.positive("learning_rate", learning_rate)
        self.abort_early = check.flag("abort_early", abort_early)

    # f(x') of the paper, to be minimised (the attack succeeds once it reaches -confidence)
    def _f(self, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        gain = losses.margin(z, y) if t is None else losses.margin_targeted(z, t)
        return (-gain).clamp_min(-self.confidence)

    def _fooled(self, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if t is None:
            hit = z.argmax(1) != y
            gain = losses.margin(z, y)
        else:
            hit = z.argmax(1) == t
            gain = losses.margin_targeted(z, t)
        return hit & (gain >= self.confidence)

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
        lo, hi = model.bounds
        half = (hi - lo) / 2.0
        n, dev = len(x), x.device

        def to_x(w: torch.Tensor) -> torch.Tensor:
            return (lo + half * (torch.tanh(w) + 1.0)).clamp(lo, hi)

        w0 = torch.atanh(((x - lo) / half - 1.0).clamp(-_TANH_CLAMP, _TANH_CLAMP))

        const = torch.full((n,), self.initial_const, device=dev)
        lower = torch.zeros(n, device=dev)
        upper = torch.full((n,), _UPPER_INIT, device=dev)
        best_l2 = torch.full((n,), float("inf"), device=dev)
        best_adv = x.clone()
        check_every = max(1, self.steps // 10)
        b1, b2, adam_eps = 0.9, 0.999, 1e-8

        for bs in range(self.binary_search_steps):
            # the last search step uses the upper bound, as in the reference implementation
            if self.binary_search_steps >= 10 and bs == self.binary_search_steps - 1:
                const = torch.where(upper < _UPPER_INIT, upper, const)
            w = w0.clone()
            m = torch.zeros_like(w)
            v = torch.zeros_like(w)
            succeeded = torch.zeros(n, dtype=torch.bool, device=dev)
            prev = torch.full((n,), float("inf"), device=dev)
            running = torch.ones(n, dtype=torch.bool, device=dev)

            for step in range(self.steps + 1):
                idx = running.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                yi, ti = y[idx], None if targets is None else targets[idx]
                xa = to_x(w[idx])
                c = const[idx]
                if step < self.steps:
                    # value_and_grad maximises nothing here: it returns d(c * f)/dx'
                    z, f_c, g_f = model.value_and_grad(
                        xa, lambda z, c=c, yi=yi, ti=ti: c * self._f(z, yi, ti)
                    )
                else:  # only check the last iterate
                    z = model.logits(xa)
                    f_c = c * self._f(z, yi, ti)
                diff = xa - x[idx]
                l2sq = flat(diff).pow(2).sum(1)
                loss = l2sq + f_c

                # keep the smallest successful perturbation
                ok = self._fooled(z, yi, ti)
                succeeded[idx[ok]] = True
                l2 = l2sq.sqrt()
                better = ok & (l2 < best_l2[idx])
                if better.any():
                    best_l2[idx[better]] = l2[better]
                    best_adv[idx[better]] = xa[better].detach()
                if step == self.steps:
                    break

                if self.abort_early and step > 0 and step % check_every == 0:
                    stalled = loss > prev[idx] - 1e-4 * prev[idx].abs()
                    prev[idx] = loss
                    if stalled.any():
                        running[idx[stalled]] = False
                        keep = ~stalled
                        idx, xa, diff, g_f = idx[keep], xa[keep], diff[keep], g_f[keep]
                        if len(idx) == 0:
                            break
                elif step == 0:
                    prev[idx] = loss

                # gradient of the loss w.r.t. w: chain rule through the tanh box
                g_x = 2.0 * diff + g_f
                g_w = g_x * half * (1.0 - torch.tanh(w[idx]).pow(2))
                t_adam = step + 1
                m[idx] = b1 * m[idx] + (1 - b1) * g_w
                v[idx] = b2 * v[idx] + (1 - b2) * g_w.pow(2)
                m_hat = m[idx] / (1 - b1**t_adam)
                v_hat = v[idx] / (1 - b2**t_adam)
                w[idx] = w[idx] - self.learning_rate * m_hat / (v_hat.sqrt() + adam_eps)

            # per-sample binary search over c
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            bounded = upper < _UPPER_INIT * 0.1
            const = torch.where(bounded, (lower + upper) / 2.0, const * 10.0)

        # samples never fooled: the original input (best_adv was initialised with it)
        return RunResult(best_adv)
