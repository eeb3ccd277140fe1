"""Shared fixtures: a small CNN trained once per session on scikit-learn's digits."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import small_cnn

# Tests run in two xdist workers on two cores: one torch thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _advguard_loggers_enabled() -> None:
    """import-linter's run (tests/test_architecture.py) configures logging with
    ``disable_existing_loggers``, which silences advguard's loggers for every later test in
    the same worker; tests that read logs (caplog) must not depend on the order."""
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("advguard") and isinstance(lg, logging.Logger):
            lg.disabled = False
            # `advguard gameday` quiets advguard.guard for its process (level ERROR); a CLI
            # test of it must not silence later tests in the worker. setLevel also clears
            # every logger's cached level decisions.
            lg.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); images (N, 1, 8, 8) float32 in [0, 1]."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="session")
def digits_module(digits_split) -> torch.nn.Module:
    x_tr, y_tr, _, _ = digits_split
    torch.manual_seed(0)  # the initial weights too, whatever ran before in this worker
    return fit(small_cnn((1, 8, 8), 10), x_tr, y_tr, epochs=15, seed=0)


@pytest.fixture()
def digits_model(digits_module) -> TorchClassifier:
    """A fresh adapter (fresh query counter) around the shared trained CNN (~97% clean)."""
    return TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture()
def digits_eval(digits_split, digits_model) -> tuple[torch.Tensor, torch.Tensor]:
    """200 correctly classified test samples (x, y) as tensors."""
    _, _, x_te, y_te = digits_split
    x, y = torch.tensor(x_te), torch.tensor(y_te)
    ok = torch.as_tensor(digits_model.predict(x) == y_te)
    return x[ok][:200], y[ok][:200]
