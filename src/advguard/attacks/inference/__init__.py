"""Privacy attacks: membership inference (LOSS threshold, offline LiRA) and audit metrics."""

from advguard.attacks.inference.membership import (
    MembershipAudit,
    TrainFn,
    audit_membership,
    default_train_fn,
    lira_offline,
    logit_confidence,
    loss_scores,
    reference_scores,
    roc_metrics,
)

__all__ = [
    "MembershipAudit",
    "TrainFn",
    "audit_membership",
    "default_train_fn",
    "lira_offline",
    "logit_confidence",
    "loss_scores",
    "reference_scores",
    "roc_metrics",
]
