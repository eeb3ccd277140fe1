"""What every adversarial-example detector is, how it is calibrated and how it is evaluated.

A detector scores inputs (higher = more suspicious). It is *fitted* on benign training data
where it needs statistics (:class:`MahalanobisDetector`), then *calibrated* on held-out benign
data that played no part in training the model or fitting the detector: the threshold is set
so that at most a fraction ``fpr`` of benign inputs is flagged.

Calibration (split-conformal rule). With ``n`` held-out benign scores sorted
``s_(1) <= ... <= s_(n)``, the threshold is ``s_(k)`` with ``k = ceil((n + 1) * (1 - fpr))``
and an input is flagged when its score is strictly above it. If benign inputs are
exchangeable with the calibration set, a new benign input is flagged with probability at most
``1 - k / (n + 1) <= fpr`` (Vovk et al. 2005; Angelopoulos & Bates 2021), whatever the score
distribution: the plain empirical quantile ``s_(ceil(n (1 - fpr)))`` would instead exceed
``fpr`` by up to ``1 / n``. For continuous scores the realised FPR is ``1 - k / (n + 1)`` on
average (between ``fpr - 1 / (n + 1)`` and ``fpr``) and, for a given calibration set, is
Beta-distributed around it with standard deviation about ``sqrt(fpr (1 - fpr) / n)``. The rule
needs ``n >= 1 / fpr - 1`` samples (otherwise ``k > n`` and no finite threshold
guarantees the rate); fewer raise :class:`InputError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from advguard import _validate as check
from advguard.errors import InputError
from advguard.models.base import ArrayLike, Classifier, check_inputs, check_labels

Progress = Callable[[str, int, int], None]

FIXED_FPRS = (0.01, 0.05, 0.10)


def check_fpr(fpr: object) -> float:
    return check.fraction("fpr", fpr, low_open=True, high_open=True)


def conformal_threshold(scores: np.ndarray, fpr: float) -> float:
    """``s_(k)``, ``k = ceil((n + 1)(1 - fpr))``, of benign ``scores`` (see module docstring)."""
    fpr = check_fpr(fpr)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(s)
    if not np.isfinite(s).all():
        raise InputError("benign calibration scores contain NaN or Inf")
    k = math.ceil((n + 1) * (1.0 - fpr) - 1e-9)
    if k > n:
        need = math.ceil(1.0 / fpr - 1.0 - 1e-9)
        raise InputError(
            f"calibrating at fpr={fpr:g} needs at least {need} held-out benign samples, got {n}; "
            "give more samples or a larger fpr"
        )
    return float(s[k - 1])


def is_text_model(model: Any) -> bool:
    """True for a classifier of strings: ``predict_proba(list[str])`` and ``num_classes``, no
    numeric ``input_shape`` (:class:`~advguard.attacks.text.TextClassifier`, a guard's text
    model, :class:`~advguard.models.HttpTextClassifier`)."""
    return (
        not hasattr(model, "input_shape")
        and callable(getattr(model, "predict_proba", None))
        and hasattr(model, "num_classes")
    )


class Detector:
    """Base class. Subclasses set ``name`` / ``needs_fit`` and implement ``_score``.

    ``model`` (any adapter) defines the expected input shape and bounds; inputs are checked
    against them (:class:`InputError` otherwise). A detector that needs only the model's
    probabilities sets ``text_capable`` and implements ``_score_texts``: given a text model
    (:func:`is_text_model`) it scores lists of strings (``takes_text`` is then True).
    """

    name: str = "detector"
    needs_fit: bool = False
    batch_size: int = 512
    differentiable: bool = False  # True: ``_score(x, grad=True)`` keeps the autograd graph
    text_capable: bool = False  # True: can score a text model's strings (``_score_texts``)

    def __init__(self, model: Any) -> None:
        #: True when the detector scores strings through a text model's ``predict_proba``.
        self.takes_text = is_text_model(model)
        if self.takes_text and not self.text_capable:
            raise InputError(
                f"{type(self).__name__} scores numeric inputs; {type(model).__name__} is a text "
                "model (it takes strings): use ConfidenceDetector, which needs only its "
                "probabilities"
            )
        if not self.takes_text:
            for attr in ("input_shape", "bounds", "num_classes", "logits"):
                if not hasattr(model, attr):
                    raise InputError(
                        f"{type(self).__name__} needs a classifier adapter (e.g. "
                        f"TorchClassifier), got {type(model).__name__}"
                    )
        self.model = model
        self.threshold: float | None = None
        self.calibration: dict[str, Any] | None = None
        self.fitted = not self.needs_fit

    # -- inputs -----------------------------------------------------------------
    def _batch(self, x: ArrayLike, what: str = "inputs") -> torch.Tensor:
        t = torch.as_tensor(x)
        if not torch.is_floating_point(t):
            t = t.to(torch.float32)
        t = t.to(device=getattr(self.model, "device", torch.device("cpu")), dtype=torch.float32)
        try:
            check_inputs(self.model, t)
        except InputError as e:
            raise InputError(f"{type(self).__name__}: {what}: {e}") from None
        return t

    def _texts(self, x: Any, what: str = "inputs") -> list[str]:
        from advguard.attacks.text.model import check_texts

        try:
            return check_texts(x, what)
        except InputError as e:
            raise InputError(f"{type(self).__name__}: {e}") from None

    # -- to implement -------------------------------------------------------------
    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Estimate what the score needs from benign data (default: nothing)."""

    def _score(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score_texts(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        """Scores of a batch of strings (``text_capable`` detectors on a text model)."""
        raise NotImplementedError

    def score_tensor(self, x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """Scores of a checked tensor batch; ``grad=True`` gives a differentiable score
        (white-box models, BPDA through non-differentiable squeezers) for adaptive attacks."""
        if not self.fitted:
            raise InputError(f"{type(self).__name__} is not fitted; call fit(x_benign) first")
        if self.takes_text:
            raise InputError(
                f"{type(self).__name__} scores a text model's strings, not tensors; use score()"
            )
        if not grad:
            with torch.no_grad():
                return self._score(x)
        if not self.differentiable:
            raise InputError(
                f"{type(self).__name__} has no differentiable score; attack the guarded model "
                "with black-box attacks (square, hopskipjump) instead"
            )
        return self._score(x, grad=True)  # type: ignore[call-arg]

    # -- public API -----------------------------------------------------------------
    def fit(self, x_benign: ArrayLike, y_benign: ArrayLike | None = None) -> Self:
        """Fit on benign training data (labels where the detector uses them). Returns self."""
        if self.takes_text:  # text-capable detectors need no statistics: check, reset
            texts = self._texts(x_benign, "x_benign")
            if y_benign is not None:
                from advguard.attacks.text.model import check_text_labels

                check_text_labels(y_benign, len(texts), int(self.model.num_classes), "y_benign")
            self.threshold = None
            self.calibration = None
            return self
        x = self._batch(x_benign, "x_benign")
        if len(x) == 0:
            raise InputError(f"{type(self).__name__}.fit needs at least one benign sample")
        y = None
        if y_benign is not None:
            y = torch.as_tensor(y_benign).to(x.device)
            check_labels(self.model, y, len(x), "y_benign")
            y = y.long()
        self._fit(x, y)
        self.fitted = True
        self.threshold = None  # a refit invalidates an earlier calibration
        self.calibration = None
        return self

    def score(self, x: ArrayLike) -> np.ndarray:
        """Suspicion score per sample (float64, higher = more likely adversarial)."""
        if not self.fitted:
            raise InputError(f"{type(self).__name__} is not fitted; call fit(x_benign) first")
        bs = self.batch_size
        if self.takes_text:
            texts = self._texts(x)
            out = [self._score_texts(texts[i : i + bs]) for i in range(0, len(texts), bs)]
        else:
            t = self._batch(x)
            out = [self._score(t[i : i + bs]) for i in range(0, len(t), bs)]
        if not out:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(out).detach().double().cpu().numpy()

    def calibrate(self, x_benign_heldout: ArrayLike, fpr: float = 0.05) -> float:
        """Set ``threshold`` so that at most ``fpr`` of benign inputs are flagged; return it.

        Uses the split-conformal order statistic of the module docstring, so the guarantee
        holds for held-out data (never the data the detector was fitted on).
        """
        fpr = check_fpr(fpr)
        scores = self.score(x_benign_heldout)
        thr = conformal_threshold(scores, fpr)
        self.threshold = thr
        self.calibration = {
            "fpr_target": fpr,
            "n": len(scores),
            "rule": "k = ceil((n + 1) * (1 - fpr)); flag score > s_(k)",
            "fpr_on_calibration_set": float((scores > thr).mean()),
        }
        return thr

    def detect(self, x: ArrayLike) -> np.ndarray:
        """Bool per sample: score above the calibrated threshold."""
        if self.threshold is None:
            raise InputError(
                f"{type(self).__name__} has no threshold; call calibrate(x_benign_heldout, fpr) "
                "first"
            )
        return self.score(x) > self.threshold

    def is_adversarial(self, x: ArrayLike) -> np.ndarray:
        """Same as :meth:`detect`: bool per sample, score strictly above ``threshold``."""
        return self.detect(x)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self).__name__,
            "params": self.params(),
            "threshold": self.threshold,
            "calibration": self.calibration,
        }

    def params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def roc_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney U)."""
    neg = np.asarray(neg, dtype=np.float64).ravel()
    pos = np.asarray(pos, dtype=np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise InputError("ROC-AUC needs at least one benign and one adversarial score")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float) -> float:
    """Best TPR over thresholds whose empirical FPR on ``neg`` is at most ``fpr`` (ROC point)."""
    neg = np.sort(np.asarray(neg, dtype=np.float64).ravel())
    pos = np.asarray(pos, dtype=np.float64).ravel()
    allowed = math.floor(fpr * len(neg) + 1e-9)  # benign samples allowed above the threshold
    thr = neg[len(neg) - allowed - 1] if allowed < len(neg) else -np.inf
    return float((pos > thr).mean())


@dataclass
class DetectorEvaluation:
    """How well a detector separates benign from adversarial inputs.

    ``roc_auc`` and ``tpr_at_fpr`` are threshold-free (the latter reads the ROC curve of these
    samples: thresholds picked on this benign set, an optimistic oracle). ``tpr`` and ``fpr``
    use the detector's calibrated ``threshold`` (None when it is not calibrated): this is what
    a deployment gets. ``x_benign`` must not be the calibration set.
    """

    detector: str
    roc_auc: float
    tpr_at_fpr: dict[str, float]
    threshold: float | None
    tpr: float | None
    fpr: float | None
    n_benign: int
    n_adversarial: int
    mean_score_benign: float
    mean_score_adversarial: float
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_detector(
    detector: Detector, x_benign: ArrayLike, x_adv: ArrayLike
) -> DetectorEvaluation:
    """Score benign and adversarial inputs and summarise (see :class:`DetectorEvaluation`)."""
    s_b = detector.score(x_benign)
    s_a = detector.score(x_adv)
    if len(s_b) == 0 or len(s_a) == 0:
        raise InputError(
            f"evaluate_detector needs benign and adversarial samples, got {len(s_b)} benign "
            f"and {len(s_a)} adversarial (did the attack fail on every sample?)"
        )
    thr = detector.threshold
    return DetectorEvaluation(
        detector=detector.name,
        roc_auc=roc_auc(s_b, s_a),
        tpr_at_fpr={f"{f:g}": tpr_at_fpr(s_b, s_a, f) for f in FIXED_FPRS},
        threshold=thr,
        tpr=None if thr is None else float((s_a > thr).mean()),
        fpr=None if thr is None else float((s_b > thr).mean()),
        n_benign=len(s_b),
        n_adversarial=len(s_a),
        mean_score_benign=float(s_b.mean()),
        mean_score_adversarial=float(s_a.mean()),
        calibration=detector.calibration,
    )


# ---------------------------------------------------------------------------------------------
# adversarial examples for detector evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class AdversarialSet:
    """Successful adversarial examples of a threat model's attacks (the positives).

    ``x_adv[i]`` was made from input ``index[i]`` by attack ``attack[i]`` (the first of the
    cascade that fooled the model). Inputs the model already got wrong are not attacked (they
    are not adversarial), and failed attempts are dropped: ``n_success`` of the
    ``n_attacked`` correctly classified inputs became positives.
    """

    x_adv: np.ndarray
    index: np.ndarray
    attack: list[str]
    epsilon: float
    norm: str
    n_total: int
    n_attacked: int
    n_success: int
    per_attack: dict[str, int]

    @property
    def success_rate(self) -> float:
        return self.n_success / self.n_attacked if self.n_attacked else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "norm": self.norm,
            "n_total": self.n_total,
            "n_attacked": self.n_attacked,
            "n_success": self.n_success,
            "success_rate": self.success_rate,
            "per_attack": dict(self.per_attack),
        }


def adversarial_examples(
    model: Classifier,
    x: ArrayLike,
    y: ArrayLike,
    threat_model: Any,
    *,
    epsilon: float | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> AdversarialSet:
    """Run the attacks of ``threat_model`` (a cascade) on ``(x, y)``; keep the successes.

    ``threat_model`` is a :class:`~advguard.evaluate.threat_model.ThreatModel`, a preset name or
    a YAML path. ``epsilon`` defaults to the largest of its ``epsilons`` and must be one of
    them. Attacks are built with :func:`advguard.attacks.registry.build_attack` (threat-model
    norm, seed and parameters); each attack only sees the inputs no earlier attack fooled.
    ``progress(stage, done, total)`` is called after every batch.
    """
    from advguard.attacks.registry import build_attack

    tm, eps = _untargeted_threat_model(threat_model, epsilon)
    bs = check.positive_int("batch_size", tm.batch_size if batch_size is None else batch_size)

    xt = torch.as_tensor(x)
    xt = (xt if torch.is_floating_point(xt) else xt.float()).detach().cpu().float()
    yt = torch.as_tensor(y).detach().cpu()
    check_inputs(model, xt)
    check_labels(model, yt, len(xt))
    yt = yt.long()
    attacks: Sequence[Any] = [
        build_attack(s.attack, norm=tm.norm, seed=tm.seed, **s.params) for s in tm.attacks
    ]

    pred = torch.as_tensor(model.predict(xt))
    todo = (pred == yt).nonzero().squeeze(1)
    n_attacked = len(todo)
    adv = torch.empty(0, *xt.shape[1:])
    idx_out, adv_out, names, per_attack = _cascade(model, attacks, xt, yt, todo, eps, bs, progress)
    if adv_out:
        adv = torch.cat(adv_out)
        index = torch.cat(idx_out).numpy()
    else:
        index = np.zeros(0, dtype=np.int64)
    return AdversarialSet(
        x_adv=adv.numpy(),
        index=index,
        attack=names,
        epsilon=eps,
        norm=tm.norm,
        n_total=len(xt),
        n_attacked=n_attacked,
        n_success=len(index),
        per_attack=per_attack,
    )


def _untargeted_threat_model(threat_model: Any, epsilon: float | None) -> tuple[Any, float]:
    """The threat model (object, preset or path; untargeted only) and the epsilon to use."""
    from advguard.evaluate.threat_model import ThreatModel, load_threat_model

    if isinstance(threat_model, str | Path):
        tm = load_threat_model(threat_model)
    elif isinstance(threat_model, ThreatModel):
        tm = threat_model
    else:
        raise InputError(
            f"threat_model must be a ThreatModel, a preset name or a YAML path, "
            f"got {type(threat_model).__name__}"
        )
    if tm.goal != "untargeted":
        raise InputError("adversarial_examples supports untargeted threat models only")
    if epsilon is None:
        return tm, max(tm.epsilons)
    eps = float(epsilon)
    if not any(abs(eps - e) < 1e-12 for e in tm.epsilons):
        raise InputError(f"epsilon {epsilon} is not one of the threat model's {tm.epsilons}")
    return tm, eps


def _cascade(
    model: Classifier,
    attacks: Sequence[Any],
    xt: torch.Tensor,
    yt: torch.Tensor,
    todo: torch.Tensor,
    eps: float,
    bs: int,
    progress: Progress | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str], dict[str, int]]:
    """Each attack on the samples no earlier attack fooled: indices, examples, attack names."""
    idx_out: list[torch.Tensor] = []
    adv_out: list[torch.Tensor] = []
    names: list[str] = []
    per_attack: dict[str, int] = {}
    for a in attacks:
        fooled_here: list[torch.Tensor] = []
        for b in range(0, len(todo), bs):
            ib = todo[b : b + bs]
            res = a.run(model, xt[ib], yt[ib], eps)
            ok = res.success.cpu() & res.attacked.cpu()
            if ok.any():
                idx_out.append(ib[ok])
                adv_out.append(res.x_adv.detach().cpu().float()[ok])
                fooled_here.append(ib[ok])
            if progress is not None:
                progress(a.name, min(b + bs, len(todo)), len(todo))
        n_here = int(sum(len(f) for f in fooled_here))
        per_attack[a.name] = per_attack.get(a.name, 0) + n_here
        names += [a.name] * n_here
        if fooled_here:
            done = torch.cat(fooled_here)
            todo = todo[~torch.isin(todo, done)]
    return idx_out, adv_out, names, per_attack
