"""Backdoor triggers: what is stamped on an input, and how to stamp it again at test time.

A trigger is a ``pattern`` (one input's shape, ``(C, H, W)``, raw input units) and a ``mask``
(same shape, values in [0, 1]) applied as

    x' = (1 - alpha * mask) * x + alpha * mask * pattern,   clipped to the input bounds.

- BadNets (Gu, Dolan-Gavitt, Garg 2017, "BadNets: Identifying Vulnerabilities in the Machine
  Learning Model Supply Chain", arXiv:1708.06733): a small patch, ``mask`` 1 on the patch and 0
  elsewhere, ``alpha`` = 1.
- Blended injection (Chen, Liu, Li, Lu, Song 2017, "Targeted Backdoor Attacks on Deep Learning
  Systems Using Data Poisoning", arXiv:1712.05526): a whole-image ``pattern`` (random noise by
  default) blended in with ratio ``alpha``, ``mask`` 1 everywhere.

A :class:`TriggerSpec` also carries the ``target`` class the backdoor maps to (and an optional
``source`` class for source-specific backdoors) so that attack success can be measured from it
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from advguard.errors import InputError

#: Largest trigger (values per array) accepted from a manifest file.
MAX_TRIGGER_VALUES = 4_000_000

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


@dataclass(eq=False)
class TriggerSpec:
    """A re-applicable trigger: ``pattern`` and ``mask`` of one input's shape, blend ``alpha``."""

    kind: str  # "patch" or "blend"
    pattern: np.ndarray
    mask: np.ndarray
    alpha: float
    target: int
    bounds: tuple[float, float]
    source: int | None = None
    params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.pattern = np.asarray(self.pattern, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.float32)
        if self.kind not in ("patch", "blend"):
            raise InputError(f"trigger kind must be 'patch' or 'blend', got {self.kind!r}")
        if self.pattern.shape != self.mask.shape or self.pattern.ndim != 3:
            raise InputError(
                f"trigger pattern and mask must both have one input's shape (C, H, W), got "
                f"{self.pattern.shape} and {self.mask.shape}"
            )
        if self.pattern.size > MAX_TRIGGER_VALUES:
            raise InputError(f"trigger has {self.pattern.size} values, more than the limit")
        if not (np.isfinite(self.pattern).all() and np.isfinite(self.mask).all()):
            raise InputError("trigger pattern and mask must be finite")
        if self.mask.min() < 0 or self.mask.max() > 1:
            raise InputError("trigger mask values must lie in [0, 1]")
        lo, hi = float(self.bounds[0]), float(self.bounds[1])
        if not lo < hi:
            raise InputError(f"bounds must be LOW < HIGH, got {self.bounds}")
        self.bounds = (lo, hi)
        if self.pattern.min() < lo - 1e-6 or self.pattern.max() > hi + 1e-6:
            raise InputError(f"trigger pattern leaves the input bounds {self.bounds}")
        if not 0 < float(self.alpha) <= 1:
            raise InputError(f"alpha must lie in (0, 1], got {self.alpha}")
        self.alpha = float(self.alpha)
        self.target = _class_index(self.target, "target")
        if self.source is not None:
            self.source = _class_index(self.source, "source")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.pattern.shape)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamp the trigger on a batch ``(N, C, H, W)``; returns a new float32 array."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"trigger of shape {self.input_shape} cannot be applied to inputs of shape "
                f"{tuple(x.shape[1:])} (need (N, C, H, W) images)"
            )
        m = self.alpha * self.mask
        out = (1.0 - m) * x + m * self.pattern
        return np.clip(out, self.bounds[0], self.bounds[1]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "alpha": self.alpha,
            "target": self.target,
            "source": self.source,
            "bounds": list(self.bounds),
            "shape": list(self.input_shape),
            "params": dict(self.params or {}),
            "pattern": self.pattern.tolist(),
            "mask": self.mask.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> TriggerSpec:
        """Rebuild from :meth:`to_dict` output read from an untrusted file (validated)."""
        if not isinstance(d, dict):
            raise InputError("trigger must be a JSON object")
        for key in ("kind", "alpha", "target", "bounds", "pattern", "mask"):
            if key not in d:
                raise InputError(f"trigger is missing {key!r}")
        bounds = d["bounds"]
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise InputError("trigger bounds must be [LOW, HIGH]")
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise InputError("trigger params must be a JSON object")
        try:
            pattern = np.asarray(d["pattern"], dtype=np.float32)
            mask = np.asarray(d["mask"], dtype=np.float32)
            alpha = float(d["alpha"])
            lo, hi = float(bounds[0]), float(bounds[1])
        except (TypeError, ValueError) as e:
            raise InputError(f"trigger arrays/numbers are malformed: {e}") from None
        return cls(
            kind=str(d["kind"]),
            pattern=pattern,
            mask=mask,
            alpha=alpha,
            target=d["target"],
            source=d.get("source"),
            bounds=(lo, hi),
            params=params,
        )


def _class_index(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or int(v) < 0:
        raise InputError(f"{what} class must be a non-negative integer, got {v!r}")
    return int(v)


def _colour(colour: float | Sequence[float] | None, channels: int, hi: float) -> np.ndarray:
    if colour is None:
        return np.full(channels, hi, dtype=np.float32)
    arr = np.atleast_1d(np.asarray(colour, dtype=np.float32))
    if arr.size == 1:
        return np.full(channels, float(arr[0]), dtype=np.float32)
    if arr.size != channels:
        raise InputError(f"colour needs 1 or {channels} values (one per channel), got {arr.size}")
    return arr


def patch_trigger(
    input_shape: Sequence[int],
    *,
    target: int,
    bounds: tuple[float, float] = (0.0, 1.0),
    size: int | tuple[int, int] = 3,
    position: str | tuple[int, int] = "bottom-right",
    margin: int = 1,
    colour: float | Sequence[float] | None = None,
    style: str = "solid",
    source: int | None = None,
) -> TriggerSpec:
    """A BadNets patch (Gu et al. 2017).

    ``size`` is the patch height/width in pixels; ``position`` a corner name, ``"center"`` or
    ``(row, col)`` of its top-left pixel; ``margin`` the gap to the image border for corner
    positions; ``colour`` one value or one per channel in raw units (default: the upper bound);
    ``style="checkerboard"`` alternates ``colour`` and the lower bound (as in the paper's
    pattern trigger), ``"solid"`` fills the patch.
    """
    if len(input_shape) != 3:
        raise InputError(f"patch triggers need image inputs (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    ph, pw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if ph < 1 or pw < 1 or ph > h or pw > w:
        raise InputError(f"patch size {ph}x{pw} does not fit in a {h}x{w} image")
    if margin < 0:
        raise InputError(f"margin must be >= 0, got {margin}")
    if isinstance(position, str):
        if position not in POSITIONS:
            raise InputError(f"position must be one of {', '.join(POSITIONS)} or (row, col)")
        top = margin if position.startswith("top") else h - ph - margin
        left = margin if position.endswith("left") else w - pw - margin
        if position == "center":
            top, left = (h - ph) // 2, (w - pw) // 2
    else:
        top, left = int(position[0]), int(position[1])
    if top < 0 or left < 0 or top + ph > h or left + pw > w:
        raise InputError(f"patch at ({top}, {left}) of size {ph}x{pw} leaves the {h}x{w} image")
    if style not in ("solid", "checkerboard"):
        raise InputError(f"style must be 'solid' or 'checkerboard', got {style!r}")
    lo, hi = float(bounds[0]), float(bounds[1])
    col = _colour(colour, c, hi)
    pattern = np.full((c, h, w), lo, dtype=np.float32)
    mask = np.zeros((c, h, w), dtype=np.float32)
    patch = np.broadcast_to(col[:, None, None], (c, ph, pw)).copy()
    if style == "checkerboard":
        checker = (np.add.outer(np.arange(ph), np.arange(pw)) % 2 == 1)[None]
        patch = np.where(checker, lo, patch)
    pattern[:, top : top + ph, left : left + pw] = patch
    mask[:, top : top + ph, left : left + pw] = 1.0
    params = {"size": [ph, pw], "position": [top, left], "colour": col.tolist(), "style": style}
    return TriggerSpec(
        "patch", pattern, mask, 1.0, target=target, bounds=(lo, hi), source=source, params=params
    )


def blend_trigger(
    input_shape: Sequence[int],
    *,
    target: int,
    bounds: tuple[float, float] = (0.0, 1.0),
    alpha: float = 0.2,
    pattern: np.ndarray | None = None,
    seed: int = 0,
    source: int | None = None,
) -> TriggerSpec:
    """A blended trigger (Chen et al. 2017): ``pattern`` (default uniform noise drawn from
    ``seed`` within the bounds) mixed into the whole image with ratio ``alpha``."""
    if len(input_shape) != 3:
        raise InputError(f"blend triggers need image inputs (C, H, W), got {tuple(input_shape)}")
    shape = tuple(int(v) for v in input_shape)
    lo, hi = float(bounds[0]), float(bounds[1])
    if pattern is None:
        rng = np.random.default_rng(seed)
        pat = rng.uniform(lo, hi, size=shape).astype(np.float32)
        params: dict[str, Any] = {"pattern": "uniform-noise", "seed": seed}
    else:
        pat = np.asarray(pattern, dtype=np.float32)
        if pat.shape != shape:
            raise InputError(f"blend pattern must have shape {shape}, got {pat.shape}")
        params = {"pattern": "given"}
    return TriggerSpec(
        "blend",
        pat,
        np.ones(shape, dtype=np.float32),
        alpha,
        target=target,
        bounds=(lo, hi),
        source=source,
        params=params,
    )
