"""Checks on what a model returns, run before any long job trusts its outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from advguard.errors import InputError

#: Samples of the first batch a loaded model is checked on.
FIRST_BATCH = 32


def check_finite_logits(logits: torch.Tensor, what: str = "the model") -> None:
    """Raise :class:`InputError` when ``logits`` hold NaN or Inf (one line, names the count)."""
    if logits.numel() == 0:
        return
    finite = torch.isfinite(logits.detach())
    if bool(finite.all()):
        return
    rows = finite.reshape(len(logits), -1).all(1) if logits.ndim else finite
    n_bad = int((~rows).sum())
    kind = "NaN" if bool(torch.isnan(logits.detach()).any()) else "Inf"
    raise InputError(
        f"{what} returns {kind} outputs on {n_bad} of {len(logits)} inputs of the first batch "
        "(broken weights or numerically unstable); fix the model before evaluating it"
    )


def check_model_outputs(model: Any, x: Any, *, n: int = FIRST_BATCH) -> None:
    """Run ``model`` on the first ``n`` samples of ``x``; its logits must be finite and of
    shape ``(n, num_classes)``. Inputs that are not numeric arrays (text) are skipped."""
    arr = np.asarray(x[:n]) if hasattr(x, "__getitem__") else None
    if arr is None or arr.dtype.kind not in "biuf" or len(arr) == 0:
        return
    if not callable(getattr(model, "logits", None)) or not callable(
        getattr(model, "to_tensor", None)
    ):
        return
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        return  # a shape mismatch is reported by the job with both shapes
    try:
        with torch.no_grad():
            logits = model.logits(model.to_tensor(arr))
    except (RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"the model fails on the first batch of {len(arr)} inputs: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        ) from None
    num_classes = getattr(model, "num_classes", None)
    if logits.ndim != 2 or (num_classes is not None and logits.shape[1] != num_classes):
        raise InputError(
            f"the model returns outputs of shape {tuple(logits.shape)} for a batch of "
            f"{len(arr)}, expected ({len(arr)}, {num_classes}); check the number of classes"
        )
    check_finite_logits(logits)
