"""Black-box transfer attacks (MITRE ATLAS AML.T0043.002, Black-Box Transfer).

A real attacker without gradients often trains a *surrogate* model, crafts adversarial
examples on it with a white-box attack, and sends them to the target, hoping they
transfer (Papernot et al. 2017, "Practical Black-Box Attacks against Machine Learning";
Tramer et al. 2018, "Ensemble Adversarial Training", for surrogate ensembles)::

    surrogate, info = train_surrogate(x_pub, target=model, query_budget=1000,
                                      input_shape=(1, 8, 8), num_classes=10, bounds=(0, 1))
    result = TransferAttack(surrogates=[surrogate])(model, x, y, epsilon=0.2)
    result.success                 # checked on the target
    result.info["transfer_rate"]   # share of surrogate-fooling examples that fool the target

or, as a threat-model file would configure it, lazily (the surrogates are trained on the
first call, once the target is known, and cached on the instance)::

    TransferAttack(surrogate_data="digits", labels="target", query_budget=1000, ensemble=2)

The target is only queried (for labels when ``labels="target"``, for the agreement
measurement, and by the base class for the clean prediction and the final success
check), so any adapter works, including black-box ``SklearnClassifier``/``OnnxClassifier``.

Early stopping: advguard's PGD returns the first iterate that fools the model it attacks.
On a surrogate that iterate sits just past the surrogate's decision boundary and transfers
poorly (on digits at Linf 0.2: 16-50% of the target fooled, against 86-93% when every step
is run). With ``base="pgd"`` the transfer attack therefore runs every PGD step on the
surrogate (``early_stop=False``, the default); other base attacks run unchanged.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from advguard import _validate as check
from advguard.attacks.base import Attack, AttackCall, AttackResult, RunResult
from advguard.attacks.evasion.pgd import PGD
from advguard.attacks.randomness import SampleRandom
from advguard.errors import InputError
from advguard.models.base import (
    Classifier,
    ClassifierBase,
    LossFn,
    check_inputs,
    is_white_box,
)
from advguard.models.torch_model import Normalize, TorchClassifier

if TYPE_CHECKING:  # the registry imports this module
    from advguard.attacks.registry import SuiteAttack

ARCHITECTURES = ("auto", "small_cnn", "mlp")
LABEL_SOURCES = ("data", "target")
COMBINE = ("logits", "log_probs")
MIN_QUERY_BUDGET = 10
"""Fewer labelled samples than this cannot train a meaningful surrogate."""

Progress = Callable[[int, int, float], None]


# -- surrogate training ------------------------------------------------------------------------
def resolve_architecture(architecture: str, input_shape: Sequence[int]) -> str:
    """``"auto"`` is ``small_cnn`` for ``(C, H, W)`` inputs with ``H, W >= 8``, else ``mlp``."""
    if architecture not in ARCHITECTURES:
        raise InputError(
            f"unknown surrogate architecture {architecture!r}; "
            f"use one of {', '.join(ARCHITECTURES)}"
        )
    shape = tuple(int(d) for d in input_shape)
    is_image = len(shape) == 3 and shape[1] >= 8 and shape[2] >= 8
    if architecture == "auto":
        return "small_cnn" if is_image else "mlp"
    if architecture == "small_cnn" and len(shape) != 3:
        raise InputError(
            f"architecture 'small_cnn' needs image inputs (channels, height, width), got "
            f"input_shape {shape}; use architecture='mlp' (or 'auto')"
        )
    return architecture


def _build_module(architecture: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from advguard.models.zoo import mlp, small_cnn

    if architecture == "small_cnn":
        return small_cnn(input_shape, num_classes)
    return mlp(input_shape, num_classes)


def _as_array(x: Any, what: str) -> np.ndarray:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{what} must be an array of numbers: {e}") from None
    return t.detach().cpu().to(torch.float32).numpy()


def _check_spec(
    x: np.ndarray,
    target: Any,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    bounds: tuple[float, float] | None,
) -> tuple[tuple[int, ...], int | None, tuple[float, float]]:
    """Resolve the surrogate's input spec from the arguments and the target; they must agree."""
    data_shape = tuple(int(d) for d in x.shape[1:])
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else data_shape
    if data_shape != shape:
        raise InputError(
            f"surrogate data samples have shape {data_shape} but input_shape is {shape}"
        )
    if target is not None:
        t_shape = tuple(int(d) for d in target.input_shape)
        if shape != t_shape:
            raise InputError(
                f"surrogate input shape {shape} does not match the target's input_shape "
                f"{t_shape}; the surrogate must take the same inputs as the target "
                "(reshape the data, or use data of the target's modality)"
            )
        if num_classes is not None and int(num_classes) != int(target.num_classes):
            raise InputError(
                f"surrogate num_classes={num_classes} does not match the target's "
                f"{target.num_classes} classes"
            )
        num_classes = int(target.num_classes)
        t_bounds = (float(target.bounds[0]), float(target.bounds[1]))
        if bounds is not None and not np.allclose(
            [float(bounds[0]), float(bounds[1])], t_bounds, rtol=0, atol=1e-6
        ):
            raise InputError(
                f"surrogate bounds {tuple(bounds)} do not match the target's bounds {t_bounds}; "
                "scale the surrogate data to the target's input range"
            )
        bounds = t_bounds
    if bounds is None:
        raise InputError("give the surrogate's bounds=(low, high) (or a target to take them from)")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"bounds must be finite with low < high, got {bounds}")
    return shape, (int(num_classes) if num_classes is not None else None), (lo, hi)


