"""The one protocol every attack, evaluator and (later) the guard talks to.

A classifier adapter states what its inputs are (``input_shape``, ``bounds``),
how many classes it has, and answers queries. Every answered sample is counted
in ``queries`` so attacks and reports can state their cost honestly.

Inputs live in the model's *raw* input space (e.g. pixels in [0, 1]); any
normalization is part of the adapter, so attacks see exactly what production
sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

import numpy as np
import torch

from advguard.errors import InputError

ArrayLike = np.ndarray | torch.Tensor


@dataclass
class QueryCounter:
    """Counts samples sent through the model (``forward``) and gradients taken."""

    forward: int = 0
    gradient: int = 0

    def reset(self) -> None:
        self.forward = 0
        self.gradient = 0

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.gradient

    @property
    def total(self) -> int:
        return self.forward + self.gradient


@runtime_checkable
class Classifier(Protocol):
    """What every model adapter provides (black-box level)."""

    num_classes: int
    bounds: tuple[float, float]
    input_shape: tuple[int, ...]
    queries: QueryCounter

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for a batch (no gradient). Counted as forward queries."""
        ...

    def predict_logits(self, x: ArrayLike) -> np.ndarray: ...

    def predict_proba(self, x: ArrayLike) -> np.ndarray: ...

    def predict(self, x: ArrayLike) -> np.ndarray: ...


@runtime_checkable
class WhiteBoxClassifier(Classifier, Protocol):
    """A classifier whose gradients are available (``TorchClassifier``)."""

    device: torch.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable logits (counted as forward queries)."""
        ...

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class LossFn(Protocol):
    def __call__(self, logits: torch.Tensor, /) -> torch.Tensor:
        """Per-sample loss (shape ``[batch]``) to be maximised by the attack."""
        ...


def is_white_box(model: object) -> TypeGuard[WhiteBoxClassifier]:
    """``model`` has the gradient path (``forward`` and ``value_and_grad``)."""
    return hasattr(model, "value_and_grad") and hasattr(model, "forward")


def label_count(model: object) -> int:
    """Real classes of ``model``: a detector-guarded model's extra reject class is not one."""
    reject = getattr(model, "reject_class", None)
    return int(reject) if reject is not None else int(model.num_classes)  # type: ignore[attr-defined]


def is_evasion(model: object, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Prediction ``pred`` is an evasion of label ``y``: wrong, and not a rejection."""
    return (pred != y) & (pred < label_count(model))


def mask_reject(model: object, scores: torch.Tensor, fill: float = -torch.inf) -> torch.Tensor:
    """``scores`` (batch x classes) with the reject column, if any, set to ``fill``."""
    if getattr(model, "reject_class", None) is None:
        return scores
    scores = scores.clone()
    scores[:, label_count(model) :] = fill
    return scores


class ClassifierBase:
    """Shared numpy conveniences and input checks for adapters.

    Subclasses implement :meth:`logits` (tensor in, tensor out).
    """

    num_classes: int
    bounds: tuple[float, float]
    input_shape: tuple[int, ...]
    queries: QueryCounter
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        num_classes = int(num_classes)
        if num_classes < 2:
            raise InputError(f"num_classes must be at least 2, got {num_classes}")
        lo, hi = (float(bounds[0]), float(bounds[1]))
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"bounds must be finite with low < high, got {bounds}")
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"input_shape must be non-empty and positive, got {input_shape}")
        self.num_classes = num_classes
        self.bounds = (lo, hi)
        self.input_shape = shape
        self.queries = QueryCounter()

    # -- to be implemented -------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- numpy conveniences ------------------------------------------------
    def to_tensor(self, x: ArrayLike) -> torch.Tensor:
        t = torch.as_tensor(x)
        if not torch.is_floating_point(t):
            t = t.to(torch.float32)
        return t.to(device=self.device, dtype=self.dtype)

    def predict_logits(self, x: ArrayLike, batch_size: int = 512) -> np.ndarray:
        t = self.to_tensor(x)
        check_inputs(self, t)
        outs = [self.logits(t[i : i + batch_size]) for i in range(0, len(t), batch_size)]
        if not outs:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return torch.cat(outs).detach().cpu().numpy()

    def predict_proba(self, x: ArrayLike, batch_size: int = 512) -> np.ndarray:
        z = torch.from_numpy(self.predict_logits(x, batch_size))
        return torch.softmax(z.double(), dim=1).numpy()

    def predict(self, x: ArrayLike, batch_size: int = 512) -> np.ndarray:
        return self.predict_logits(x, batch_size).argmax(axis=1)

    def accuracy(self, x: ArrayLike, y: ArrayLike, batch_size: int = 512) -> float:
        pred = self.predict(x, batch_size)
        y_np = np.asarray(torch.as_tensor(y).cpu())
        if len(y_np) == 0:
            raise InputError("cannot compute accuracy on an empty set")
        return float((pred == y_np).mean())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, bounds={self.bounds})"
        )


def check_inputs(model: Classifier, x: torch.Tensor, *, atol: float = 1e-5) -> None:
    """Raise :class:`InputError` unless ``x`` is a finite batch inside the model's bounds."""
    if x.ndim != len(model.input_shape) + 1 or tuple(x.shape[1:]) != tuple(model.input_shape):
        raise InputError(
            f"expected a batch of shape (N, {', '.join(map(str, model.input_shape))}), "
            f"got {tuple(x.shape)}"
        )
    if x.numel() == 0:
        return
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise InputError(f"inputs contain NaN or Inf ({n_bad} sample(s))")
    lo, hi = model.bounds
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo - atol or xmax > hi + atol:
        raise InputError(
            f"inputs lie outside the model's declared bounds [{lo}, {hi}] "
            f"(min {xmin:.4g}, max {xmax:.4g}); scale them or declare other bounds"
        )


def check_labels(model: Classifier, y: torch.Tensor, n: int, what: str = "labels") -> None:
    if y.ndim != 1 or len(y) != n:
        raise InputError(f"{what} must be a 1-D array of length {n}, got shape {tuple(y.shape)}")
    if torch.is_floating_point(y):
        raise InputError(f"{what} must be integers, got {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= model.num_classes):
        raise InputError(
            f"{what} must lie in [0, {model.num_classes - 1}], "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )
