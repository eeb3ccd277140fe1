"""Clean-label poisoning by feature collision (Shafahi, Huang, Najibi, Suciu, Studer, Dumitras,
Goldstein 2018, "Poison Frogs! Targeted Clean-Label Poisoning Attacks on Neural Networks",
NeurIPS).

The attacker wants one chosen test input ``t`` classified as ``base_class`` without
mislabelling anything: it takes images ``b`` of ``base_class`` and moves each towards ``t`` in
feature space while staying close to ``b`` in input space,

    p = argmin_x  |f(x) - f(t)|^2 + beta |x - b|^2,

with the paper's forward-backward splitting (Algorithm 1): a gradient step on the feature term,
then the proximal step ``x = (x_hat + lr * beta * b) / (1 + lr * beta)`` of the input term,
clipped to the bounds. ``f`` is the penultimate representation of a model the attacker has (the
victim's feature extractor in the paper's transfer-learning setting). ``opacity`` blends a
share of ``t`` into each base first (the paper's "watermarking", needed when the victim trains
end to end). The poisons keep their correct label ``base_class``; they are appended to the
training set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.attacks.poisoning.simulate import PoisonManifest, PoisonResult, check_xy
from advguard.errors import InputError


def _features(model: Any) -> Any:
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        raise InputError(f"feature collision needs a torch model, got {type(model).__name__}")
    heads = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise InputError("feature collision needs a network ending in an nn.Linear layer")
    head = heads[-1]

    def feats(x: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor] = []
        h = head.register_forward_pre_hook(lambda _m, i: out.append(i[0]))
        try:
            model.forward(x)
        finally:
            h.remove()
        return out[0].flatten(1)

    return feats


def feature_collision(
    model: Any,
    x_target: np.ndarray,
    x_base: np.ndarray,
    *,
    beta: float = 0.1,
    lr: float = 0.01,
    steps: int = 500,
    opacity: float = 0.0,
) -> np.ndarray:
    """Poisons ``(k, C, H, W)`` made from the ``k`` bases ``x_base`` to collide with the single
    input ``x_target`` (module docstring)."""
    feats = _features(model)
    lo, hi = (float(v) for v in model.bounds)
    t = torch.as_tensor(np.asarray(x_target, dtype=np.float32))
    b = torch.as_tensor(np.asarray(x_base, dtype=np.float32))
    if t.shape != b.shape[1:] or tuple(t.shape) != tuple(model.input_shape):
        raise InputError(
            f"target {tuple(t.shape)} and bases {tuple(b.shape)} must match the model's input "
            f"shape {model.input_shape}"
        )
    if beta < 0 or lr <= 0 or steps < 1 or not 0 <= opacity < 1:
        raise InputError("need beta >= 0, lr > 0, steps >= 1 and opacity in [0, 1)")
    b = (1 - opacity) * b + opacity * t
    with torch.no_grad():
        ft = feats(t[None])
    x = b.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            loss = ((feats(x) - ft) ** 2).sum()
            (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            xh = x - lr * g
            x = ((xh + lr * beta * b) / (1 + lr * beta)).clamp(lo, hi)
    return x.detach().numpy()


def clean_label_poison(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_target: np.ndarray,
    *,
    base_class: int,
    n_poisons: int = 10,
    seed: int = 0,
    **kwargs: Any,
) -> PoisonResult:
    """Append ``n_poisons`` feature-collision poisons made from random rows of ``base_class``
    (labels unchanged) to ``(x, y)``. The manifest lists the appended rows and keeps the target
    input in ``params["target_input"]``."""
    xa, ya, k = check_xy(x, y, None)
    if not 0 <= int(base_class) < int(k):
        raise InputError(f"base_class must be a class in [0, {int(k) - 1}], got {base_class}")
    pool = np.flatnonzero(ya == base_class)
    if n_poisons < 1 or n_poisons > len(pool):
        raise InputError(f"n_poisons must be in [1, {len(pool)}] (rows of the base class)")
    rng = np.random.default_rng(seed)
    bases = np.sort(rng.choice(pool, size=n_poisons, replace=False))
    poisons = feature_collision(model, x_target, xa[bases], **kwargs)
    n = len(ya)
    idx = np.arange(n, n + n_poisons)
    labels = np.full(n_poisons, int(base_class), dtype=np.int64)
    man = PoisonManifest(
        "feature-collision", n_poisons / (n + n_poisons), int(seed), n + n_poisons, idx,
        labels, labels.copy(), target=int(base_class), source=None, trigger=None,
        params={"base_rows": bases.tolist(), "target_input": np.asarray(x_target).tolist(),
                **{k2: v for k2, v in kwargs.items() if isinstance(v, int | float)}},
    )  # fmt: skip
    return PoisonResult(np.concatenate([xa, poisons]), np.concatenate([ya, labels]), man)
