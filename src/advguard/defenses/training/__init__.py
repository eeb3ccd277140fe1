"""Adversarial training: PGD-AT, TRADES and fast adversarial training (with
catastrophic-overfitting detection), epsilon ramp-up, early stopping on held-out
robust accuracy, resumable runs, safetensors checkpoints and a JSON training manifest;
and differentially private training (DP-SGD through Opacus, extra ``privacy``).

Modules: ``trainer`` (:class:`TrainConfig`, :func:`train`, the :class:`Trainer`),
``strategies`` (the methods: ``perturb`` + ``loss``), ``resume`` (the resume state),
``private`` (DP-SGD), ``monitor`` (per-class loss drift between manifests) and ``_common``
(helpers shared inside this package).

>>> from advguard.defenses.training import adversarial_train
>>> res = adversarial_train(module, x, y, method="pgd-at", epsilon=0.3, epochs=10,
...                         out_dir="runs/at")  # doctest: +SKIP
"""

from advguard.defenses.training.monitor import compare_manifests
from advguard.defenses.training.private import (
    ACCOUNTANTS,
    DP_MANIFEST_SCHEMA,
    dp_train,
    holdout_split,
)
from advguard.defenses.training.strategies import (
    METHODS,
    STRATEGIES,
    fgsm_perturb,
    pgd_perturb,
    trades_perturb,
)
from advguard.defenses.training.trainer import (
    CHECKPOINT_NAME,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    TrainConfig,
    Trainer,
    TrainResult,
    adversarial_train,
    data_sha256,
    detect_catastrophic_overfitting,
    load_manifest,
    load_trainable,
    train,
)

__all__ = [
    "ACCOUNTANTS",
    "CHECKPOINT_NAME",
    "DP_MANIFEST_SCHEMA",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "METHODS",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "adversarial_train",
    "compare_manifests",
    "data_sha256",
    "detect_catastrophic_overfitting",
    "dp_train",
    "fgsm_perturb",
    "holdout_split",
    "load_manifest",
    "load_trainable",
    "pgd_perturb",
    "trades_perturb",
    "train",
]