class _Spec:
    """Input spec used to bounds-check data (``check_inputs`` wants an adapter-like object)."""

    def __init__(self, shape: tuple[int, ...], bounds: tuple[float, float]) -> None:
        self.input_shape = shape
        self.bounds = bounds


def _label_data(
    x: Any,
    y: Any,
    *,
    target: Any,
    query_budget: int | None,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    bounds: tuple[float, float] | None,
    holdout: float,
    seed: int,
) -> dict[str, Any]:
    """Validate, label (with the target's answers when ``y`` is None) and split the data."""
    if query_budget is not None:
        query_budget = check.queries("query_budget", query_budget, low=MIN_QUERY_BUDGET)
    check.number("holdout", holdout, low=0.0, high=0.5)
    if target is not None and not callable(getattr(target, "predict", None)):
        raise InputError(
            f"target must be an advguard classifier adapter, got {type(target).__name__}"
        )
    xa = _as_array(x, "surrogate data x")
    if xa.ndim < 2:
        raise InputError(f"surrogate data x must be a batch (N, ...), got shape {xa.shape}")
    shape, k, bnds = _check_spec(xa, target, input_shape, num_classes, bounds)
    check_inputs(_Spec(shape, bnds), torch.from_numpy(xa))  # type: ignore[arg-type]
    n_avail = len(xa)
    notes: list[str] = []
    xa, ya, n_used, spent, label_source = _labels(xa, y, target, query_budget, notes)
    k, classes_seen = _check_classes(ya, k, notes)
    perm = np.random.default_rng(seed).permutation(n_used)
    n_hold = round(holdout * n_used)
    if holdout > 0 and n_used - n_hold < MIN_QUERY_BUDGET // 2:
        n_hold = 0
    hold, train = perm[:n_hold], perm[n_hold:]
    agree_x, agree_y, agree_spent = _agreement_set(xa, ya, hold, target, label_source, query_budget)
    return {
        "x": xa,
        "y": ya,
        "train": train,
        "hold": hold,
        "agree_x": agree_x,
        "agree_y": agree_y,
        "input_shape": shape,
        "num_classes": k,
        "bounds": bnds,
        "device": getattr(target, "device", torch.device("cpu")),
        "info": {
            "labels": label_source,
            "samples_available": n_avail,
            "samples_used": int(n_used),
            "truncated_to_budget": bool(label_source == "target" and n_used < n_avail),
            "query_budget": query_budget,
            "train_samples": len(train),
            "holdout_samples": int(n_hold),
            "classes_seen": classes_seen,
            "target_queries": int(spent + agree_spent),
            "target_queries_labels": int(spent),
            "target_queries_agreement": int(agree_spent),
            "notes": notes,
        },
    }


