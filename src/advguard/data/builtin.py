"""Small datasets bundled with scikit-learn (no downloads).

- ``digits``: 1797 grayscale 8x8 images of digits 0-9, shape ``(N, 1, 8, 8)``,
  pixel values divided by 16 into ``[0, 1]``.
- ``breast_cancer``: 569 x 30 numeric features, 2 classes.
- ``wine``: 178 x 13 numeric features, 3 classes.
- ``spamham``: 343 short SMS-style texts (170 spam, 173 ham), shipped with advguard
  (:mod:`advguard.data.spamham`); a text data set (``modality="text"``).

The tabular ones are min-max scaled per feature to ``[0, 1]`` over the whole
dataset (``bounds = (0, 1)``); the original per-feature minimum and maximum are
kept in ``metadata["scaling"]`` so values can be mapped back:
``raw = x * (max - min) + min``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from advguard.data.dataset import Dataset
from advguard.errors import InputError

BUILTIN_DATASETS: Mapping[str, str] = MappingProxyType(
    {
        "digits": "scikit-learn digits: 1797 images 1x8x8 in [0, 1], 10 classes",
        "breast_cancer": "scikit-learn breast cancer: 569 x 30 features in [0, 1], 2 classes",
        "wine": "scikit-learn wine: 178 x 13 features in [0, 1], 3 classes",
        "spamham": "advguard spam/ham demo: 343 short texts, 2 classes (ham, spam)",
    }
)
"""Names accepted by :func:`load_builtin`, with a one-line description each."""


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, dtype=np.float64) / 16.0).astype(np.float32)[:, None]
    return Dataset(
        x=x,
        y=np.asarray(d.target, dtype=np.int64),
        bounds=(0.0, 1.0),
        num_classes=10,
        class_names=[str(c) for c in d.target_names],
        name="digits",
        source="builtin:digits",
        modality="image",
        metadata={"scaling": {"method": "divide", "by": 16.0}},
    )


def _tabular(name: str, loader: Callable) -> Dataset:
    d = loader()
    raw = np.asarray(d.data, dtype=np.float64)
    lo, hi = raw.min(axis=0), raw.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    x = np.clip((raw - lo) / span, 0.0, 1.0).astype(np.float32)
    n_feat = x.shape[1]
    return Dataset(
        x=x,
        y=np.asarray(d.target, dtype=np.int64),
        bounds=(0.0, 1.0),
        num_classes=len(d.target_names),
        class_names=[str(c) for c in d.target_names],
        feature_names=[str(f) for f in d.feature_names],
        feature_types=["numeric"] * n_feat,
        name=name,
        source=f"builtin:{name}",
        modality="tabular",
        feature_bounds=np.stack([np.zeros(n_feat), np.ones(n_feat)]).astype(np.float32),
        metadata={
            "scaling": {
                "method": "minmax",
                "feature_min": lo.tolist(),
                "feature_max": hi.tolist(),
            }
        },
    )


def load_builtin(name: str) -> Dataset:
    """Load one of :data:`BUILTIN_DATASETS` (``"digits"``, ``"breast_cancer"``, ``"wine"``,
    ``"spamham"``)."""
    key = str(name).strip().lower().removeprefix("builtin:").replace("-", "_")
    if key == "digits":
        ds = _digits()
    elif key == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        ds = _tabular("breast_cancer", load_breast_cancer)
    elif key == "spamham":
        from advguard.data.spamham import load_spamham

        texts, labels, names = load_spamham()
        ds = Dataset(
            x=np.asarray(texts, dtype=object),
            y=labels,
            bounds=(0.0, 1.0),
            num_classes=len(names),
            class_names=names,
            name="spamham",
            source="builtin:spamham",
            modality="text",
        )
    elif key == "wine":
        from sklearn.datasets import load_wine

        ds = _tabular("wine", load_wine)
    else:
        raise InputError(
            f"Unknown builtin dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}."
        )
    return ds.validate()
