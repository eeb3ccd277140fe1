"""Black-box adapter around a scikit-learn estimator with ``predict_proba``."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from advguard.errors import InputError
from advguard.models.base import ClassifierBase

#: Added to probabilities before the log so that zero probabilities stay finite.
PROBA_EPS = 1e-12


class SklearnClassifier(ClassifierBase):
    """Wrap a fitted scikit-learn classifier (anything with ``predict_proba``).

    The adapter is black-box: it answers :meth:`logits` queries but offers no
    gradients, so only score- or decision-based attacks apply.

    Parameters
    ----------
    estimator:
        A fitted estimator (or pipeline) with ``predict_proba(X) -> (n, n_classes)``.
    input_shape:
        Shape of one raw input without the batch dimension. Inputs are flattened
        to ``(N, prod(input_shape))`` before they reach the estimator, so an image
        model trained on flattened pixels can keep its image shape here. Defaults
        to ``(estimator.n_features_in_,)`` when the estimator records it.
    bounds:
        Valid range of raw inputs.
    num_classes:
        Number of classes the adapter reports. Defaults to ``len(estimator.classes_)``.
    class_mapping:
        How the estimator's labels map to advguard's class indices
        ``0 .. num_classes - 1``. Not needed when ``estimator.classes_`` are the
        integers ``0 .. K - 1`` (or a subset of ``0 .. num_classes - 1``). For
        other labels (strings, ``[3, 7]``...) pass ``{label: index}``, e.g.
        ``{c: i for i, c in enumerate(estimator.classes_)}`` to number them in
        ``classes_`` order. Classes the estimator never predicts get probability 0.

    ``logits`` returns ``log(p + 1e-12)`` (log-probabilities) as float32; a softmax
    of them recovers ``p`` up to that epsilon.
    """

    def __init__(
        self,
        estimator: Any,
        *,
        input_shape: Sequence[int] | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        num_classes: int | None = None,
        class_mapping: Mapping[Hashable, int] | None = None,
    ) -> None:
        if not callable(getattr(estimator, "predict_proba", None)):
            hint = ""
            if type(estimator).__name__ in {"SVC", "NuSVC"}:
                hint = " For SVC, fit it with probability=True."
            raise InputError(
                f"{type(estimator).__name__} has no predict_proba method; SklearnClassifier "
                "needs predict_proba(X) returning class probabilities. Use a probabilistic "
                "classifier or wrap it in sklearn.calibration.CalibratedClassifierCV." + hint
            )
        self.estimator = estimator

        n_features = getattr(estimator, "n_features_in_", None)
        if input_shape is None:
            if n_features is None:
                raise InputError(
                    f"cannot infer input_shape: {type(estimator).__name__} has no "
                    "n_features_in_ (is it fitted?); pass input_shape=(n_features,)"
                )
            input_shape = (int(n_features),)
        shape = tuple(int(d) for d in input_shape)
        if n_features is not None and math.prod(shape) != int(n_features):
            raise InputError(
                f"input_shape {shape} has {math.prod(shape)} values per sample but the "
                f"estimator expects {int(n_features)} features"
            )

        classes = getattr(estimator, "classes_", None)
        self.classes: np.ndarray | None = None if classes is None else np.asarray(classes)
        columns, k = self._column_indices(self.classes, num_classes, class_mapping)
        super().__init__(num_classes=k, input_shape=shape, bounds=bounds)
        # column j of predict_proba -> class index self._columns[j]
        self._columns = columns

    @staticmethod
    def _column_indices(
        classes: np.ndarray | None,
        num_classes: int | None,
        mapping: Mapping[Hashable, int] | None,
    ) -> tuple[np.ndarray | None, int]:
        if classes is None:
            if mapping is not None:
                raise InputError("class_mapping needs an estimator with classes_ (is it fitted?)")
            if num_classes is None:
                raise InputError(
                    "estimator has no classes_ (is it fitted?); pass num_classes explicitly"
                )
            return None, int(num_classes)
        if mapping is not None:
            missing = [c for c in classes.tolist() if c not in mapping]
            if missing:
                raise InputError(f"class_mapping has no index for estimator label(s) {missing}")
            idx = np.asarray([int(mapping[c]) for c in classes.tolist()], dtype=np.int64)
            k = int(num_classes) if num_classes is not None else int(idx.max()) + 1
            if idx.min() < 0 or idx.max() >= k or len(set(idx.tolist())) != len(idx):
                raise InputError(
                    f"class_mapping must send each label to a distinct index in [0, {k - 1}], "
                    f"got {dict(zip(classes.tolist(), idx.tolist(), strict=True))}"
                )
            return idx, k
        k = int(num_classes) if num_classes is not None else len(classes)
        is_int = np.issubdtype(classes.dtype, np.integer) or (
            classes.dtype == object and all(isinstance(c, int | np.integer) for c in classes)
        )
        if not is_int or classes.min() < 0 or classes.max() >= k:
            raise InputError(
                f"estimator classes_ {classes.tolist()[:10]} are not integers in [0, {k - 1}]; "
                "pass class_mapping={label: index}, e.g. "
                "{c: i for i, c in enumerate(estimator.classes_)}, or a larger num_classes"
            )
        idx = classes.astype(np.int64)
        if np.array_equal(idx, np.arange(k)):
            return None, k
        return idx, k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``log(p + 1e-12)`` (float32, on ``x``'s device)."""
        n = len(x)
        self.queries.forward += n
        if n == 0:
            return torch.zeros((0, self.num_classes), dtype=torch.float32, device=x.device)
        flat = x.detach().reshape(n, -1).to("cpu", torch.float64).numpy()
        proba = np.asarray(self.estimator.predict_proba(flat), dtype=np.float64)
        n_cols = len(self.classes) if self.classes is not None else self.num_classes
        if proba.shape != (n, n_cols):
            raise InputError(
                f"estimator.predict_proba returned shape {proba.shape}, expected ({n}, {n_cols})"
            )
        if self._columns is not None:
            full = np.zeros((n, self.num_classes), dtype=np.float64)
            full[:, self._columns] = proba
            proba = full
        out = torch.from_numpy(np.log(np.clip(proba, 0.0, None) + PROBA_EPS).astype(np.float32))
        return out.to(x.device)

    def __repr__(self) -> str:
        return (
            f"SklearnClassifier({type(self.estimator).__name__}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, bounds={self.bounds})"
        )
