"""Neural Cleanse: find a backdoor in a trained model from a small clean sample.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao 2019, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P. For every class ``t`` we reverse-engineer the
smallest trigger that sends clean inputs to ``t``:

    x' = (1 - m) * x + m * p,   m = (tanh(a) + 1) / 2 in [0, 1]^{H x W},
                                p = lo + (hi - lo) (tanh(b) + 1) / 2 in the input bounds,
    minimise  CE(f(x'), t) + lambda * |m|_1     with Adam over (a, b).

``lambda`` follows the paper's schedule: it starts at ``init_cost``; once the reversed trigger
reaches ``success_threshold`` attack success it is multiplied by ``cost_up`` after every
``patience`` successful steps and divided by ``cost_down`` after every ``patience`` failing
ones. The smallest-L1 mask that reached the success threshold is kept (the final one if none
did, marked ``reached=False``). A backdoored class needs a much smaller mask than the others:
with ``l_c`` the L1 norms, ``median`` their median and ``MAD = 1.4826 * median(|l - median|)``
(consistent for a normal distribution), the anomaly index is ``|l_c - median| / MAD``; classes
with index above 2 *and* a norm below the median are flagged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.errors import InputError
from advguard.models.base import WhiteBoxClassifier

MAD_CONSTANT = 1.4826


@dataclass
class ReversedTrigger:
    target: int
    mask: np.ndarray  # (H, W) in [0, 1]
    pattern: np.ndarray  # (C, H, W) in the input bounds
    l1: float
    success: float
    reached: bool
    steps: int


@dataclass
class NeuralCleanseResult:
    triggers: list[ReversedTrigger]
    l1_norms: np.ndarray
    anomaly_index: np.ndarray
    flagged: list[int]
    median: float
    mad: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def backdoored(self) -> bool:
        return bool(self.flagged)

    def summary(self) -> dict[str, Any]:
        return {
            "backdoored": self.backdoored,
            "flagged_classes": self.flagged,
            "median_l1": self.median,
            "mad": self.mad,
            "classes": [
                {
                    "class": t.target,
                    "mask_l1": t.l1,
                    "anomaly_index": float(self.anomaly_index[t.target]),
                    "trigger_success": t.success,
                    "reached_success_threshold": t.reached,
                    "steps": t.steps,
                    "flagged": t.target in self.flagged,
                }
                for t in self.triggers
            ],
            "params": self.params,
        }


def anomaly_index(norms: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``|l - median| / (1.4826 * MAD)`` per class, the median and the scaled MAD."""
    v = np.asarray(norms, dtype=np.float64)
    med = float(np.median(v))
    mad = MAD_CONSTANT * float(np.median(np.abs(v - med)))
    if mad <= 0:
        return np.zeros_like(v), med, mad
    return np.abs(v - med) / mad, med, mad