def _labels(
    xa: np.ndarray, y: Any, target: Any, query_budget: int | None, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, int, int, str]:
    """The inputs used, their labels (``y``, or the target's answers within the budget), how
    many, the target queries spent and where the labels came from."""
    n_avail = len(xa)
    if y is None:
        if target is None:
            raise InputError(
                "give labels y or a target to label the data with its own answers "
                "(train_surrogate(x, target=model, ...))"
            )
        n_used = n_avail if query_budget is None else min(query_budget, n_avail)
        if n_used < MIN_QUERY_BUDGET:
            raise InputError(
                f"only {n_used} surrogate training sample(s); need at least {MIN_QUERY_BUDGET}"
            )
        if n_used < n_avail:
            notes.append(
                f"used only the first {n_used} of {n_avail} samples (query_budget={query_budget})"
            )
        xa = xa[:n_used]
        f0 = target.queries.forward
        ya = np.asarray(target.predict(xa), dtype=np.int64)
        spent = target.queries.forward - f0
        label_source = "target"
    else:
        ya_t = torch.as_tensor(y)
        if ya_t.ndim != 1 or len(ya_t) != n_avail or torch.is_floating_point(ya_t):
            raise InputError(
                f"surrogate labels y must be a 1-D integer array of length {n_avail}, got "
                f"shape {tuple(ya_t.shape)} and dtype {ya_t.dtype}"
            )
        ya = ya_t.cpu().numpy().astype(np.int64)
        n_used, spent, label_source = n_avail, 0, "data"
        if n_used < MIN_QUERY_BUDGET:
            raise InputError(
                f"only {n_used} surrogate training sample(s); need at least {MIN_QUERY_BUDGET}"
            )
    return xa, ya, n_used, spent, label_source


def _check_classes(ya: np.ndarray, k: int | None, notes: list[str]) -> tuple[int, int]:
    """The number of classes (``max(y) + 1`` by default) and how many the labels cover."""
    if k is None:
        k = int(ya.max()) + 1 if len(ya) else 0
    if len(ya) and (ya.min() < 0 or ya.max() >= k):
        raise InputError(f"surrogate labels must lie in [0, {k - 1}], got [{ya.min()}, {ya.max()}]")
    if k < 2:
        raise InputError(f"a surrogate needs at least 2 classes, got num_classes={k}")
    classes_seen = len(np.unique(ya))
    if classes_seen < 2:
        raise InputError(
            f"all {len(ya)} surrogate training labels are class {int(ya[0])}; a surrogate "
            "cannot learn from one class (use more or more varied data)"
        )
    if classes_seen < k:
        notes.append(f"the training labels cover only {classes_seen} of {k} classes")
    return k, classes_seen


def _agreement_set(
    xa: np.ndarray,
    ya: np.ndarray,
    hold: np.ndarray,
    target: Any,
    label_source: str,
    query_budget: int | None,
) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """Held-out inputs with the target's answers (to measure agreement) and their cost."""
    n_hold = len(hold)
    agree_x = agree_y = None
    agree_spent = 0
    if n_hold and target is not None:
        agree_x = xa[hold]
        if label_source == "target":
            agree_y = ya[hold]  # already paid for
        else:
            # agreement with the target costs queries; stay within the budget
            m = n_hold if query_budget is None else min(n_hold, query_budget)
            agree_x = agree_x[:m]
            f0 = target.queries.forward
            agree_y = np.asarray(target.predict(agree_x), dtype=np.int64) if m else None
            agree_spent = target.queries.forward - f0
    return agree_x, agree_y, agree_spent


