"""Membership inference: was this example in the model's training set?

Two attacks, both black-box (they need only the model's scores on the true label):

- **LOSS threshold** (Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine
  Learning: Analyzing the Connection to Overfitting"): score = minus the cross-entropy loss of
  the true label; members have lower loss. One global threshold for all examples.
- **LiRA, offline variant** (Carlini, Chien, Nasr, Song, Terzis, Tramer 2022, "Membership
  Inference Attacks From First Principles", Sec. IV-C and Algorithm 1 without IN models):
  reference ("shadow") models are trained on random subsets of *population* data that does
  not contain the target examples. The statistic is the logit-scaled confidence on the true
  label, ``phi = log(p / (1 - p))``, computed stably from the scores as
  ``z_y - logsumexp(z_{j != y})``. For each target example a Gaussian ``N(mu_out, sigma_out)``
  is fitted to its OUT scores over the reference models; the membership score is the one-sided
  test statistic ``(phi_target - mu_out) / sigma_out`` (larger = more likely a member; a
  monotone transform of the one-sided p-value ``1 - Phi(.)``). With few reference models
  (the paper suggests below 64) the per-example variance is noisy and the *fixed-variance*
  variant uses one global ``sigma_out`` pooled over all examples (``fixed_variance="auto"``
  picks it below 64 reference models).

Metrics follow the paper's advice to report the true-positive rate at low false-positive
rates, not only AUC: TPR at 0.1% and 1% FPR with a Clopper-Pearson interval on the TPR
(the threshold is the one whose empirical FPR on the non-members is at most the target; the
achieved FPR is reported with its own interval), and the AUC with a percentile bootstrap
interval (members and non-members resampled separately).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from advguard.errors import InputError
from advguard.models.base import Classifier
from advguard.stats import proportion

SCHEMA_VERSION = "1.0"
DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)


class TrainFn(Protocol):
    def __call__(self, x: np.ndarray, y: np.ndarray, seed: int) -> Classifier:
        """Train a fresh reference model on ``(x, y)`` with ``seed``; return it as a Classifier."""
        ...


Progress = Callable[[str, int, int], None]


def _check_xy(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y)
    if xa.ndim < 2 or len(xa) == 0:
        raise InputError(f"{what}: need a non-empty batch of inputs, got shape {xa.shape}")
    if ya.ndim != 1 or len(ya) != len(xa):
        raise InputError(f"{what}: need one integer label per input, got {ya.shape} for {len(xa)}")
    if not np.issubdtype(ya.dtype, np.integer):
        if not np.all(np.isfinite(ya)) or not np.all(ya == np.round(ya)):
            raise InputError(f"{what}: labels must be integers")
        ya = ya.astype(np.int64)
    return xa, ya.astype(np.int64)


def _log_probs(model: Classifier, x: np.ndarray) -> np.ndarray:
    z = torch.as_tensor(np.asarray(model.predict_logits(x)), dtype=torch.float64)
    if z.ndim != 2 or not torch.isfinite(z).all():
        raise InputError("the model returned non-finite or wrongly shaped scores")
    return torch.log_softmax(z, dim=1).numpy()


def _check_labels(model: Classifier, y: np.ndarray, what: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= model.num_classes):
        raise InputError(
            f"{what}: labels must lie in 0..{model.num_classes - 1}, got {y.min()}..{y.max()}"
        )


def loss_scores(model: Classifier, x: Any, y: Any) -> np.ndarray:
    """LOSS attack score per example: ``log p(y | x)`` (= minus the cross-entropy; higher =
    more likely a member)."""
    xa, ya = _check_xy(x, y, "loss_scores")
    _check_labels(model, ya, "loss_scores")
    lp = _log_probs(model, xa)
    return lp[np.arange(len(ya)), ya]


def logit_confidence(model: Classifier, x: Any, y: Any) -> np.ndarray:
    """LiRA's statistic ``phi = log(p_y / (1 - p_y))``, computed without cancellation as
    ``log p_y - logsumexp_{j != y} log p_j`` (finite even when ``p_y`` rounds to 1)."""
    xa, ya = _check_xy(x, y, "logit_confidence")
    _check_labels(model, ya, "logit_confidence")
    lp = torch.from_numpy(_log_probs(model, xa))
    idx = torch.arange(len(ya))
    yt = torch.from_numpy(ya)
    own = lp[idx, yt]
    others = lp.clone()
    others[idx, yt] = -torch.inf
    return (own - torch.logsumexp(others, dim=1)).numpy()


def default_train_fn(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> TrainFn:
    """A :data:`TrainFn` training a zoo architecture (``mlp`` or ``small_cnn``) with
    :func:`advguard.models.fit.fit`. Reference models should be trained like the target
    (same architecture and recipe), so match ``epochs``/``lr`` to the target's training."""
    from advguard.models import TorchClassifier
    from advguard.models.fit import fit
    from advguard.models.zoo import mlp, small_cnn

    builders: dict[str, Callable[..., torch.nn.Module]] = {"mlp": mlp, "small_cnn": small_cnn}
    if arch not in builders:
        raise InputError(f"arch must be one of {', '.join(builders)}, got {arch!r}")
    shape = tuple(int(d) for d in input_shape)

    def train(x: np.ndarray, y: np.ndarray, seed: int) -> Classifier:
        torch.manual_seed(seed)
        module = builders[arch](shape, num_classes)
        fit(module, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        return TorchClassifier(module, input_shape=shape, num_classes=num_classes, bounds=bounds)

    return train


def reference_scores(
    train_fn: TrainFn,
    population_x: Any,
    population_y: Any,
    targets_x: Any,
    targets_y: Any,
    *,
    n_shadows: int = 8,
    subset_size: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """OUT scores ``phi`` of the target examples under ``n_shadows`` reference models, each
    trained on a random subset (default: half) of the population; shape ``(n_shadows, n)``.

    The population must not contain the target examples (offline LiRA); exact duplicates of a
    target input are refused."""
    px, py = _check_xy(population_x, population_y, "population")
    tx, ty = _check_xy(targets_x, targets_y, "targets")
    if n_shadows < 2:
        raise InputError(f"n_shadows must be >= 2 (LiRA fits a variance), got {n_shadows}")
    size = len(px) // 2 if subset_size is None else int(subset_size)
    if not 1 <= size <= len(px):
        raise InputError(f"subset_size must be in 1..{len(px)}, got {size}")
    if px.shape[1:] != tx.shape[1:]:
        raise InputError(f"population inputs {px.shape[1:]} differ from targets {tx.shape[1:]}")
    pop_keys = {row.tobytes() for row in px.reshape(len(px), -1)}
    overlap = sum(row.tobytes() in pop_keys for row in tx.reshape(len(tx), -1))
    if overlap:
        raise InputError(
            f"{overlap} target example(s) also appear in the population; offline reference "
            "models must be trained without the target examples"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((n_shadows, len(tx)), dtype=np.float64)
    for s in range(n_shadows):
        idx = rng.choice(len(px), size=size, replace=False)
        model = train_fn(px[idx], py[idx], seed + 1000 + s)
        out[s] = logit_confidence(model, tx, ty)
        if progress is not None:
            progress("shadows", s + 1, n_shadows)
    return out


def lira_offline(
    target_phi: np.ndarray,
    out_phi: np.ndarray,
    *,
    fixed_variance: bool | Literal["auto"] = "auto",
    min_std: float = 1e-3,
) -> np.ndarray:
    """Offline LiRA score per example: ``(phi - mu_out) / sigma_out`` (one-sided test against
    the OUT Gaussian; larger = member). ``out_phi`` is ``(n_shadows, n)``."""
    t = np.asarray(target_phi, dtype=np.float64)
    o = np.asarray(out_phi, dtype=np.float64)
    if t.ndim != 1 or o.ndim != 2 or o.shape[1] != t.shape[0]:
        raise InputError(
            f"need target_phi (n,) and out_phi (n_shadows, n), got {t.shape}, {o.shape}"
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(o))):
        raise InputError("LiRA scores must be finite")
    if o.shape[0] < 2:
        raise InputError("LiRA needs at least 2 reference models to estimate the OUT variance")
    fixed = o.shape[0] < 64 if fixed_variance == "auto" else bool(fixed_variance)
    mu = o.mean(axis=0)
    if fixed:
        # pooled within-example standard deviation (one sigma for all examples)
        dof = o.shape[0] - 1
        sigma = np.full_like(
            mu, math.sqrt(float(((o - mu) ** 2).sum(axis=0).sum()) / (dof * o.shape[1]))
        )
    else:
        sigma = o.std(axis=0, ddof=1)
    return (t - mu) / np.maximum(sigma, min_std)


def _auc(member: np.ndarray, non: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(member)), np.zeros(len(non))]
    return float(roc_auc_score(labels, np.r_[member, non]))


def roc_metrics(
    member_scores: Any,
    non_member_scores: Any,
    *,
    fprs: Sequence[float] = DEFAULT_FPRS,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_points: int = 400,
) -> dict[str, Any]:
    """AUC (with a percentile bootstrap interval), TPR at each FPR in ``fprs`` (Clopper-Pearson
    interval on the TPR at the chosen threshold) and the ROC curve (thinned to ``max_points``)."""
    from sklearn.metrics import roc_curve

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(non_member_scores, dtype=np.float64)
    if m.ndim != 1 or n.ndim != 1 or len(m) == 0 or len(n) == 0:
        raise InputError("need at least one member and one non-member score")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise InputError("membership scores must be finite")
    auc = _auc(m, n)
    rng = np.random.default_rng(seed)
    boots = [
        _auc(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))])
        for _ in range(int(bootstrap))
    ]
    alpha = (1 - confidence) / 2
    auc_ci = (
        [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))] if boots else None
    )
    ns = np.sort(n)[::-1]
    at_fpr = []
    for f in fprs:
        if not 0 < f < 1:
            raise InputError(f"FPR levels must be in (0, 1), got {f}")
        k_fp = math.floor(f * len(n))  # false positives allowed
        # threshold: strictly above the (k_fp+1)-th largest non-member score
        thr = float(ns[k_fp]) if k_fp < len(ns) else -math.inf
        tp = int((m > thr).sum())
        fp = int((n > thr).sum())
        at_fpr.append(
            {
                "fpr_target": f,
                "threshold": thr,
                "tpr": proportion(tp, len(m), confidence).model_dump(),
                "fpr": proportion(fp, len(n), confidence).model_dump(),
                "resolvable": len(n) >= math.ceil(1 / f),
            }
        )
    fpr_c, tpr_c, _ = roc_curve(np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n])
    if len(fpr_c) > max_points:
        keep = np.unique(np.r_[np.linspace(0, len(fpr_c) - 1, max_points).astype(int)])
        fpr_c, tpr_c = fpr_c[keep], tpr_c[keep]
    return {
        "auc": auc,
        "auc_ci": auc_ci,
        "auc_interval": f"percentile bootstrap, {int(bootstrap)} resamples",
        "confidence": confidence,
        "at_fpr": at_fpr,
        "roc": {"fpr": fpr_c.tolist(), "tpr": tpr_c.tolist()},
        "n_members": len(m),
        "n_non_members": len(n),
    }