def reverse_trigger(
    model: WhiteBoxClassifier,
    x: torch.Tensor,
    target: int,
    *,
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 128,
    init_cost: float = 1e-3,
    success_threshold: float = 0.99,
    patience: int = 5,
    cost_up: float = 1.5,
    cost_down: float = 1.5**1.5,
    seed: int = 0,
) -> ReversedTrigger:
    """Optimise a mask and pattern sending ``x`` to ``target`` (module docstring)."""
    module_fwd = model.forward
    dev = getattr(model, "device", torch.device("cpu"))  # the trigger is optimised on the CPU
    lo, hi = (float(b) for b in model.bounds)
    _, c, h, w = x.shape
    g = torch.Generator().manual_seed(seed + 7919 * target)
    a = (torch.randn(1, 1, h, w, generator=g) * 0.1 - 2.0).requires_grad_(True)
    b = (torch.randn(1, c, h, w, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr, betas=(0.5, 0.9))
    cost = init_cost
    up = down = 0
    best: tuple[float, np.ndarray, np.ndarray, float] | None = None
    yt = torch.full((len(x),), target, dtype=torch.long)
    succ = 0.0
    m = p = None
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch_size]
        m = (torch.tanh(a) + 1) / 2
        p = lo + (hi - lo) * (torch.tanh(b) + 1) / 2
        xa = (1 - m) * x[idx] + m * p
        logits = module_fwd(xa.to(dev)).cpu()
        ce = nn.functional.cross_entropy(logits, yt[idx])
        l1 = m.sum()
        l1_value = float(l1.detach())
        loss = ce + cost * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        succ = float((logits.argmax(1) == target).float().mean())
        if succ >= success_threshold:
            if best is None or l1_value < best[0]:
                best = (l1_value, m.detach()[0, 0].numpy().copy(), p.detach()[0].numpy().copy(),
                        succ)  # fmt: skip
            up, down = up + 1, 0
            if up >= patience:
                cost, up = cost * cost_up, 0
        else:
            down, up = down + 1, 0
            if down >= patience:
                cost, down = cost / cost_down, 0
    if best is not None:
        return ReversedTrigger(target, best[1], best[2], best[0], best[3], True, steps)
    assert m is not None and p is not None
    mk = m.detach()[0, 0].numpy().copy()
    return ReversedTrigger(target, mk, p.detach()[0].numpy().copy(), float(mk.sum()), succ, False,
                           steps)  # fmt: skip


def neural_cleanse(
    model: WhiteBoxClassifier,
    x_clean: np.ndarray,
    y_clean: np.ndarray | None = None,
    *,
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 128,
    init_cost: float = 1e-3,
    threshold: float = 2.0,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> NeuralCleanseResult:
    """Reverse-engineer a trigger per class and flag the anomalously small ones.

    ``model`` is a white-box image classifier (TorchClassifier); ``x_clean`` a small clean sample
    ``(N, C, H, W)`` (tens to hundreds of inputs). When ``y_clean`` is given, inputs of class
    ``t`` are left out when reversing ``t``'s trigger.
    """
    if not hasattr(model, "forward") or not hasattr(model, "bounds"):
        raise InputError(f"Neural Cleanse needs a white-box torch classifier, got {type(model)}")
    x = torch.as_tensor(np.asarray(x_clean, dtype=np.float32))
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.input_shape):
        raise InputError(
            f"Neural Cleanse needs images (N, C, H, W) of the model's shape {model.input_shape}, "
            f"got {tuple(x.shape)}"
        )
    if len(x) < 2 or not torch.isfinite(x).all():
        raise InputError("Neural Cleanse needs at least 2 finite clean inputs")
    if steps < 1 or lr <= 0 or batch_size < 1 or threshold <= 0:
        raise InputError("steps, lr, batch_size and threshold must be positive")
    y = None if y_clean is None else np.asarray(y_clean).astype(np.int64)
    if y is not None and len(y) != len(x):
        raise InputError(f"need one label per clean input, got {len(y)} for {len(x)}")
    k = int(model.num_classes)
    triggers = []
    for t in range(k):
        xs = x if y is None else x[torch.as_tensor(y != t)]
        if len(xs) == 0:
            raise InputError(f"no clean inputs outside class {t}")
        with torch.enable_grad():
            triggers.append(
                reverse_trigger(
                    model,
                    xs,
                    t,
                    steps=steps,
                    lr=lr,
                    batch_size=batch_size,
                    init_cost=init_cost,
                    seed=seed,
                )
            )
        if progress is not None:
            progress("neural-cleanse", t + 1, k)
    norms = np.array([tr.l1 for tr in triggers])
    ai, med, mad = anomaly_index(norms)
    flagged = [int(i) for i in np.flatnonzero((ai > threshold) & (norms < med))]
    params = {"steps": steps, "lr": lr, "batch_size": batch_size, "init_cost": init_cost,
              "threshold": threshold, "seed": seed, "n_clean": len(x)}  # fmt: skip
    return NeuralCleanseResult(triggers, norms, ai, flagged, med, mad, params)
