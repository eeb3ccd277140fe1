"""Drift and anomaly signals of the traffic a guard answers, against a reference profile.

A :class:`DriftProfile` is computed once from reference data (the data the model was
validated on) by :func:`build_profile` (``advguard guard profile``) and saved as JSON: for a
bounded set of input *features* (per-channel block means over a grid of at most 4 x 4 cells,
plus each row's standard deviation and mean absolute difference between neighbours, which
noise raises) the decile bin edges and the share of reference rows in each bin; the mean and
standard deviation of the model's top-1 confidence; and the distribution of its predicted
classes. The guard's :class:`DriftMonitor` keeps the last ``window`` rows (their bin indices,
predicted classes and confidences, in preallocated ring buffers whose counts every request
updates incrementally); three gauges read the signals from those counts at every scrape:

* ``advguard_guard_drift_input_psi``: the mean population stability index (PSI) of the
  features, ``sum((a - e) * ln(a / e))`` over bins (0.1 and 0.25 are the usual "watch" and
  "act" levels);
* ``advguard_guard_drift_prediction_psi``: the PSI of the predicted-class distribution;
* ``advguard_guard_drift_confidence_zscore``: ``(mean_window - mean_ref) / (sd_ref /
  sqrt(n))``, how many standard errors the window's mean confidence is from the reference.

The profile file is data: it is read with size and depth limits and validated (shapes, finite
sorted edges, proportions summing to 1) before use.
"""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from advguard._safejson import load_file
from advguard.errors import InputError

__all__ = [
    "DriftMonitor",
    "DriftProfile",
    "FeatureMap",
    "build_profile",
    "features",
    "load_profile",
    "n_features",
    "psi",
    "save_profile",
]

FORMAT = "advguard-drift-profile"
MAX_FEATURES = 64
MAX_BINS = 32
MAX_CLASSES = 10_000
MAX_PROFILE_BYTES = 4 * 1024 * 1024
#: Floor of a bin share in the PSI (an empty bin would make it infinite).
EPS = 1e-4


def _grid(shape: tuple[int, ...]) -> int:
    """Cells per side of the pooling grid of an image-like (C, H, W) input."""
    c, h, w = shape[-3], shape[-2], shape[-1]
    g = min(4, h, w)
    while g > 1 and c * g * g > MAX_FEATURES - 2:
        g -= 1
    return g


def _image_like(shape: tuple[int, ...]) -> bool:
    """(..., C, H, W) with at most 62 channels: pooled per channel; anything else by chunks."""
    return len(shape) >= 3 and shape[-1] > 1 and shape[-2] > 1 and math.prod(shape[:-2]) <= 62


def n_features(shape: tuple[int, ...]) -> int:
    """How many drift features an input of ``shape`` has (without computing them)."""
    if _image_like(shape):
        c = math.prod(shape[:-2])
        return c * _grid((c, shape[-2], shape[-1])) ** 2 + 2
    return min(math.prod(shape), MAX_FEATURES - 2) + 2


