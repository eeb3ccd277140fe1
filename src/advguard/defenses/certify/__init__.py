"""Certified robustness: randomized smoothing (L2) and interval bound propagation (Linf).

A certificate is a proof (IBP) or a high-probability statement (smoothing) that no
perturbation within a radius changes the prediction -- unlike an attack, which can only show
that a perturbation exists. See docs/certification.md.
"""

from advguard.defenses.certify.ibp import (
    flatten_layers,
    ibp_bounds,
    ibp_certify,
    ibp_train,
    margin_lower_bounds,
)
from advguard.defenses.certify.report import (
    CertificationReport,
    CertificationRun,
    certify_dataset,
    load_certification,
)
from advguard.defenses.certify.smoothing import (
    ABSTAIN,
    CertifyResult,
    SmoothedClassifier,
    certified_accuracy_curve,
    lower_confidence_bound,
    train_with_noise,
)

__all__ = [
    "ABSTAIN",
    "CertificationReport",
    "CertificationRun",
    "CertifyResult",
    "SmoothedClassifier",
    "certified_accuracy_curve",
    "certify_dataset",
    "flatten_layers",
    "ibp_bounds",
    "ibp_certify",
    "ibp_train",
    "load_certification",
    "lower_confidence_bound",
    "margin_lower_bounds",
    "train_with_noise",
]
