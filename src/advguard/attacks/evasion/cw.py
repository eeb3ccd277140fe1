"""Carlini & Wagner L2 attack, Carlini & Wagner 2017 ("Towards Evaluating the Robustness...")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        w0 = torch.atanh(((x - lo) / half - 1.0).clamp(-_TANH_CLAMP, _TANH_CLAMP))
        const = torch.full((n,), self.initial_const, device=dev)
        lower = torch.zeros(n, device=dev)
        upper = torch.full((n,), _UPPER_INIT, device=dev)
        best = _Best(torch.full((n,), float("inf"), device=dev), x.clone())
        for bs in range(self.binary_search_steps):
            # the last search step uses the upper bound, as in the reference implementation
            if self.binary_search_steps >= 10 and bs == self.binary_search_steps - 1:
                const = torch.where(upper < _UPPER_INIT, upper, const)
            succeeded = self._search_step(model, x, y, targets, w0, const, best)
            # per-sample binary search over c
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            bounded = upper < _UPPER_INIT * 0.1
            const = torch.where(bounded, (lower + upper) / 2.0, const * 10.0)
        # samples never fooled: the original input (best.adv was initialised with it)
        return RunResult(best.adv)

    def _search_step(
        self,
        model: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        w0: torch.Tensor,
        const: torch.Tensor,
        best: _Best,
    ) -> torch.Tensor:
        """Adam in tanh-space for one value of ``c`` per sample; updates ``best`` in place and
        returns which samples were fooled (with the required confidence) at some iterate.

        The samples still optimising form a dense working set (no gather/scatter per step);
        it shrinks only at the abort-early checks, every ``steps // 10`` iterations. The
        per-step work is tensor ops only: no host synchronisation outside those checks."""
        lo, hi = model.bounds
        half = (hi - lo) / 2.0
        ws = _WorkingSet.start(x, y, targets, w0, const, best)
        check_every = max(1, self.steps // 10)
        b1, b2, adam_eps = 0.9, 0.999, 1e-8
        for step in range(self.steps + 1):
            th = torch.tanh(ws.w)
            xa = (lo + half * (th + 1.0)).clamp(lo, hi)
            loss_fn = ws.loss_fn(self._f)
            if step < self.steps:
                # value_and_grad maximises nothing here: it returns d(c * f)/dx'
                z, f_c, g_f = model.value_and_grad(xa, loss_fn)
            else:  # only check the last iterate
                z = model.logits(xa)
                f_c = loss_fn(z)
            diff = xa - ws.x0
            l2sq = flat(diff).pow(2).sum(1)
            ws.keep_best(xa, l2sq, self._fooled(z, ws.y, ws.t))
            if step == self.steps:
                break
            loss = l2sq + f_c
            if self.abort_early and step > 0 and step % check_every == 0:
                stalled = loss > ws.prev - 1e-4 * ws.prev.abs()
                ws.prev = loss
                if bool(stalled.any()):
                    keep = ~stalled
                    ws.flush(best)
                    ws = ws.subset(keep)
                    th, diff, g_f = th[keep], diff[keep], g_f[keep]
                    if len(ws.idx) == 0:
                        break
            elif step == 0:
                ws.prev = loss
            # gradient of the loss w.r.t. w: chain rule through the tanh box
            g_x = 2.0 * diff + g_f
            g_w = g_x * half * (1.0 - th.pow(2))
            t_adam = step + 1
            ws.m = b1 * ws.m + (1 - b1) * g_w
            ws.v = b2 * ws.v + (1 - b2) * g_w.pow(2)
            m_hat = ws.m / (1 - b1**t_adam)
            v_hat = ws.v / (1 - b2**t_adam)
            ws.w = ws.w - self.learning_rate * m_hat / (v_hat.sqrt() + adam_eps)
        ws.flush(best)
        return best.succeeded


@dataclass
class _Best:
    """Per sample of the whole batch: the smallest successful L2 and its input so far."""

    l2: torch.Tensor
    adv: torch.Tensor
    succeeded: torch.Tensor = field(init=False)  # in the current search step

    def __post_init__(self) -> None:
        self.succeeded = torch.zeros(len(self.l2), dtype=torch.bool, device=self.l2.device)


@dataclass
class _WorkingSet:
    """The samples still optimising for the current ``c``, as dense tensors (positions
    ``idx`` in the batch): inputs, labels, targets, constants, Adam state and the best
    results found, which :meth:`flush` writes back into the batch-wide :class:`_Best`."""

    idx: torch.Tensor
    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor | None
    c: torch.Tensor
    w: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    best_l2: torch.Tensor
    best_adv: torch.Tensor
    succeeded: torch.Tensor
    prev: torch.Tensor

    @classmethod
    def start(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None,
        w0: torch.Tensor,
        const: torch.Tensor,
        best: _Best,
    ) -> _WorkingSet:
        n = len(x)
        best.succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
        return cls(
            idx=torch.arange(n, device=x.device),
            x0=x,
            y=y,
            t=t,
            c=const,
            w=w0.clone(),
            m=torch.zeros_like(w0),
            v=torch.zeros_like(w0),
            best_l2=best.l2.clone(),
            best_adv=best.adv.clone(),
            succeeded=best.succeeded.clone(),
            prev=torch.full((n,), float("inf"), device=x.device),
        )

    def loss_fn(self, f: Any) -> Any:
        """``z -> c * f(z)`` for the samples of this set."""
        c, y, t = self.c, self.y, self.t
        return lambda z: c * f(z, y, t)

    def keep_best(self, xa: torch.Tensor, l2sq: torch.Tensor, ok: torch.Tensor) -> None:
        """Remember the iterates ``xa`` that fool the model with a smaller L2 than before."""
        self.succeeded |= ok
        l2 = l2sq.sqrt()
        better = ok & (l2 < self.best_l2)
        self.best_l2 = torch.where(better, l2, self.best_l2)
        mask = better.view(-1, *([1] * (xa.dim() - 1)))
        self.best_adv = torch.where(mask, xa.detach(), self.best_adv)

    def flush(self, best: _Best) -> None:
        """Write this set's results back into the batch-wide ``best``."""
        best.l2[self.idx] = self.best_l2
        best.adv[self.idx] = self.best_adv
        best.succeeded[self.idx] = self.succeeded

    def subset(self, keep: torch.Tensor) -> _WorkingSet:
        """The set without the samples where ``keep`` is False."""
        return _WorkingSet(
            idx=self.idx[keep],
            x0=self.x0[keep],
            y=self.y[keep],
            t=None if self.t is None else self.t[keep],
            c=self.c[keep],
            w=self.w[keep],
            m=self.m[keep],
            v=self.v[keep],
            best_l2=self.best_l2[keep],
            best_adv=self.best_adv[keep],
            succeeded=self.succeeded[keep],
            prev=self.prev[keep],
        )
