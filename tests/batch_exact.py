"""A model whose float results do not depend on the batch (shared by the determinism tests)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from advguard.models.fit import fit


class RowwiseMLP(nn.Module):
    """64 -> 32 -> 10 MLP from element-wise products and row sums (no GEMM kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 64) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.w2 = nn.Parameter(torch.randn(10, 32) * 0.2)
        self.b2 = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu((x.flatten(1)[:, None, :] * self.w1).sum(-1) + self.b1)
        return (h[:, None, :] * self.w2).sum(-1) + self.b2


def train_exact_net(x_tr: np.ndarray, y_tr: np.ndarray) -> nn.Module:
    """The RowwiseMLP fitted on the digits training split (seeded)."""
    torch.manual_seed(0)
    return fit(RowwiseMLP(), x_tr, y_tr, epochs=8, seed=0)
