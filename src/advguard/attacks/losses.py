"""Per-sample losses that attacks *maximise*. Each returns a tensor of shape [batch]."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from advguard import _validate as check

LossFn = Callable[[torch.Tensor], torch.Tensor]
LOSSES = ("ce", "margin", "dlr")


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the true class (untargeted: push away from ``y``)."""
    return F.cross_entropy(logits, y, reduction="none")


def ce_targeted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cross-entropy of the target class (targeted: pull towards ``target``)."""
    return -F.cross_entropy(logits, target, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y``: positive iff the sample is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf"))
    return other.amax(dim=1) - z_y


def margin_targeted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``z_t - max_{j != t} z_j``: positive iff the sample is classified as ``target``."""
    return -margin(logits, target)


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), scale-invariant margin loss."""
    zs, idx = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = (idx[:, -1] == y).to(logits.dtype)
    best_other = zs[:, -2] * top_is_y + zs[:, -1] * (1 - top_is_y)
    # with two classes there is no third logit: fall back to the logit spread
    denom = zs[:, -1] - zs[:, -3] if logits.shape[1] >= 3 else (zs[:, -1] - zs[:, 0]).abs()
    return -(z_y - best_other) / (denom + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2)``."""
    zs, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    if logits.shape[1] >= 4:
        denom = zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4])
    else:
        denom = (zs[:, -1] - zs[:, 0]).abs()
    return -(z_y - z_t) / (denom + 1e-12)


def for_goal(loss: str, y: torch.Tensor, targets: torch.Tensor | None = None) -> LossFn:
    """The per-sample loss ``logits -> [batch]`` an attack maximises for its goal.

    ``loss`` is ``"ce"``, ``"margin"`` or ``"dlr"``; with ``targets`` the targeted variant
    (targeted CE, targeted margin, targeted DLR of Croce & Hein 2020) is returned.
    """
    check.choice("loss", loss, LOSSES)
    t = targets
    if loss == "ce":
        return (lambda z: ce(z, y)) if t is None else (lambda z: ce_targeted(z, t))
    if loss == "margin":
        return (lambda z: margin(z, y)) if t is None else (lambda z: margin_targeted(z, t))
    return (lambda z: dlr(z, y)) if t is None else (lambda z: dlr_targeted(z, y, t))