class FeatureMap:
    """The drift features of inputs of one shape, with the pooling indices computed once:
    block means (images: per channel over a grid of at most 4 x 4 cells; other inputs: up to
    62 contiguous chunks of the flattened row), then each row's standard deviation and mean
    absolute difference between neighbouring values. ``F = n_features(shape) <= 64``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.image = _image_like(self.shape)
        if self.image:
            c, h, w = math.prod(self.shape[:-2]), self.shape[-2], self.shape[-1]
            g = _grid((c, h, w))
            self.chw = (c, h, w)
            self.rows = np.linspace(0, h, g + 1).astype(np.intp)[:-1]
            self.cols = np.linspace(0, w, g + 1).astype(np.intp)[:-1]
            size = np.diff(np.append(self.rows, h))[:, None] * np.diff(np.append(self.cols, w))
            self.size = size.astype(np.float64)
        else:
            d = math.prod(self.shape)
            k = min(d, MAX_FEATURES - 2)
            self.starts = np.linspace(0, d, k + 1).astype(np.intp)[:-1]
            self.lengths = np.diff(np.append(self.starts, d)).astype(np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        flat = np.asarray(x, dtype=np.float64).reshape(n, -1)
        if self.image:
            img = flat.reshape(n, *self.chw)
            s = np.add.reduceat(np.add.reduceat(img, self.rows, axis=2), self.cols, axis=3)
            pooled = (s / self.size).reshape(n, -1)
            rough = np.abs(np.diff(img, axis=-1)).mean(axis=(1, 2, 3))
        else:
            pooled = np.add.reduceat(flat, self.starts, axis=1) / self.lengths
            rough = (
                np.abs(np.diff(flat, axis=1)).mean(axis=1) if flat.shape[1] > 1 else 0 * flat[:, 0]
            )
        out = np.empty((n, pooled.shape[1] + 2))
        out[:, :-2] = pooled
        out[:, -2] = flat.std(axis=1)
        out[:, -1] = rough
        return out


def features(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """The drift features of a batch (n, *input_shape) as float64 (n, F): see
    :class:`FeatureMap`."""
    return FeatureMap(input_shape)(x)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


class FeatureBins(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    edges: list[float] = Field(max_length=MAX_BINS - 1)
    proportions: list[float] = Field(min_length=1, max_length=MAX_BINS)

    @model_validator(mode="after")
    def _check(self) -> FeatureBins:
        e, p = self.edges, self.proportions
        if len(p) != len(e) + 1:
            raise ValueError("a feature needs one more proportion than edges")
        if not all(math.isfinite(v) for v in e) or any(b <= a for a, b in itertools.pairwise(e)):
            raise ValueError("edges must be finite and strictly increasing")
        if any(not 0.0 <= v <= 1.0 for v in p) or abs(sum(p) - 1.0) > 1e-6:
            raise ValueError("proportions must lie in [0, 1] and sum to 1")
        return self


class DriftProfile(BaseModel):
    """The reference profile of a model's traffic (JSON; validated on load)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["advguard-drift-profile"] = "advguard-drift-profile"
    version: Literal[1] = 1
    input_shape: list[int] = Field(min_length=1, max_length=6)
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    model_digest: str | None = Field(default=None, max_length=200)
    n_reference: int = Field(ge=1)
    features: list[FeatureBins] = Field(min_length=1, max_length=MAX_FEATURES)
    confidence_mean: float = Field(ge=0.0, le=1.0)
    confidence_std: float = Field(ge=0.0, le=1.0)
    class_prior: list[float] = Field(min_length=2, max_length=MAX_CLASSES)

    @model_validator(mode="after")
    def _check(self) -> DriftProfile:
        if any(d <= 0 for d in self.input_shape):
            raise ValueError("input_shape must be positive integers")
        if len(self.class_prior) != self.num_classes:
            raise ValueError("class_prior needs one share per class")
        p = self.class_prior
        if any(not 0.0 <= v <= 1.0 for v in p) or abs(sum(p) - 1.0) > 1e-6:
            raise ValueError("class_prior must lie in [0, 1] and sum to 1")
        n_feat = n_features(tuple(self.input_shape))
        if len(self.features) != n_feat:
            raise ValueError(f"an input of this shape has {n_feat} drift features")
        return self


def _bins(values: np.ndarray, n_bins: int) -> FeatureBins:
    qs = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    edges = np.unique(qs)
    idx = np.searchsorted(edges, values, side="left")  # bin i: edges[i-1] < v <= edges[i]
    counts = np.bincount(idx, minlength=len(edges) + 1)
    props = counts / counts.sum()
    return FeatureBins(edges=[float(v) for v in edges], proportions=[float(v) for v in props])


def build_profile(
    classifier: Any,
    x: np.ndarray,
    *,
    bins: int = 10,
    batch_size: int = 256,
    model_digest: str | None = None,
) -> DriftProfile:
    """The reference profile of ``classifier`` on reference inputs ``x`` (n, *input_shape):
    quantile bins of every drift feature, the top-1 confidence's mean and standard deviation
    and the predicted-class distribution."""
    shape = tuple(int(d) for d in classifier.input_shape)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or tuple(x.shape[1:]) != shape:
        raise InputError(f"reference data of shape {x.shape[1:]} but the model takes {shape}")
    if len(x) < 10 * bins:
        raise InputError(f"a profile with {bins} bins needs at least {10 * bins} rows")
    if not 2 <= bins <= MAX_BINS:
        raise InputError(f"bins must be in 2..{MAX_BINS}")
    probs = np.concatenate(
        [
            np.asarray(classifier.predict_proba(x[i : i + batch_size]), dtype=np.float64)
            for i in range(0, len(x), batch_size)
        ]
    )
    k = int(classifier.num_classes)
    feats = features(x, shape)
    top1 = probs.max(axis=1)
    prior = np.bincount(probs.argmax(axis=1), minlength=k) / len(x)
    return DriftProfile(
        input_shape=list(shape),
        num_classes=k,
        model_digest=model_digest,
        n_reference=len(x),
        features=[_bins(feats[:, j], bins) for j in range(feats.shape[1])],
        confidence_mean=float(top1.mean()),
        confidence_std=float(top1.std()),
        class_prior=[float(v) for v in prior],
    )


