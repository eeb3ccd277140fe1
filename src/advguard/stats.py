"""Proportions with Clopper-Pearson intervals and small summaries: the statistics every layer
reports (attacks, evaluation, defenses, guard), so it sits below all of them."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel
from scipy.stats import beta

from advguard.errors import InputError


class Proportion(BaseModel):
    """``k`` successes out of ``n``, with a two-sided Clopper-Pearson interval."""

    value: float | None
    k: int
    n: int
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    def __str__(self) -> str:
        if self.value is None:
            return "n/a (n=0)"
        return f"{self.value:.1%} [{self.ci_low:.1%}, {self.ci_high:.1%}] (n={self.n})"


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for ``k`` of ``n``; (0, 1) when ``n`` is 0."""
    if n < 0 or k < 0 or k > n:
        raise InputError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def proportion(k: int, n: int, confidence: float = 0.95) -> Proportion:
    lo, hi = clopper_pearson(int(k), int(n), confidence)
    return Proportion(
        value=(k / n) if n else None,
        k=int(k),
        n=int(n),
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
    )


def summary(values: np.ndarray) -> dict[str, float | None]:
    """Median and mean of a 1-D array (None for an empty one)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"median": None, "mean": None}
    return {"median": float(np.median(v)), "mean": float(v.mean())}


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)
