"""Adapter for text classifiers: lists of strings in, class probabilities out.

``TextClassifier`` wraps either a fitted scikit-learn estimator or pipeline whose
``predict_proba`` takes a list of strings (e.g. ``TfidfVectorizer`` followed by
``LogisticRegression``), or any callable ``list[str] -> probabilities`` of shape
``(n, num_classes)``. Labels are column indices of those probabilities
(``0 .. num_classes - 1``); for scikit-learn models ``classes`` holds the
estimator's ``classes_`` in that order.

Every text sent through the model is counted in ``queries.forward`` so attacks
can state their cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from advguard.errors import InputError
from advguard.models.base import QueryCounter


@runtime_checkable
class TextModel(Protocol):
    """What text attacks and defenses talk to (``TextClassifier`` and its wrappers)."""

    num_classes: int
    queries: QueryCounter

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray: ...

    def predict(self, texts: Sequence[str]) -> np.ndarray: ...


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """Return ``texts`` as a list of ``str`` or raise :class:`InputError` saying what is wrong."""
    if isinstance(texts, str):
        raise InputError(
            f"{what} must be a list of strings, got a single string; wrap it in a list: [text]"
        )
    if isinstance(texts, (bytes, bytearray)):
        raise InputError(
            f"{what} must be a list of strings, got bytes; decode them first "
            "(e.g. data.decode('utf-8')) and wrap the result in a list"
        )
    if texts is None:
        raise InputError(f"{what} must be a list of strings, got None")
    if isinstance(texts, np.ndarray):
        if texts.ndim != 1:
            raise InputError(f"{what} must be a 1-D sequence of strings, got shape {texts.shape}")
        items = texts.tolist()
    elif isinstance(texts, (dict, set, frozenset)) or not isinstance(texts, Iterable):
        raise InputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    else:
        items = list(texts)
    for i, t in enumerate(items):
        if isinstance(t, str):
            continue
        if t is None:
            raise InputError(f"{what}[{i}] is None; every item must be a string")
        if isinstance(t, (bytes, bytearray)):
            raise InputError(f"{what}[{i}] is bytes; decode it first (e.g. data.decode('utf-8'))")
        raise InputError(
            f"{what}[{i}] is a {type(t).__name__} ({t!r:.40}); every item must be a string"
        )
    return [str(t) for t in items]


def check_text_labels(labels: Any, n: int, num_classes: int, what: str = "labels") -> np.ndarray:
    """Return ``labels`` as an ``int64`` array of length ``n`` in ``[0, num_classes)``."""
    if labels is None:
        raise InputError(f"{what} must be a 1-D array of {n} integer class indices, got None")
    try:
        arr = np.asarray(labels)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{what} could not be read as an array: {exc}") from None
    if arr.ndim != 1 or len(arr) != n:
        raise InputError(f"{what} must be a 1-D array of length {n}, got shape {arr.shape}")
    if n and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise InputError(
            f"{what} must be integer class indices (0 .. {num_classes - 1}), got dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise InputError(
            f"{what} must lie in [0, {num_classes - 1}], got values in [{arr.min()}, {arr.max()}]"
        )
    return arr


class TextClassifier:
    """A text classifier behind one interface: ``predict_proba(list[str]) -> (n, K)``.

    Parameters
    ----------
    model:
        A fitted scikit-learn estimator/pipeline with ``predict_proba`` accepting a
        list of strings, or a callable ``list[str] -> array (n, num_classes)`` of
        probabilities.
    num_classes:
        Required for a plain callable; checked against ``classes_`` for scikit-learn.
    class_names:
        Optional names, one per class (reports only).
    batch_size:
        Texts per call to the underlying model.
    """

    def __init__(
        self,
        model: Any,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = 512,
    ) -> None:
        if model is None:
            raise InputError("model must be a fitted scikit-learn text pipeline or a callable")
        if isinstance(model, (TextClassifier,)):
            raise InputError("model is already a TextClassifier; use it directly")
        classes = None
        if hasattr(model, "predict_proba"):
            fn: Callable[[list[str]], Any] = model.predict_proba
            try:
                classes = getattr(model, "classes_", None)
            except Exception:
                classes = None
            if classes is None and num_classes is None:
                raise InputError(
                    f"{type(model).__name__} has no classes_ (is it fitted?); fit it first "
                    "or pass num_classes="
                )
        elif callable(model):
            fn = model
            if num_classes is None:
                raise InputError(
                    "a callable text model needs num_classes= (the number of probability columns)"
                )
        else:
            raise InputError(
                f"model must have predict_proba or be callable, got {type(model).__name__}"
            )
        if classes is not None:
            classes = np.asarray(classes)
            if num_classes is not None and int(num_classes) != len(classes):
                raise InputError(
                    f"num_classes={num_classes} but the model has {len(classes)} classes"
                )
            num_classes = len(classes)
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise InputError(f"num_classes must be an integer, got {num_classes!r}")
        if int(num_classes) < 2:
            raise InputError(f"num_classes must be at least 2, got {num_classes}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        self.num_classes = int(num_classes)
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != self.num_classes:
                raise InputError(
                    f"class_names has {len(class_names)} entries for {self.num_classes} classes"
                )
        elif classes is not None:
            class_names = [str(c) for c in classes]
        self.class_names: list[str] | None = class_names
        self.classes = classes
        self.model = model
        self.batch_size = int(batch_size)
        self.queries = QueryCounter()
        self._fn = fn

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities, shape ``(len(texts), num_classes)``; counts ``len(texts)`` queries."""
        items = check_texts(texts)
        if not items:
            return np.zeros((0, self.num_classes), dtype=np.float64)
        outs = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            self.queries.forward += len(chunk)
            outs.append(self._check_output(self._fn(chunk), len(chunk)))
        return np.concatenate(outs)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted class indices (column of the highest probability)."""
        return self.predict_proba(texts).argmax(axis=1)

    def accuracy(self, texts: Sequence[str], labels: Any) -> float:
        items = check_texts(texts)
        if not items:
            raise InputError("cannot compute accuracy on an empty set")
        y = check_text_labels(labels, len(items), self.num_classes)
        return float((self.predict(items) == y).mean())

    def _check_output(self, out: Any, n: int) -> np.ndarray:
        try:
            p = np.asarray(out, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(
                f"the text model returned {type(out).__name__}, not an array of probabilities"
            ) from None
        if p.shape != (n, self.num_classes):
            raise InputError(
                f"the text model returned shape {p.shape} for {n} texts; "
                f"expected ({n}, {self.num_classes}) probabilities"
            )
        if not np.isfinite(p).all():
            raise InputError("the text model returned NaN or Inf probabilities")
        if p.min() < -1e-6 or p.max() > 1 + 1e-6 or not np.allclose(p.sum(1), 1.0, atol=1e-3):
            raise InputError(
                "the text model must return probabilities (rows in [0, 1] summing to 1); "
                "apply a softmax to scores or logits first"
            )
        return p

    def __repr__(self) -> str:
        return f"TextClassifier({type(self.model).__name__}, num_classes={self.num_classes})"


def as_text_classifier(model: Any, **kwargs: Any) -> TextModel:
    """``model`` itself if it already is a text model adapter, else ``TextClassifier(model)``."""
    if (
        hasattr(model, "predict_proba")
        and isinstance(getattr(model, "queries", None), QueryCounter)
        and isinstance(getattr(model, "num_classes", None), int)
    ):
        return model
    return TextClassifier(model, **kwargs)


__all__ = [
    "TextClassifier",
    "TextModel",
    "as_text_classifier",
    "check_text_labels",
    "check_texts",
]
