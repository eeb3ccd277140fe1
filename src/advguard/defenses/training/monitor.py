"""Training-time monitoring: per-class loss drift between two training manifests.

Every epoch row of a training manifest (``manifest.json`` of :func:`advguard.defenses.training.
train`) records, per class, the examples trained on, their mean cross-entropy and their mean
logit-gradient norm, and the mean parameter-gradient norm per batch. :func:`compare_manifests`
compares the per-class loss of a new run with the previous (e.g. registered) version's:

* each class's loss is averaged over the last ``window`` epochs of each run;
* ``change`` is current - previous; ``excess`` is the change minus the median change over
  all classes, so a global shift (a different learning rate, more epochs, a noisier data
  set) does not flag every class;
* ``z`` is the excess over the spread of the changes (1.4826 x their median absolute
  deviation, at least 0.01): what stands out is a class whose loss moved unlike the others,
  the signature of a poisoned target class (rows of other classes relabelled into it are
  hard to fit);
* a class is flagged when ``|z| >= z`` (default 5) and ``|excess| >= min_delta`` (default
  0.1 nats).

The same is reported for the logit-gradient norm. A flag is a reason to look at the data of
that class (``advguard data scan``), not proof of poisoning: a genuinely changed class does
the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from advguard.errors import InputError

MIN_SCALE = 0.01
"""Smallest spread of the per-class changes used for ``z`` (two near-identical runs)."""


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
    prev: np.ndarray, cur: np.ndarray, z_threshold: float, min_delta: float, floor: float
) -> list[dict[str, Any]]:
    ok = ~(np.isnan(prev) | np.isnan(cur))
    delta = cur - prev
    shift = float(np.median(delta[ok])) if ok.any() else math.nan
    mad = float(np.median(np.abs(delta[ok] - shift))) if ok.any() else math.nan
    scale = max(1.4826 * mad, MIN_SCALE)
    out: list[dict[str, Any]] = []
    for c in range(len(prev)):
        if not ok[c]:
            out.append({"class": c, "previous": None, "current": None, "change": None,
                        "excess": None, "z": None, "ratio": None, "flagged": False,
                        "direction": None})  # fmt: skip
            continue
        excess = float(delta[c] - shift)
        z = excess / scale
        flagged = abs(z) >= z_threshold and abs(excess) >= min_delta
        out.append(
            {
                "class": c,
                "previous": float(prev[c]),
                "current": float(cur[c]),
                "change": float(delta[c]),
                "excess": excess,
                "z": z,
                "ratio": float(max(cur[c], floor) / max(prev[c], floor)),
                "flagged": bool(flagged),
                "direction": ("up" if excess > 0 else "down") if flagged else None,
            }
        )
    return out


def compare_manifests(
    previous: dict[str, Any],
    current: dict[str, Any],
    *,
    z: float = 5.0,
    min_delta: float = 0.1,
    min_grad_delta: float = 0.05,
    window: int = 3,
    floor: float = 1e-3,
) -> dict[str, Any]:
    """Per-class loss (and logit-gradient norm) drift of ``current`` against ``previous``
    (training manifests as dicts, see :func:`advguard.defenses.training.load_manifest`).

    Returns ``{"z", "min_delta", "window", "loss": [per class], "grad_norm": [per class],
    "flagged_classes", "flagged_grad_norm_classes", "median_loss_change",
    "grad_norm_previous", "grad_norm_current"}``; each per-class row has ``previous``,
    ``current``, ``change``, ``excess``, ``z``, ``ratio``, ``flagged`` and ``direction``
    (see the module docstring)."""
    checks = [("z", z, True), ("min_delta", min_delta, False)]
    checks += [("min_grad_delta", min_grad_delta, False), ("floor", floor, True)]
    for name, v, strict in checks:
        ok = isinstance(v, int | float) and math.isfinite(v) and (v > 0 if strict else v >= 0)
        if not ok:
            raise InputError(
                f"{name} must be a finite number {'>' if strict else '>='} 0, got {v!r}"
            )
    if not (isinstance(window, int) and window >= 1):
        raise InputError(f"window must be an integer >= 1, got {window!r}")
    lp = _per_class(previous, "loss", window, "previous")
    lc = _per_class(current, "loss", window, "current")
    if len(lp) != len(lc):
        raise InputError(
            f"the manifests have {len(lp)} and {len(lc)} classes; compare runs of the same task"
        )
    gp = _per_class(previous, "grad_norm", window, "previous")
    gc = _per_class(current, "grad_norm", window, "current")
    loss = _drift(lp, lc, z, min_delta, floor)
    grad = _drift(gp, gc, z, min_grad_delta, floor)
    changes = [r["change"] for r in loss if r["change"] is not None]

    def batch_norm(m: dict[str, Any]) -> float | None:
        v = [r.get("grad_norm") for r in m["epochs"][-window:] if isinstance(r, dict)]
        nums = [float(x) for x in v if isinstance(x, int | float) and math.isfinite(x)]
        return float(np.mean(nums)) if nums else None

    return {
        "z": float(z),
        "min_delta": float(min_delta),
        "window": window,
        "median_loss_change": float(np.median(changes)) if changes else None,
        "flagged_classes": [r["class"] for r in loss if r["flagged"]],
        "flagged_grad_norm_classes": [r["class"] for r in grad if r["flagged"]],
        "loss": loss,
        "grad_norm": grad,
        "grad_norm_previous": batch_norm(previous),
        "grad_norm_current": batch_norm(current),
    }


__all__ = ["compare_manifests"]