def _fit_member(
    data: dict[str, Any],
    *,
    architecture: str,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    progress: Progress | None,
) -> tuple[TorchClassifier, dict[str, Any]]:
    from advguard.models.fit import fit

    shape, k, (lo, hi) = data["input_shape"], data["num_classes"], data["bounds"]
    arch = resolve_architecture(architecture, shape)
    torch.manual_seed(seed)  # weight initialisation
    module = _build_module(arch, shape, k)
    pre = Normalize(lo, hi - lo)  # raw bounds -> [0, 1], differentiable, part of the model
    x_tr, y_tr = data["x"][data["train"]], data["y"][data["train"]]
    fit(module, x_tr, y_tr, epochs=epochs, batch_size=batch_size, lr=lr, preprocess=pre,
        seed=seed, device=data["device"], progress=progress)  # fmt: skip
    model = TorchClassifier(
        module,
        input_shape=shape,
        num_classes=k,
        bounds=(lo, hi),
        preprocess=pre,
        device=data["device"],
    )
    info: dict[str, Any] = {"architecture": arch, "epochs": epochs, "seed": seed}
    hold = data["hold"]
    info["holdout_accuracy"] = (
        float((model.predict(data["x"][hold]) == data["y"][hold]).mean()) if len(hold) else None
    )
    if data["agree_y"] is not None and len(data["agree_y"]):
        info["agreement"] = float((model.predict(data["agree_x"]) == data["agree_y"]).mean())
    else:
        info["agreement"] = None
    model.queries.reset()  # the surrogate's own counter starts fresh for the attack
    return model, info


def _check_training_args(epochs: Any, seed: Any, batch_size: Any, lr: Any) -> None:
    check.steps("epochs", epochs)
    check.integer("seed", seed)
    check.positive_int("batch_size", batch_size)
    check.positive("lr", lr)


def train_surrogate(
    x: Any,
    y: Any = None,
    *,
    target: Any = None,
    query_budget: int | None = None,
    architecture: str = "auto",
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
    epochs: int = 10,
    seed: int = 0,
    holdout: float = 0.2,
    batch_size: int = 64,
    lr: float = 1e-3,
    progress: Progress | None = None,
) -> tuple[TorchClassifier, dict[str, Any]]:
    """Train a white-box surrogate of ``target`` (or a plain model on labelled data).

    Labels come from ``y`` when given, otherwise from the target's own answers
    (``target.predict`` on ``x``; any adapter, black-box ones included). The target is
    queried at most ``query_budget`` times: only the first ``query_budget`` samples of
    ``x`` are used then (``info["notes"]`` says so). A seeded ``holdout`` share of the
    used samples is kept out of training to measure ``info["agreement"]``: the share of
    held-out samples on which the surrogate predicts what the target predicts (with
    ``y`` labels this costs up to ``holdout * len(x)`` extra target queries, within the
    budget). ``input_shape``, ``num_classes`` and ``bounds`` default to the target's
    (and must match it when both are given); without a target, ``bounds`` is required.

    ``architecture``: ``"small_cnn"``, ``"mlp"`` or ``"auto"`` (``small_cnn`` for
    ``(C, H, W)`` inputs with ``H, W >= 8``, else ``mlp``). Inputs are mapped from
    ``bounds`` to ``[0, 1]`` inside the surrogate. ``progress(epoch, epochs, loss)``.

    Returns ``(surrogate, info)``; ``info["target_queries"]`` is the number of target
    queries spent (counted on ``target.queries``).
    """
    _check_training_args(epochs, seed, batch_size, lr)
    resolve_architecture(architecture, input_shape or _as_array(x, "x").shape[1:])
    data = _label_data(
        x,
        y,
        target=target,
        query_budget=query_budget,
        input_shape=input_shape,
        num_classes=num_classes,
        bounds=bounds,
        holdout=holdout,
        seed=int(seed),
    )
    model, member = _fit_member(
        data,
        architecture=architecture,
        epochs=int(epochs),
        seed=int(seed),
        batch_size=int(batch_size),
        lr=float(lr),
        progress=progress,
    )
    return model, {**data["info"], **member}


