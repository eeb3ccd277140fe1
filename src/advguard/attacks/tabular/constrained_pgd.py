"""PGD for tabular models under feature constraints (immutable, monotone, integer,
one-hot, linear relations), in the spirit of Simonetto et al. 2022 (CPGD / MoEvA2)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from advguard.attacks import losses
from advguard.attacks.base import Attack, AttackResult
from advguard.attacks.norms import normalize, project, random_in_ball
from advguard.attacks.tabular._common import check_model, enforce_schema, schema_params
from advguard.attacks.tabular.schema import FeatureSchema, load_schema
from advguard.errors import InputError

_LOSSES = ("ce", "margin")


class ConstrainedPGD(Attack):
    """White-box PGD whose every returned row is valid under a :class:`FeatureSchema`.

    The attack keeps a *relaxed* iterate that moves along the loss gradient (masked so
    immutable features never move and monotone features never move the wrong way),
    projected onto the epsilon ball, the bounds and the monotone half-spaces. After every
    step it is repaired into a feasible row (:meth:`FeatureSchema.repair`: integer and step
    rounding, one-hot argmax, linear relations, ball); the loss and the gradient are taken
    at that feasible row and the best feasible row is kept. Discrete features can thus
    change once the relaxed iterate has moved far enough.

    Parameters
    ----------
    schema:
        A :class:`FeatureSchema`, the path of a YAML schema, or a mapping (inline YAML).
    norm:
        ``"linf"`` or ``"l2"``; epsilon is in the model's raw input units.
    steps, step_size, rel_step_size, random_start, restarts, loss, seed:
        As in :class:`~advguard.attacks.evasion.pgd.PGD` (``loss``: ``"ce"`` or ``"margin"``).

    Every returned row is valid: a sample that is not fooled gets the valid iterate with
    the highest loss (or its original), and counts as a failure. ``result.info`` holds
    ``schema_valid`` (rows valid, always all of them) and ``reverted_after_clip`` (rows
    the base class's final clip broke, reverted; normally 0).
    """

    name = "constrained-pgd"
    norms = ("linf", "l2")

    def __init__(
        self,
        schema: FeatureSchema | str | os.PathLike | Mapping[str, Any],
        *,
        norm: str | float = "linf",
        steps: int = 50,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        seed: int = 0,
    ) -> None:
        super().__init__(norm=norm, seed=seed)
        self.schema = load_schema(schema)
        if isinstance(steps, bool) or int(steps) < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        if isinstance(restarts, bool) or int(restarts) < 1:
            raise InputError(f"restarts must be >= 1, got {restarts}")
        if step_size is not None and not step_size > 0:
            raise InputError(f"step_size must be > 0, got {step_size}")
        if rel_step_size is not None and not rel_step_size > 0:
            raise InputError(f"rel_step_size must be > 0, got {rel_step_size}")
        if loss not in _LOSSES:
            raise InputError(f"unknown loss {loss!r}; use one of {', '.join(_LOSSES)}")
        self.steps = int(steps)
        self.step_size = step_size
        self.rel_step_size = rel_step_size if rel_step_size is not None else 2.5 / self.steps
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["schema"] = schema_params(self.schema)
        return p

    def __call__(  # type: ignore[override]
        self,
        model: Any,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        *,
        epsilon: float | None = None,
        targets: torch.Tensor | np.ndarray | None = None,
    ) -> AttackResult:
        check_model(self.schema, model, self.name)
        result = super().__call__(model, x, y, epsilon=epsilon, targets=targets)
        return enforce_schema(self.schema, x, result, self._check_epsilon(epsilon), self.norm)

    # ------------------------------------------------------------------ internals
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

    def _run(self, model, x, y, epsilon, targets, generator) -> torch.Tensor:  # type: ignore[override]
        schema = self.schema
        c = schema.compiled
        dev, dt = x.device, x.dtype
        clip = model.bounds
        lo_np, hi_np = schema._effective_bounds(x.detach().cpu().double().numpy(), clip)
        lo_all = torch.as_tensor(lo_np, dtype=dt, device=dev)
        hi_all = torch.as_tensor(hi_np, dtype=dt, device=dev)
        imm = torch.as_tensor(c.immutable, device=dev)
        inc = torch.as_tensor(c.mono > 0, device=dev)
        dec = torch.as_tensor(c.mono < 0, device=dev)
        alpha = self.step_size if self.step_size is not None else self.rel_step_size * epsilon

        def relax_project(z, x0, lo, hi):
            z = x0 + project(z - x0, self.norm, epsilon)
            z = torch.maximum(torch.minimum(z, hi), lo)
            z = torch.where(inc, torch.maximum(z, x0), z)
            z = torch.where(dec, torch.minimum(z, x0), z)
            return torch.where(imm, x0, z)

        def feasible(z, x0):
            rep, _ = schema.repair(x0, z, epsilon=epsilon, norm=self.norm, clip=clip)
            return rep

        best = x.clone()
        best_loss = torch.full((len(x),), float("-inf"), device=dev)
        done = torch.zeros(len(x), dtype=torch.bool, device=dev)

        for _ in range(self.restarts):
            idx = (~done).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x0, y0 = x[idx], y[idx]
            lo, hi = lo_all[idx], hi_all[idx]
            t0 = None if targets is None else targets[idx]
            z = x0.clone()
            if self.random_start:
                r = random_in_ball(x0, self.norm, epsilon, generator)
                r = torch.where(inc, r.abs(), torch.where(dec, -r.abs(), r))
                z = relax_project(x0 + r, x0, lo, hi)
            xr = feasible(z, x0)
            for step in range(self.steps + 1):
                loss_fn = self._loss_fn(y0, t0)
                if step < self.steps:
                    logits, loss, grad = model.value_and_grad(xr, loss_fn)
                else:
                    logits = model.logits(xr)
                    loss = loss_fn(logits)
                pred = logits.argmax(1)
                fooled = (pred == t0) if t0 is not None else (pred != y0)
                better = (loss > best_loss[idx]) | fooled
                if better.any():
                    best[idx[better]] = xr[better]
                    best_loss[idx[better]] = torch.where(
                        fooled[better], torch.full_like(loss[better], float("inf")), loss[better]
                    )
                if fooled.any():
                    done[idx[fooled]] = True
                    keep = ~fooled
                    idx, x0, y0, xr, z = idx[keep], x0[keep], y0[keep], xr[keep], z[keep]
                    lo, hi = lo[keep], hi[keep]
                    t0 = None if t0 is None else t0[keep]
                    if step < self.steps:
                        grad = grad[keep]
                if len(idx) == 0 or step == self.steps:
                    break
                g = torch.where(imm, torch.zeros_like(grad), grad)
                # monotone: never push further into the forbidden side of the original
                g = torch.where(inc & (g < 0) & (z <= x0), torch.zeros_like(g), g)
                g = torch.where(dec & (g > 0) & (z >= x0), torch.zeros_like(g), g)
                z = relax_project(z + alpha * normalize(g, self.norm), x0, lo, hi)
                xr = feasible(z, x0)
        return best
