"""The epsilon ball around the original rows (numpy, float64)."""

from __future__ import annotations

from typing import Literal

import numpy as np

BallNorm = Literal["linf", "l2", "l1"]

BALL_RTOL = 1e-6
"""Relative margin kept inside the ball when repairing rows."""


def ball_norm(norm: str | None) -> BallNorm:
    from advguard.attacks.norms import parse_norm

    return parse_norm(norm or "linf", ("linf", "l2", "l1"))  # type: ignore[return-value]


def ball_size(x0: np.ndarray, x: np.ndarray, nrm: BallNorm) -> np.ndarray:
    d = x - x0
    if nrm == "linf":
        return np.abs(d).max(1, initial=0.0)
    if nrm == "l2":
        return np.sqrt((d**2).sum(1))
    return np.abs(d).sum(1)


def in_ball(x0: np.ndarray, x: np.ndarray, eps: float, nrm: BallNorm) -> np.ndarray:
    return ball_size(x0, x, nrm) <= eps * (1 + 1e-5) + 1e-7


def project_rows(d: np.ndarray, nrm: BallNorm, radius: np.ndarray) -> np.ndarray:
    """Project each row of ``d`` onto the ``nrm`` ball of its own radius."""
    if nrm == "l2":
        n = np.sqrt((d**2).sum(1))
        f = np.where(n > radius, radius / np.maximum(n, 1e-300), 1.0)
        return d * f[:, None]
    import torch

    from advguard.attacks.norms import project

    return project(torch.from_numpy(d), "l1", torch.from_numpy(radius)).numpy()
