"""Training-time monitoring: per-class loss drift between two training manifests.

Every epoch row of a training manifest (``manifest.json`` of :func:`advguard.defenses.training.
train`) records, per class, the examples trained on, their mean cross-entropy and their mean
logit-gradient norm, and the mean parameter-gradient norm per batch. :func:`compare_manifests`
compares the per-class loss of a new run with the previous (e.g. registered) version's:

* each class's loss is averaged over the last ``window`` epochs of each run;
* ``ratio`` is current / previous (both floored at ``floor``);
* ``relative`` divides by the median ratio over all classes, so a global shift (a different
  learning rate, more epochs, a harder data set) does not flag every class: what stands out
  is a class whose loss moved unlike the others, the signature of a poisoned target class
  (rows of other classes relabelled into it are hard to fit);
* a class is flagged when ``relative >= threshold`` or ``relative <= 1 / threshold``.

The same is reported for the logit-gradient norm. A flag is a reason to look at the data of
that class (``advguard data scan``), not proof of poisoning: a genuinely changed class does
the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from advguard.errors import InputError


def _per_class(manifest: dict[str, Any], key: str, window: int, what: str) -> np.ndarray:
    rows = manifest.get("epochs")
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{what} manifest has no finished epoch")
    vals = []
    for row in rows[-window:]:
        pc = row.get("per_class") if isinstance(row, dict) else None
        v = pc.get(key) if isinstance(pc, dict) else None
        if not isinstance(v, list) or not v:
            raise InputError(
                f"{what} manifest records no per-class {key} (written by an advguard older "
                "than training-time monitoring); retrain to record it"
            )
        try:
            arr = np.array([np.nan if e is None else float(e) for e in v], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{what} manifest: per-class {key} is not a list of numbers") from None
        if np.isinf(arr).any() or (arr[~np.isnan(arr)] < 0).any():
            raise InputError(f"{what} manifest: per-class {key} must be finite numbers >= 0")
        vals.append(arr)
    if len({len(a) for a in vals}) != 1:
        raise InputError(f"{what} manifest: epochs disagree on the number of classes")
    with np.errstate(all="ignore"):
        return np.asarray(np.nanmean(np.stack(vals), axis=0))


def _drift(
    prev: np.ndarray, cur: np.ndarray, threshold: float, floor: float
) -> list[dict[str, Any]]:
    ok = ~(np.isnan(prev) | np.isnan(cur))
    ratio = np.full(len(prev), np.nan)
    ratio[ok] = np.maximum(cur[ok], floor) / np.maximum(prev[ok], floor)
    med = float(np.median(ratio[ok])) if ok.any() else math.nan
    out: list[dict[str, Any]] = []
    for c in range(len(prev)):
        if not ok[c]:
            out.append({"class": c, "previous": None, "current": None, "ratio": None,
                        "relative": None, "flagged": False, "direction": None})  # fmt: skip
            continue
        rel = float(ratio[c] / med)
        flagged = rel >= threshold or rel <= 1 / threshold
        out.append(
            {
                "class": c,
                "previous": float(prev[c]),
                "current": float(cur[c]),
                "ratio": float(ratio[c]),
                "relative": rel,
                "flagged": bool(flagged),
                "direction": ("up" if rel > 1 else "down") if flagged else None,
            }
        )
    return out


def compare_manifests(
    previous: dict[str, Any],
    current: dict[str, Any],
    *,
    threshold: float = 2.0,
    window: int = 3,
    floor: float = 1e-3,
) -> dict[str, Any]:
    """Per-class loss (and logit-gradient norm) drift of ``current`` against ``previous``
    (training manifests as dicts, see :func:`advguard.defenses.training.load_manifest`).

    Returns ``{"threshold", "window", "loss": [per class], "grad_norm": [per class],
    "flagged_classes": [...], "median_loss_ratio", "grad_norm_previous", "grad_norm_current"}``
    where each per-class row has ``previous``, ``current``, ``ratio``, ``relative``,
    ``flagged`` and ``direction`` (see the module docstring)."""
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 1):
        raise InputError(f"threshold must be a number > 1, got {threshold!r}")
    if not (isinstance(window, int) and window >= 1):
        raise InputError(f"window must be an integer >= 1, got {window!r}")
    if not (math.isfinite(floor) and floor > 0):
        raise InputError(f"floor must be a number > 0, got {floor!r}")
    lp = _per_class(previous, "loss", window, "previous")
    lc = _per_class(current, "loss", window, "current")
    if len(lp) != len(lc):
        raise InputError(
            f"the manifests have {len(lp)} and {len(lc)} classes; compare runs of the same task"
        )
    gp = _per_class(previous, "grad_norm", window, "previous")
    gc = _per_class(current, "grad_norm", window, "current")
    loss = _drift(lp, lc, threshold, floor)
    grad = _drift(gp, gc, threshold, floor)
    ratios = [r["ratio"] for r in loss if r["ratio"] is not None]

    def batch_norm(m: dict[str, Any]) -> float | None:
        v = [r.get("grad_norm") for r in m["epochs"][-window:] if isinstance(r, dict)]
        nums = [float(x) for x in v if isinstance(x, int | float) and math.isfinite(x)]
        return float(np.mean(nums)) if nums else None

    return {
        "threshold": float(threshold),
        "window": window,
        "median_loss_ratio": float(np.median(ratios)) if ratios else None,
        "flagged_classes": [r["class"] for r in loss if r["flagged"]],
        "flagged_grad_norm_classes": [r["class"] for r in grad if r["flagged"]],
        "loss": loss,
        "grad_norm": grad,
        "grad_norm_previous": batch_norm(previous),
        "grad_norm_current": batch_norm(current),
    }


__all__ = ["compare_manifests"]