# -- ensemble --------------------------------------------------------------------------------
class EnsembleClassifier(ClassifierBase):
    """A white-box adapter averaging several ``TorchClassifier``s with the same input spec.

    ``combine="logits"`` averages the members' logits (Tramer et al. 2018);
    ``"log_probs"`` averages their log-softmax outputs, so members with larger logit
    scales do not dominate. Gradients flow through the average (``value_and_grad``).
    Queries are counted on the ensemble (and on each member).
    """

    def __init__(self, members: Sequence[Any], *, combine: str = "logits") -> None:
        members = list(members) if not is_white_box(members) else [members]
        if not members:
            raise InputError("an ensemble needs at least one member model")
        for i, m in enumerate(members):
            if not is_white_box(m):
                raise InputError(
                    f"ensemble member {i} ({type(m).__name__}) is not white-box; members must "
                    "be TorchClassifier (or other adapters with forward/value_and_grad)"
                )
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if (
                tuple(m.input_shape) != tuple(first.input_shape)
                or m.num_classes != first.num_classes
                or tuple(m.bounds) != tuple(first.bounds)
            ):
                raise InputError(
                    f"ensemble member {i} takes input_shape {tuple(m.input_shape)}, "
                    f"{m.num_classes} classes, bounds {tuple(m.bounds)}; member 0 takes "
                    f"{tuple(first.input_shape)}, {first.num_classes} classes, bounds "
                    f"{tuple(first.bounds)}; all members must match"
                )
            if torch.device(m.device) != torch.device(first.device):
                raise InputError(
                    f"ensemble members live on different devices ({first.device}, {m.device})"
                )
        if combine not in COMBINE:
            raise InputError(f"unknown combine {combine!r}; use one of {', '.join(COMBINE)}")
        super().__init__(
            num_classes=first.num_classes, input_shape=first.input_shape, bounds=first.bounds
        )
        self.members = members
        self.combine = combine
        self.device = torch.device(first.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable average of the members' outputs; counts forward queries."""
        self.queries.forward += len(x)
        outs = [m.forward(x) for m in self.members]
        if self.combine == "log_probs":
            outs = [torch.log_softmax(o, dim=1) for o in outs]
        return torch.stack(outs).mean(0)

    __call__ = forward

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x.to(self.device, self.dtype))

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().to(self.device, self.dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(x)
            loss = loss_fn(logits)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        self.queries.gradient += len(x)
        return logits.detach(), loss.detach(), grad.detach()

    def __repr__(self) -> str:
        return (
            f"EnsembleClassifier({len(self.members)} members, combine={self.combine!r}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


# -- the attack --------------------------------------------------------------------------------
class _FullStepPGD(PGD):
    """PGD that runs every step on the surrogate (no exit at the first fooling iterate).

    Over restarts it keeps, per sample, the final iterate with the highest surrogate loss.
    """

    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        assert epsilon is not None
        assert is_white_box(model)  # needs_gradients: the base class checked it
        return RunResult(self._descend(model, x, y, epsilon, targets, rng, early_stop=False))


class TransferAttack(Attack):
    """Craft adversarial examples on white-box surrogates, send them to the target.

    Parameters
    ----------
    surrogates:
        Ready surrogate models (``TorchClassifier``s with the target's input shape,
        classes and bounds); several are attacked as one :class:`EnsembleClassifier`.
    surrogate_data:
        Instead of ``surrogates``: a data set spec for :func:`advguard.data.load_dataset`
        (``"digits"``, ``"public.npz"``...) or a :class:`~advguard.data.Dataset`. The
        surrogates are trained on the first call and cached for this target. The data
        is shuffled with ``seed`` first (files are often sorted by class). Prefer data
        the evaluation samples are not part of.
    labels:
        ``"target"`` (label the data with the target's answers: query access only) or
        ``"data"`` (use the data set's labels: the attacker has labelled data).
    query_budget:
        At most this many target queries for labelling (and measuring agreement);
        ``>= 10``. ``None``: label all of ``surrogate_data``.
    ensemble:
        Number of surrogates (seeds ``seed``, ``seed + 1``...), all trained on the same
        labelled data (it is labelled once).
    architecture, epochs:
        Surrogate architecture (``"auto"``, ``"small_cnn"``, ``"mlp"``) and epochs.
    combine:
        How the ensemble averages its members: ``"logits"`` or ``"log_probs"``.
    base, base_params:
        Registry name (``advguard.attacks.registry``) of the white-box attack run on the
        surrogate ensemble, and its parameters (default ``"pgd"``, ``{}``).
    early_stop:
        Only for ``base="pgd"``: ``False`` (default) runs every PGD step on the surrogate
        and returns the final iterate (the one with the highest surrogate loss over
        restarts), which transfers far better than the first iterate that fools the
        surrogate (``True``, plain PGD).
    holdout:
        Share of the labelled surrogate data held out to measure agreement.
    norm, seed:
        Threat model norm (must be one the base attack supports) and seed.

    ``AttackResult.info`` reports the surrogates (agreement with the target, target
    queries spent training them) and the transfer: ``surrogate_success`` (white-box
    success on the surrogate ensemble), ``target_success`` and ``transfer_rate`` (share
    of the surrogate-fooling examples that also fool the target), over the attacked
    samples. ``forward_evals`` of the call that trains the surrogates includes the
    target queries spent training them.
    """

    name = "transfer"
    norms = ("linf", "l2", "l1")
    needs_gradients = False
    supports_targeted = True

    def __init__(
        self,
        *,
        surrogates: Sequence[Any] | Any | None = None,
        surrogate_data: str | os.PathLike | Any | None = None,
        labels: str = "target",
        query_budget: int | None = None,
        ensemble: int = 1,
        architecture: str = "auto",
        epochs: int = 10,
        combine: str = "logits",
        base: str = "pgd",
        base_params: dict[str, Any] | None = None,
        early_stop: bool = False,
        holdout: float = 0.2,
        norm: str | float = "linf",
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self._base = self._base_attack(base, base_params, early_stop, allow_large)
        self.base = base
        self.base_params = dict(base_params or {})
        self.early_stop = early_stop

        # -- surrogates: given, or a lazy training spec
        if (surrogates is None) == (surrogate_data is None):
            raise InputError(
                "give either surrogates=[TorchClassifier, ...] or surrogate_data='<dataset>' "
                "(with labels, query_budget, ensemble...) to train them, not both"
            )
        check.choice("labels", labels, LABEL_SOURCES)
        if query_budget is not None:
            check.queries(
                "query_budget", query_budget, low=MIN_QUERY_BUDGET, allow_large=allow_large
            )
        check.integer("ensemble", ensemble, low=1, high=100)
        check.choice("architecture", architecture, ARCHITECTURES)
        check.steps("epochs", epochs, allow_large=allow_large)
        check.number("holdout", holdout, low=0.0, high=0.5)
        check.choice("combine", combine, COMBINE)
        self._set_surrogates(surrogates, surrogate_data, combine)
        self.labels = labels
        self.query_budget = None if query_budget is None else int(query_budget)
        self.ensemble = int(ensemble)
        self.architecture = architecture
        self.epochs = int(epochs)
        self.combine = combine
        self.holdout = float(holdout)
        # cache of trained surrogates: (weak reference to the target, ensemble, info)
        self._cache: tuple[Callable[[], Any], EnsembleClassifier, dict[str, Any]] | None = None

    def _base_attack(
        self, base: str, base_params: dict[str, Any] | None, early_stop: bool, allow_large: bool
    ) -> _FullStepPGD | SuiteAttack:
        """The white-box attack run on the surrogate (PGD without early stop by default)."""
        from advguard.attacks.registry import ATTACKS, build_attack

        if not isinstance(base, str) or base not in ATTACKS:
            raise InputError(
                f"unknown base attack {base!r}; give the registry name of a white-box attack: "
                + ", ".join(sorted(n for n, e in ATTACKS.items() if e.knowledge == "white-box"))
            )
        entry = ATTACKS[base]
        if entry.knowledge != "white-box":
            raise InputError(
                f"base attack {base!r} is {entry.knowledge}; a transfer attack runs a white-box "
                "attack on the surrogate: use e.g. pgd, fgsm or apgd-ce"
            )
        if self.norm not in entry.norms:
            raise InputError(
                f"base attack {base!r} does not support norm {self.norm}; it supports "
                f"{', '.join(entry.norms)}"
            )
        if base_params is None:
            base_params = {}
        if not isinstance(base_params, dict):
            raise InputError(f"base_params must be a mapping, got {type(base_params).__name__}")
        if any(k in base_params for k in ("norm", "seed")):
            raise InputError("base_params must not set norm or seed; set them on the attack")
        check.flag("early_stop", early_stop)
        base_kw = {"allow_large": True, **base_params} if allow_large else dict(base_params)
        if base == "pgd" and not early_stop:
            try:
                return _FullStepPGD(norm=self.norm, seed=self.seed, **base_kw)
            except TypeError as e:
                raise InputError(f"bad base_params for attack 'pgd': {e}") from None
        return build_attack(base, norm=self.norm, seed=self.seed, **base_kw)

    def _set_surrogates(self, surrogates: Any, surrogate_data: Any, combine: str) -> None:
        """The given surrogates (as an ensemble), or the data set to train them on."""
        self._given: list[Any] | None = None
        if surrogates is not None:
            given = [surrogates] if is_white_box(surrogates) else list(surrogates)
            self._ensemble_given = EnsembleClassifier(given, combine=combine)
            self._given = given
        elif not isinstance(surrogate_data, (str, os.PathLike)) and not hasattr(
            surrogate_data, "x"
        ):
            raise InputError(
                "surrogate_data must be a data set spec (e.g. 'digits' or a path) or a Dataset, "
                f"got {type(surrogate_data).__name__}"
            )
        self.surrogate_data = (
            os.fspath(surrogate_data)
            if isinstance(surrogate_data, (str, os.PathLike))
            else (None if surrogate_data is None else getattr(surrogate_data, "name", "dataset"))
        )
        self._dataset = surrogate_data if hasattr(surrogate_data, "x") else None

    # -- configuration ------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        p = super().params()
        p.pop("name", None)
        if self._given is not None:
            for k in ("surrogate_data", "labels", "query_budget", "ensemble", "architecture",
                      "epochs", "holdout"):  # fmt: skip
                p.pop(k, None)
            p["surrogates"] = [repr(m) for m in self._given]
        return p

    @property
    def surrogate(self) -> EnsembleClassifier | None:
        """The surrogate ensemble in use (``None`` until a lazy spec has been trained)."""
        if self._given is not None:
            return self._ensemble_given
        return None if self._cache is None else self._cache[1]

    # -- surrogates -----------------------------------------------------------------------------
    def _check_compatible(self, ens: EnsembleClassifier, model: Classifier) -> None:
        problems = []
        if tuple(ens.input_shape) != tuple(model.input_shape):
            problems.append(
                f"input_shape {tuple(ens.input_shape)} vs the target's {tuple(model.input_shape)}"
            )
        if ens.num_classes != model.num_classes:
            problems.append(f"{ens.num_classes} classes vs the target's {model.num_classes}")
        if not np.allclose(ens.bounds, model.bounds, rtol=0, atol=1e-6):
            problems.append(f"bounds {tuple(ens.bounds)} vs the target's {tuple(model.bounds)}")
        if problems:
            raise InputError(
                "the surrogate does not take the target's inputs: " + "; ".join(problems)
            )

    def _load_data(self) -> Any:
        if self._dataset is not None:
            return self._dataset
        from advguard.data import load_dataset

        return load_dataset(self.surrogate_data)  # type: ignore[arg-type]

    def _surrogates_for(self, model: Classifier) -> tuple[EnsembleClassifier, dict[str, Any], int]:
        """The surrogate ensemble for ``model`` (trained on first use), its info, and the
        target queries spent by this call."""
        if self._given is not None:
            self._check_compatible(self._ensemble_given, model)
            return self._ensemble_given, {"surrogates_given": len(self._given)}, 0
        if self._cache is not None and self._cache[0]() is model:
            return self._cache[1], self._cache[2], 0
        ds = self._load_data()
        x = np.asarray(ds.x)
        if tuple(x.shape[1:]) != tuple(model.input_shape):
            raise InputError(
                f"surrogate_data {self.surrogate_data!r} has samples of shape "
                f"{tuple(x.shape[1:])} but the target takes {tuple(model.input_shape)}"
            )
        ds_classes = getattr(ds, "num_classes", None)
        if ds_classes is not None and int(ds_classes) != int(model.num_classes):
            raise InputError(
                f"surrogate_data {self.surrogate_data!r} has {ds_classes} classes but the target "
                f"has {model.num_classes}"
            )
        ds_bounds = getattr(ds, "bounds", None)
        perm = np.random.default_rng(self.seed).permutation(len(x))
        y = None if self.labels == "target" else np.asarray(ds.y)[perm]
        f0 = model.queries.forward
        data = _label_data(
            x[perm],
            y,
            target=model,
            query_budget=self.query_budget,
            input_shape=None,
            num_classes=None,
            bounds=None if ds_bounds is None else tuple(ds_bounds),
            holdout=self.holdout,
            seed=self.seed,
        )
        members, member_info = [], []
        for i in range(self.ensemble):
            m, inf = _fit_member(
                data,
                architecture=self.architecture,
                epochs=self.epochs,
                seed=self.seed + i,
                batch_size=64,
                lr=1e-3,
                progress=None,
            )
            members.append(m)
            member_info.append(inf)
        ens = EnsembleClassifier(members, combine=self.combine)
        spent = model.queries.forward - f0
        info: dict[str, Any] = {**data["info"], "surrogates_trained": self.ensemble}
        info["architecture"] = member_info[0]["architecture"]
        agreements = [mi["agreement"] for mi in member_info]
        info["member_agreement"] = agreements
        if data["agree_y"] is not None and len(data["agree_y"]):
            info["agreement"] = float((ens.predict(data["agree_x"]) == data["agree_y"]).mean())
            ens.queries.reset()
        else:
            info["agreement"] = None
        info["surrogate_data"] = self.surrogate_data
        try:
            ref: Callable[[], Any] = weakref.ref(model)
        except TypeError:  # an adapter without weak references: hold it
            ref = (lambda m: lambda: m)(model)
        self._cache = (ref, ens, info)
        return ens, info, spent

    # -- attack ---------------------------------------------------------------------------------
    def _setup(self, model: Classifier) -> dict[str, Any]:
        """Train (or fetch from the cache) the surrogates before any attack work; the target
        queries spent doing so count in the result's ``forward_evals``."""
        _, sinfo, spent = self._surrogates_for(model)
        return {
            "base": self.base,
            "base_early_stop": bool(self.early_stop or self.base != "pgd"),
            "surrogate": dict(sinfo),
            "surrogate_agreement": sinfo.get("agreement"),
            "surrogate_training_queries": int(sinfo.get("target_queries", 0)),
            "surrogate_training_queries_this_call": int(spent),
        }

    def _finish(self, res: AttackResult, call: AttackCall) -> AttackResult:
        ens, _, _ = self._surrogates_for(call.model)  # cached by _setup: no queries
        att = res.attacked
        n_att = int(att.sum())
        info: dict[str, Any] = {"surrogates": len(ens.members), "attacked": n_att}
        if n_att:
            xa = res.x_adv[att].to(ens.device)
            ya = call.y0.to(ens.device)[att.to(ens.device)]
            x0 = call.x0.to(ens.device)[att.to(ens.device)]
            with torch.no_grad():
                clean_pred = ens.logits(x0).argmax(1)
                adv_pred = ens.logits(xa).argmax(1)
            if call.targets is not None:
                t = call.targets.to(ens.device)[att.to(ens.device)]
                sur_ok = adv_pred == t
            else:
                sur_ok = adv_pred != ya
            tgt_ok = res.success[att].to(ens.device)
            both = int((sur_ok & tgt_ok).sum())
            info.update(
                surrogate_clean_accuracy=float((clean_pred == ya).float().mean()),
                surrogate_success=float(sur_ok.float().mean()),
                target_success=float(tgt_ok.float().mean()),
                transfer_rate=float(both / int(sur_ok.sum())) if int(sur_ok.sum()) else None,
            )
            ens.queries.reset()
        else:
            info.update(
                surrogate_clean_accuracy=None,
                surrogate_success=None,
                target_success=None,
                transfer_rate=None,
            )
        res.info.update(info)
        # per-sample target queries at attack time: the clean check, plus the success check
        res.queries = (1 + att.long()).to(res.x_adv.device)
        return res

    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        ens, _, _ = self._surrogates_for(model)  # cached by _setup: no queries
        xs = x.to(ens.device)
        ys = y.to(ens.device)
        ts = None if targets is None else targets.to(ens.device)
        rng = rng.to(ens.device)
        if isinstance(self._base, _FullStepPGD):
            # every sample is attacked, also those the surrogate already gets wrong
            out = self._base._run(ens, xs, ys, epsilon, ts, rng).x
            out = self._clip(xs, out, epsilon, ens.bounds)
        else:
            assert epsilon is not None
            out = self._base.run(ens, xs, ys, epsilon, ts, sample_ids=rng.ids).x_adv
        return RunResult(out.to(x.device))