@dataclass
class MembershipAudit:
    """Result of :func:`audit_membership`: per-attack metrics plus the raw scores."""

    attacks: dict[str, dict[str, Any]]
    config: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    reference_phi: np.ndarray | None = None
    """OUT scores ``(n_shadows, n_members + n_non_members)`` of the reference models (members
    first). They do not depend on the target, so other models trained on the same members can
    be scored against them with :func:`lira_offline` without training new reference models."""

    def tpr_at(self, attack: str, fpr: float) -> float:
        for row in self.attacks[attack]["at_fpr"]:
            if math.isclose(row["fpr_target"], fpr):
                return float(row["tpr"]["value"])
        raise KeyError(f"{attack}: no TPR at FPR {fpr}")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "config": self.config, "attacks": self.attacks}


def audit_membership(
    model: Classifier,
    members: tuple[Any, Any],
    non_members: tuple[Any, Any],
    *,
    population: tuple[Any, Any] | None = None,
    train_fn: TrainFn | None = None,
    arch: str = "mlp",
    n_shadows: int = 8,
    shadow_epochs: int = 100,
    shadow_lr: float = 1e-3,
    subset_size: int | None = None,
    fixed_variance: bool | Literal["auto"] = "auto",
    fprs: Sequence[float] = DEFAULT_FPRS,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> MembershipAudit:
    """Run the LOSS attack and, given ``population`` data, offline LiRA against ``model``.

    ``members``/``non_members`` are ``(x, y)`` of known training and non-training examples.
    Reference models are built by ``train_fn`` or, by default, a zoo ``arch`` trained with
    :func:`advguard.models.fit.fit` for ``shadow_epochs``. ``subset_size`` defaults to the
    number of members (the target's training-set size, as far as the auditor knows it).
    """
    mx, my = _check_xy(*members, "members")
    nx, ny = _check_xy(*non_members, "non-members")
    attacks: dict[str, dict[str, Any]] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    sm, sn = loss_scores(model, mx, my), loss_scores(model, nx, ny)
    scores["loss"] = {"members": sm, "non_members": sn}
    attacks["loss"] = roc_metrics(sm, sn, fprs=fprs, bootstrap=bootstrap, seed=seed)
    attacks["loss"]["reference"] = "Yeom et al. 2018"
    config: dict[str, Any] = {
        "n_members": len(mx),
        "n_non_members": len(nx),
        "fprs": list(fprs),
        "seed": seed,
    }
    if population is not None:
        px, py = _check_xy(*population, "population")
        size = len(mx) if subset_size is None else int(subset_size)
        size = min(size, len(px))
        fn = train_fn or default_train_fn(
            arch, model.input_shape, model.num_classes, epochs=shadow_epochs, lr=shadow_lr,
            bounds=model.bounds,
        )  # fmt: skip
        tx = np.concatenate([mx, nx])
        ty = np.concatenate([my, ny])
        out_phi = reference_scores(
            fn, px, py, tx, ty, n_shadows=n_shadows, subset_size=size, seed=seed,
            progress=progress,
        )  # fmt: skip
        phi = np.concatenate([logit_confidence(model, mx, my), logit_confidence(model, nx, ny)])
        fixed = n_shadows < 64 if fixed_variance == "auto" else bool(fixed_variance)
        lira = lira_offline(phi, out_phi, fixed_variance=fixed)
        lm, ln = lira[: len(mx)], lira[len(mx) :]
        scores["lira_offline"] = {"members": lm, "non_members": ln}
        attacks["lira_offline"] = roc_metrics(lm, ln, fprs=fprs, bootstrap=bootstrap, seed=seed)
        attacks["lira_offline"]["reference"] = "Carlini et al. 2022 (offline)"
        config.update(
            {
                "n_shadows": n_shadows,
                "shadow_subset_size": size,
                "n_population": len(px),
                "fixed_variance": fixed,
                "shadow_trainer": "user train_fn" if train_fn else f"zoo:{arch}",
                "shadow_epochs": None if train_fn else shadow_epochs,
            }
        )
    ref = out_phi if population is not None else None
    return MembershipAudit(attacks=attacks, config=config, scores=scores, reference_phi=ref)
