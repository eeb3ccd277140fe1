"""A plain supervised training loop (clean training; adversarial training lives in defenses)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from advguard.errors import InputError
from advguard.models.devices import resolve_device


def fit(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    preprocess: nn.Module | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``module`` with Adam and cross-entropy; returns it in eval mode.

    ``progress(epoch, epochs, mean_loss)`` is called after each epoch. ``augment(xb, gen)``
    transforms each raw batch before the step (e.g. Gaussian noise for randomized smoothing),
    drawing its randomness from ``gen`` so training stays deterministic for a seed (the
    shuffling and the augmentation draw on the CPU, so a seed gives the same batches on any
    ``device``).
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y).long()
    if len(xt) == 0 or len(xt) != len(yt):
        raise InputError(f"need as many labels as inputs and at least one, got {len(xt)}/{len(yt)}")
    if epochs < 1 or batch_size < 1:
        raise InputError("epochs and batch_size must be >= 1")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    module.to(dev).train()
    pre = preprocess.to(dev) if preprocess is not None else nn.Identity()
    for p in module.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total, count = 0.0, 0
        for i in range(0, len(xt), batch_size):
            b = perm[i : i + batch_size]
            xb = xt[b] if augment is None else augment(xt[b], g)
            xb, yb = xb.to(dev), yt[b].to(dev)
            loss = nn.functional.cross_entropy(module(pre(xb)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
        if progress is not None:
            progress(epoch + 1, epochs, total / count)
    return module.eval()
