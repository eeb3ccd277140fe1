"""Model and data files for tests that hand a model to another process (Ray workers, a
served guard, a CLI run): safetensors plus the zoo factory that rebuilds the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard.models import TorchClassifier
from advguard.models.io import save_torch
from advguard.models.zoo import mlp


def digits_cnn_file(module: torch.nn.Module, path: Path) -> Path:
    """The digits ``small_cnn`` (conftest's ``digits_module``) saved to ``path``."""
    model = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    return save_torch(
        model,
        path,
        factory="advguard.models.zoo:small_cnn",
        factory_kwargs={"input_shape": [1, 8, 8], "num_classes": 10},
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )


def mlp_file(path: Path, seed: int = 0, **factory_kw: Any) -> Path:
    """A zoo ``mlp(**factory_kw)`` with weights drawn under ``seed``, saved to ``path``."""
    torch.manual_seed(seed)
    shape, n = tuple(factory_kw["input_shape"]), int(factory_kw["num_classes"])
    clf = TorchClassifier(mlp(**factory_kw), input_shape=shape, num_classes=n)
    return save_torch(
        clf,
        path,
        factory="advguard.models.zoo:mlp",
        factory_kwargs=factory_kw,
        input_shape=shape,
        num_classes=n,
        bounds=(0.0, 1.0),
    )


def tiny_job(d: Path, rows: int = 40) -> tuple[Path, Path]:
    """A 4-feature, 3-class MLP file and ``rows`` random rows with labels in ``d``."""
    model = mlp_file(d / "m.safetensors", input_shape=[4], num_classes=3, hidden=[8])
    rng = np.random.default_rng(0)
    x, y = rng.random((rows, 4), dtype=np.float32), rng.integers(0, 3, rows)
    np.savez(d / "d.npz", x=x, y=y)
    return model, d / "d.npz"
