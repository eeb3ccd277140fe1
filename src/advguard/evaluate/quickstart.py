"""The quickstart job: train a small CNN on built-in digits, attack it, summarise.

This is the first form of the main job (the full evaluation runner builds on it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from advguard import __version__
from advguard.attacks import FGSM, PGD
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import small_cnn

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: the library reports, the caller renders."""


@dataclass
class QuickstartRow:
    epsilon: float
    fgsm_robust_accuracy: float
    pgd_robust_accuracy: float
    pgd_seconds: float


@dataclass
class QuickstartResult:
    clean_accuracy: float
    n_test: int
    train_seconds: float
    rows: list[QuickstartRow] = field(default_factory=list)
    out_dir: str = ""

    def to_dict(self) -> dict:
        return {"advguard_version": __version__, **asdict(self)}


def run_quickstart(
    out_dir: str | Path = "advguard-report",
    *,
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3),
    epochs: int = 15,
    pgd_steps: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
) -> QuickstartResult:
    """Train a CNN on digits (1,400 train / 397 test), attack it with FGSM and PGD-Linf."""
    report = progress or (lambda stage, done, total: None)
    torch.manual_seed(seed)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], torch.tensor(x[1400:]), torch.tensor(y[1400:])

    t0 = time.perf_counter()
    module = fit(
        small_cnn((1, 8, 8), 10), x_tr, y_tr, epochs=epochs, seed=seed,
        progress=lambda e, n, loss: report("train", e, n),
    )
    train_s = time.perf_counter() - t0
    model = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10, bounds=(0.0, 1.0))
    result = QuickstartResult(
        clean_accuracy=model.accuracy(x_te, y_te), n_test=len(y_te), train_seconds=train_s
    )
    for i, eps in enumerate(epsilons):
        fg = FGSM(norm="linf", seed=seed)(model, x_te, y_te, epsilon=eps)
        t1 = time.perf_counter()
        pg = PGD(norm="linf", steps=pgd_steps, seed=seed)(model, x_te, y_te, epsilon=eps)
        result.rows.append(
            QuickstartRow(
                epsilon=eps,
                fgsm_robust_accuracy=1.0 - fg.success.float().mean().item(),
                pgd_robust_accuracy=1.0 - pg.success.float().mean().item(),
                pgd_seconds=time.perf_counter() - t1,
            )
        )
        report("attack", i + 1, len(epsilons))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(out / "model.safetensors"))
    result.out_dir = str(out)
    (out / "quickstart.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
