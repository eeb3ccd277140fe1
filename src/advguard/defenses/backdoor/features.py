"""Penultimate-layer representations of a :class:`~advguard.models.torch_model.TorchClassifier`.

Spectral signatures and activation clustering work on the representation a network feeds to its
last linear layer; we read it with a forward *pre*-hook on the last ``nn.Linear`` of the module
(its input is the output of the layer before it), so any architecture ending in a linear
classifier works without naming layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.errors import InputError


def last_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``module`` (the classifier head)."""
    found = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise InputError(
            f"{type(module).__name__} has no nn.Linear layer; penultimate features need a "
            "network that ends in a linear classifier"
        )
    return found[-1]


def penultimate_features(model: Any, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """``(N, D)`` float64 inputs of the last linear layer of ``model`` (a TorchClassifier)."""
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        raise InputError(
            f"penultimate features need a torch model (TorchClassifier), got {type(model).__name__}"
        )
    head = last_linear(module)
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().flatten(1).double().cpu())

    handle = head.register_forward_pre_hook(hook)
    try:
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        for i in range(0, len(xt), batch_size):
            model.logits(xt[i : i + batch_size])
    finally:
        handle.remove()
    if not captured:
        return np.zeros((0, head.in_features))
    return torch.cat(captured).numpy()
