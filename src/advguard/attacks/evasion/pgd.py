"""Projected Gradient Descent, Madry et al. 2018; L1 steps after Tramer & Boneh 2019 (SLIDE)."""

from __future__ import annotations

import torch

from advguard.attacks import losses
from advguard.attacks.base import Attack
from advguard.attacks.norms import flat, normalize, project, random_in_ball
from advguard.errors import InputError

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
    ) -> None:
        super().__init__(norm=norm, seed=seed)
        if int(steps) < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise InputError(f"restarts must be >= 1, got {restarts}")
        if step_size is not None and not step_size > 0:
            raise InputError(f"step_size must be > 0, got {step_size}")
        if rel_step_size is not None and not rel_step_size > 0:
            raise InputError(f"rel_step_size must be > 0, got {rel_step_size}")
        if loss not in _LOSSES:
            raise InputError(f"unknown loss {loss!r}; use one of {', '.join(_LOSSES)}")
        if not 0.0 <= l1_sparsity < 1.0:
            raise InputError(f"l1_sparsity must be in [0, 1), got {l1_sparsity}")
        self.steps = int(steps)
        self.step_size = step_size
        self.rel_step_size = rel_step_size if rel_step_size is not None else 2.5 / self.steps
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss
        self.l1_sparsity = float(l1_sparsity)

    def _loss_fn(self, y: torch.Tensor, t: torch.Tensor | None):
        if self.loss == "ce":
            return (
                (lambda z: losses.ce(z, y)) if t is None else (lambda z: losses.ce_targeted(z, t))
            )
        return (
            (lambda z: losses.margin(z, y))
            if t is None
            else (lambda z: losses.margin_targeted(z, t))
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

    def _run(self, model, x, y, epsilon, targets, generator) -> torch.Tensor:  # type: ignore[override]
        lo, hi = model.bounds
        alpha = self.step_size if self.step_size is not None else self.rel_step_size * epsilon
        best = x.clone()
        best_loss = torch.full((len(x),), float("-inf"), device=x.device)
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)

        for _ in range(self.restarts):
            idx = (~done).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x0, y0 = x[idx], y[idx]
            t0 = None if targets is None else targets[idx]
            xr = x0.clone()
            if self.random_start:
                xr = (x0 + random_in_ball(x0, self.norm, epsilon, generator)).clamp(lo, hi)
            for step in range(self.steps + 1):
                loss_fn = self._loss_fn(y0, t0)
                if step < self.steps:
                    logits, loss, grad = model.value_and_grad(xr, loss_fn)
                else:
                    logits = model.logits(xr)
                    loss = loss_fn(logits)
                fooled = (logits.argmax(1) == t0) if t0 is not None else (logits.argmax(1) != y0)
                better = (loss > best_loss[idx]) | fooled
                if better.any():
                    best[idx[better]] = xr[better]
                    best_loss[idx[better]] = torch.where(
                        fooled[better], torch.full_like(loss[better], float("inf")), loss[better]
                    )
                if fooled.any():
                    done[idx[fooled]] = True
                    keep = ~fooled
                    idx, x0, y0, xr = idx[keep], x0[keep], y0[keep], xr[keep]
                    t0 = None if t0 is None else t0[keep]
                    if step < self.steps:
                        grad = grad[keep]
                if len(idx) == 0 or step == self.steps:
                    break
                xr = xr + alpha * self._direction(grad, xr, lo, hi)
                xr = (x0 + project(xr - x0, self.norm, epsilon)).clamp(lo, hi)
        return best