def save_profile(profile: DriftProfile, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return out


def load_profile(path: str | Path) -> DriftProfile:
    """Read and validate a profile file (size and depth limits; one-line errors)."""
    doc = load_file(path, what="drift profile", max_bytes=MAX_PROFILE_BYTES, max_depth=8)
    try:
        return DriftProfile.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise InputError(f"{path}: not a drift profile: {where}: {first['msg']}") from None


class _Ring:
    """The last ``size`` rows of ``columns`` categorical values, with per-column counts
    (updated by the rows that enter and leave; no pass over the window)."""

    def __init__(self, size: int, columns: int, n_bins: int) -> None:
        self.size = size
        self.values = np.zeros((size, columns), dtype=np.int16)
        self.counts = np.zeros((columns, n_bins), dtype=np.int64)
        self.offsets = np.arange(columns, dtype=np.intp) * n_bins
        self.pos = 0
        self.filled = 0

    def _tally(self, rows: np.ndarray) -> np.ndarray:
        flat = (rows + self.offsets).ravel()
        return np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def push(self, rows: np.ndarray) -> None:
        rows = rows[-self.size :]
        n = len(rows)
        idx = (self.pos + np.arange(n)) % self.size
        used = min(n, max(0, self.filled + n - self.size))  # slots holding a row to forget
        if used:
            self.counts -= self._tally(self.values[idx[n - used :]])
        self.counts += self._tally(rows)
        self.values[idx] = rows
        self.pos = int((self.pos + n) % self.size)
        self.filled = min(self.size, self.filled + n)


class DriftMonitor:
    """Sliding-window drift signals of one served model against ``profile``; thread-safe."""

    def __init__(self, profile: DriftProfile, window: int = 1000, min_rows: int = 100) -> None:
        self.profile = profile
        self.shape = tuple(profile.input_shape)
        self.features = FeatureMap(self.shape)
        self.window = window
        self.min_rows = min(min_rows, window)
        nb = max(len(f.proportions) for f in profile.features)
        n_feat = len(profile.features)
        self.edges = np.full((n_feat, nb - 1), np.inf)
        self.expected = np.zeros((n_feat, nb))
        self.valid = np.zeros((n_feat, nb), dtype=bool)
        for j, f in enumerate(profile.features):
            self.edges[j, : len(f.edges)] = f.edges
            self.expected[j, : len(f.proportions)] = f.proportions
            self.valid[j, : len(f.proportions)] = True
        self.prior = np.asarray(profile.class_prior)
        self.inputs = _Ring(window, n_feat, nb)
        self.preds = _Ring(window, 1, profile.num_classes)
        self.conf = np.zeros(window)
        self.conf_sum = 0.0
        self.lock = threading.Lock()

    def check(self, input_shape: tuple[int, ...], num_classes: int, digest: str | None) -> None:
        """Refuse a profile made for another model's inputs, classes or weights."""
        if self.shape != tuple(input_shape) or self.profile.num_classes != num_classes:
            raise InputError(
                f"the drift profile is for inputs {self.shape} with "
                f"{self.profile.num_classes} classes, the model takes {tuple(input_shape)} "
                f"with {num_classes}"
            )
        pd = self.profile.model_digest
        if pd and digest and pd.split(":")[-1] != digest.split(":")[-1]:
            raise InputError("the drift profile was computed for another model (digest differs)")

    def _bin(self, feats: np.ndarray) -> np.ndarray:
        idx: np.ndarray = (feats[:, :, None] > self.edges[None]).sum(axis=2).astype(np.int16)
        return idx

    def update(self, x: np.ndarray, probs: np.ndarray | None) -> None:
        """Add a validated batch and its answered probabilities (None when refused: the
        rows count as inputs only). O(batch x features); the signals wait for :meth:`current`."""
        idx = self._bin(self.features(x))
        with self.lock:
            self.inputs.push(idx)
            if probs is not None and len(probs):
                self._push_outputs(probs)

    def current(self) -> tuple[float, float, float]:
        """(input PSI, prediction PSI, confidence z) of the window now (NaN while it has fewer
        than ``min_rows`` rows); what the gauges read at every scrape."""
        with self.lock:
            return self.signals()

    def _push_outputs(self, probs: np.ndarray) -> None:
        probs = probs[-self.window :]
        ring = self.preds
        slots = (ring.pos + np.arange(len(probs))) % self.window
        top1 = probs.max(axis=1)
        evict = min(len(probs), max(0, ring.filled + len(probs) - self.window))
        if evict:
            self.conf_sum -= float(self.conf[slots[len(probs) - evict :]].sum())
        self.conf[slots] = top1
        self.conf_sum += float(top1.sum())
        ring.push(probs.argmax(axis=1).astype(np.int16)[:, None])

    def signals(self) -> tuple[float, float, float]:
        """:meth:`current` without taking the lock."""
        nan = float("nan")
        psi_in = nan
        if self.inputs.filled >= self.min_rows:
            a = np.maximum(self.inputs.counts / self.inputs.filled, EPS)
            e = np.maximum(self.expected, EPS)
            psi_in = float(np.where(self.valid, (a - e) * np.log(a / e), 0.0).sum(axis=1).mean())
        n = self.preds.filled
        if n < self.min_rows:
            return psi_in, nan, nan
        psi_pred = psi(self.prior, self.preds.counts[0] / n)
        sd = max(self.profile.confidence_std, 1e-6)
        z = (self.conf_sum / n - self.profile.confidence_mean) / (sd / math.sqrt(n))
        return psi_in, psi_pred, float(z)
