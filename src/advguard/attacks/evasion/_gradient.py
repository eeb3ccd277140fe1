"""One gradient-attack engine for PGD-style loops (in the spirit of Foolbox's
``gradient_descent_base.py``).

The loop is always the same: start (possibly at random) inside the ball, then repeat
"loss and gradient at the iterate, step, project"; keep per sample the best point seen.
What differs between PGD (Madry et al. 2018), its full-step variant for transfer attacks,
constrained tabular PGD and the adversarial trainer's inner maximisations are the hooks:

* ``loss(y, targets) -> loss_fn``: the per-sample loss to maximise on a subset;
* ``start(state, rng) -> x``: the first iterate of a restart (random start); ``rng`` is the
  restart's per-sample stream (a :class:`SampleRandom` aligned with the state's samples),
  or the caller's ``torch.Generator`` (the adversarial trainer);
* ``step(grad, x, state) -> x``: the next iterate (direction, step size, projection and
  any repair, e.g. into schema-valid rows);
* ``early_stop``: a sample leaves the loop at its first iterate that fools the model
  (that iterate is returned),
  and per sample the iterate with the highest loss seen is kept (fooling iterates
  first); otherwise every step runs and the final iterate of the restart with the
  highest loss is kept (transfer attacks: the first fooling iterate transfers poorly);
* ``final_eval``: whether the last iterate is evaluated (one forward pass) at all; without
  it the last iterate of the single restart is returned as is (the trainer's use).

``state`` is a dict of per-sample tensors (``x0``, ``y``, ``t`` and whatever the hooks
add); the engine keeps it aligned with the samples still running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from advguard.attacks.losses import LossFn
from advguard.attacks.randomness import SampleRandom

State = dict[str, Any]
Rng = SampleRandom | torch.Generator
LossHook = Callable[[torch.Tensor, "torch.Tensor | None"], LossFn]
StartHook = Callable[[State, Any], torch.Tensor]  # the rng: what the caller passed (Rng)
StepHook = Callable[[torch.Tensor, torch.Tensor, State], torch.Tensor]


class GradientModel(Protocol):
    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...


def _subset(state: State, keep: torch.Tensor) -> State:
    return {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def gradient_descent(
    model: GradientModel,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor | None,
    rng: Rng,
    *,
    steps: int,
    loss: LossHook,
    step: StepHook,
    start: StartHook | None = None,
    restarts: int = 1,
    early_stop: bool = True,
    final_eval: bool = True,
    state: State | None = None,
) -> torch.Tensor:
    """Run the loop on ``x`` and return one adversarial candidate per sample.

    ``state`` holds extra per-sample tensors (aligned with ``x``) the hooks need.
    """
    if not final_eval and (restarts != 1 or early_stop):
        raise ValueError("final_eval=False needs one restart and no early stop")
    extra = state or {}
    best = x.clone()
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    for r in range(restarts):
        idx = (~done).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        full = len(idx) == len(x)
        s: State = {
            "x0": x if full else x[idx],
            "y": y if full else y[idx],
            "t": None if targets is None else (targets if full else targets[idx]),
        }
        for key, v in extra.items():
            s[key] = v if full or not isinstance(v, torch.Tensor) else v[idx]
        if start is not None:
            sub = rng.subset(idx).fork("restart", r) if isinstance(rng, SampleRandom) else rng
            xr = start(s, sub)
        else:
            xr = s["x0"].clone()
        for k in range(steps + 1):
            loss_fn = loss(s["y"], s["t"])
            last = k == steps
            if not last:
                logits, lv, grad = model.value_and_grad(xr, loss_fn)
            elif final_eval:
                logits = model.logits(xr)
                lv = loss_fn(logits)
            else:
                return xr
            if early_stop:
                pred = logits.argmax(1)
                fooled = (pred == s["t"]) if s["t"] is not None else (pred != s["y"])
                better = (lv > best_loss[idx]) | fooled
                if better.any():
                    best[idx[better]] = xr[better]
                    best_loss[idx[better]] = torch.where(
                        fooled[better], torch.full_like(lv[better], float("inf")), lv[better]
                    )
                if fooled.any():
                    done[idx[fooled]] = True
                    kept = ~fooled
                    idx, xr, s = idx[kept], xr[kept], _subset(s, kept)
                    if not last:
                        grad = grad[kept]
                if len(idx) == 0 or last:
                    break
            elif last:
                better = lv > best_loss[idx]
                best[idx[better]] = xr[better]
                best_loss[idx[better]] = lv[better]
                break
            xr = step(grad, xr, s)
    return best
