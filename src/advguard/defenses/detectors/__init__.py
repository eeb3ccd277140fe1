"""Adversarial-example detectors: fit on benign data, calibrate a threshold, flag inputs.

Every detector has ``fit(x_benign, y_benign=None)``, ``score(x)`` (higher = more
suspicious), ``calibrate(x_benign_heldout, fpr)`` (split-conformal threshold) and
``detect(x)``. :func:`save_detector` / :func:`load_detector` store a calibrated detector
as JSON + safetensors (no pickle). :func:`evaluate_detector` measures ROC-AUC and TPR at fixed FPRs;
:func:`adversarial_examples` produces the positives with a threat model's attacks.
None of them survives an adaptive attacker on its own: see docs/transforms-and-detectors.md.
"""

from advguard.defenses.detectors.base import (
    AdversarialSet,
    Detector,
    DetectorEvaluation,
    adversarial_examples,
    conformal_threshold,
    evaluate_detector,
    roc_auc,
    tpr_at_fpr,
)
from advguard.defenses.detectors.guarded import DetectorGuardedClassifier
from advguard.defenses.detectors.mahalanobis import MahalanobisDetector
from advguard.defenses.detectors.persist import (
    calibrate_detector,
    load_detector,
    model_digest,
    read_detector_info,
    save_detector,
)
from advguard.defenses.detectors.scores import (
    ConfidenceDetector,
    DisagreementDetector,
    FeatureSqueezingDetector,
)

__all__ = [
    "AdversarialSet",
    "ConfidenceDetector",
    "Detector",
    "DetectorEvaluation",
    "DetectorGuardedClassifier",
    "DisagreementDetector",
    "FeatureSqueezingDetector",
    "MahalanobisDetector",
    "adversarial_examples",
    "calibrate_detector",
    "conformal_threshold",
    "evaluate_detector",
    "load_detector",
    "model_digest",
    "read_detector_info",
    "roc_auc",
    "save_detector",
    "tpr_at_fpr",
]
