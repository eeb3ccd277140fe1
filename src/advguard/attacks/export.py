"""Run one attack over a data set in batches and save the adversarial examples (.npz)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard import __version__
from advguard.atomic import atomic_path
from advguard.attacks.registry import build_attack
from advguard.errors import InputError
from advguard.models.base import Classifier


def attack_dataset(
    model: Classifier,
    data: Any,
    out: str | Path,
    *,
    attack: str = "pgd",
    norm: str = "linf",
    epsilon: float = 0.1,
    params: dict[str, Any] | None = None,
    samples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    model_info: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Attack the first ``samples`` samples of ``data``; write ``x_adv``, ``x``, ``y``,
    ``success``, ``adversarial_prediction`` and ``metadata`` (JSON text) to ``out``.

    The file is written atomically (temp file + rename); no pickled objects are stored, so it
    loads with ``np.load(path, allow_pickle=False)``.
    """
    from advguard.attacks.norms import parse_norm

    norm = parse_norm(norm)
    if getattr(data, "modality", None) == "text" or not hasattr(model, "input_shape"):
        raise InputError(
            "text data and text models are attacked through a text threat model: "
            "advguard evaluate --threat-model text-standard (attacks char, word)"
        )
    if tuple(data.input_shape) != tuple(model.input_shape):
        raise InputError(
            f"data shape {tuple(data.input_shape)} does not match the model's "
            f"{tuple(model.input_shape)}"
        )
    a = build_attack(attack, norm=norm, seed=seed, **(params or {}))
    n = len(data) if samples is None else min(samples, len(data))
    x_all, x_adv, success, pred = _attack_batches(a, model, data, n, batch_size, epsilon, progress)
    y_all = np.asarray(data.y[:n])
    meta = {
        "advguard_version": __version__,
        "attack": attack,
        "attack_params": a.params(),
        "norm": norm,
        "epsilon": epsilon,
        "seed": seed,
        "n": int(n),
        "data": {"name": data.name, "source": data.source, "sha256": data.sha256()},
        "model": model_info or {},
        "bounds": list(model.bounds),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        np.savez_compressed(
            tmp,
            x_adv=x_adv,
            x=x_all,
            y=y_all,
            success=success,
            adversarial_prediction=pred,
            metadata=np.array(json.dumps(meta)),
        )
    robust = float(((pred == y_all) & ~success).mean()) if n else 0.0
    return {
        "n": int(n),
        "success_rate": float(success.mean()) if n else 0.0,
        "robust_accuracy": robust,
        "path": str(out),
    }


def _attack_batches(
    a: Any,
    model: Classifier,
    data: Any,
    n: int,
    batch_size: int,
    epsilon: float,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first ``n`` samples attacked batch by batch: inputs, adversarial examples,
    success and the model's predictions on the adversarial examples."""
    xs, advs, succ, preds = [], [], [], []
    if progress is not None:
        progress(0, n)  # show the bar at once: one batch of a long attack can take a while
    for i in range(0, n, batch_size):
        x = torch.as_tensor(data.x[i : min(i + batch_size, n)], dtype=torch.float32)
        y = torch.as_tensor(data.y[i : min(i + batch_size, n)], dtype=torch.long)
        res = a.run(model, x, y, epsilon)
        xs.append(x.numpy())
        advs.append(res.x_adv.cpu().numpy())
        succ.append(res.success.cpu().numpy())
        preds.append(model.predict(res.x_adv))
        if progress is not None:
            progress(min(i + batch_size, n), n)
    return np.concatenate(xs), np.concatenate(advs), np.concatenate(succ), np.concatenate(preds)
