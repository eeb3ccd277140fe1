"""Row arrays in and out of the schema: numpy/torch inputs as 2-D arrays, and results
back in the caller's type, dtype and device."""

from __future__ import annotations

from typing import Any

import numpy as np

from advguard.errors import InputError


def as_2d(a: Any, what: str) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (rows, features), got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{what} must be numeric, got dtype {arr.dtype}")
    return arr


def float_dtype_of(a: Any) -> np.dtype | None:
    """The numpy float dtype of an array or tensor (``None`` when not floating point)."""
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return np.dtype(str(a.dtype).removeprefix("torch.")) if a.is_floating_point() else None
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    return arr.dtype if arr.dtype.kind == "f" else None


def like_input(x: np.ndarray, like: Any) -> Any:
    """``x`` (rows, features) as the type, dtype, device and shape of ``like``."""
    try:
        import torch

        if isinstance(like, torch.Tensor):
            dt = like.dtype if like.is_floating_point() else torch.float32
            return (
                torch.from_numpy(np.ascontiguousarray(x))
                .to(device=like.device, dtype=dt)
                .reshape(like.shape)
            )
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(like)
    return x.reshape(arr.shape) if arr.ndim == 1 else x
