"""Run the training-time and privacy goals of a threat model (:mod:`advguard.evaluate.goals`).

* ``poisoning``: label flipping (:func:`advguard.attacks.poisoning.label_flip`) of the goal's
  ``train_data``; a reference model is trained on the clean data and a poisoned one on the
  poisoned data, with the same recipe (advguard's trainer, standard training, a zoo
  architecture); both are measured on the evaluation data.
* ``backdoor``: the same with a BadNets patch or blended trigger; attack success rate is the
  share of triggered evaluation inputs (not of the target class) classified as the target.
* ``membership-inference``: the LOSS attack (and offline LiRA given ``population``) against
  the evaluated model; members from ``members``, non-members the evaluation data (or
  ``non_members``).
* ``extraction``: Knockoff Nets or Jacobian augmentation against the evaluated model within
  the query budget; fidelity is measured on evaluation data the queries did not use.

The poisoning goals train their own models, so this runner sits in the defenses layer (the
trainer's); :func:`run_threat_model` is the whole ``advguard evaluate`` job for a threat model
with goals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard.errors import InputError
from advguard.evaluate.goals import (
    GOAL_ATLAS,
    BackdoorParams,
    ExtractionParams,
    GoalMetric,
    GoalResult,
    GoalSpec,
    MembershipParams,
    PoisoningParams,
    drop_metric,
    proportion_metric,
)
from advguard.evaluate.threat_model import ThreatModel
from advguard.stats import proportion

Progress = Callable[[str, int, int], None]


# -- data --------------------------------------------------------------------------------
def load_goal_data(spec: str, model: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the data set ``spec`` (a file, folder or builtin name, read as data by
    :func:`advguard.data.load_dataset`), checked against the model's input shape and classes."""
    from advguard.data import load_dataset

    try:
        ds = load_dataset(spec)
    except InputError as e:
        raise InputError(f"goal data '{what}': {e}") from None
    if getattr(ds, "modality", None) == "text":
        raise InputError(f"goal data '{what}' is text; goals need numeric (image/tabular) data")
    if tuple(ds.input_shape) != tuple(model.input_shape):
        raise InputError(
            f"goal data '{what}' ({spec}) has samples of shape {tuple(ds.input_shape)}, the "
            f"model expects {tuple(model.input_shape)}"
        )
    y = np.asarray(ds.y).astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= model.num_classes):
        raise InputError(
            f"goal data '{what}' ({spec}) has labels outside [0, {model.num_classes - 1}]"
        )
    return np.asarray(ds.x, dtype=np.float32), y


def _sample(xy: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = xy
    if len(x) <= n:
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


def _class_param(v: int | None, model: Any, what: str) -> None:
    if v is not None and v >= model.num_classes:
        raise InputError(
            f"goal parameter {what} {v} is not a class of the model (< {model.num_classes})"
        )


# -- training ----------------------------------------------------------------------------
def train_zoo(
    arch: str, model: Any, x: np.ndarray, y: np.ndarray, p: Any, seed: int
) -> tuple[Any, dict[str, Any]]:
    """A zoo ``arch`` trained on ``(x, y)`` by advguard's trainer (standard training, the
    goal's epochs/lr/batch size); returns ``(classifier, training manifest)``."""
    from advguard.defenses.training import TrainConfig, train
    from advguard.models import TorchClassifier
    from advguard.models.zoo import mlp, small_cnn

    shape = tuple(int(d) for d in model.input_shape)
    torch.manual_seed(seed)
    module = (mlp if arch == "mlp" else small_cnn)(shape, model.num_classes)
    bounds = (float(model.bounds[0]), float(model.bounds[1]))
    cfg = TrainConfig(
        method="standard", epsilon=0.0, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
        seed=seed, bounds=bounds, val_fraction=0.1,
    )  # fmt: skip
    res = train(module, x, y, cfg, num_classes=model.num_classes)
    clf = TorchClassifier(
        res.module, input_shape=shape, num_classes=model.num_classes, bounds=bounds
    )
    return clf, res.manifest


def _accuracy(clf: Any, x: np.ndarray, y: np.ndarray) -> Any:
    return proportion(int((np.asarray(clf.predict(x)) == y).sum()), len(y))


def _run_poisoning(
    spec: GoalSpec, model: Any, x: np.ndarray, y: np.ndarray, data: dict[str, Any], seed: int
) -> tuple[list[GoalMetric], dict[str, Any]]:
    from advguard.attacks.poisoning import label_flip
    from advguard.defenses.training.monitor import compare_manifests

    p: PoisoningParams = spec.typed_params()
    tx, ty = data["train_data"]
    pr = label_flip(
        tx, ty, rate=p.rate, target=p.target, source=p.source, num_classes=model.num_classes,
        seed=seed,
    )  # fmt: skip
    ref, ref_man = train_zoo(p.arch, model, tx, ty, p, seed)
    pois, pois_man = train_zoo(p.arch, model, pr.x, pr.y, p, seed)
    ref_acc, acc = _accuracy(ref, x, y), _accuracy(pois, x, y)
    metrics = [
        proportion_metric("clean_accuracy", acc, "the model trained on the poisoned data"),
        proportion_metric("reference_clean_accuracy", ref_acc, "the model trained on clean data"),
        drop_metric("clean_accuracy_drop", ref_acc, acc),
    ]
    details: dict[str, Any] = {"poisoned_rows": pr.manifest.n_poisoned, "train_rows": len(ty)}
    if p.target is not None:
        elig = (y == p.source) if p.source is not None else (y != p.target)
        hits = int((np.asarray(pois.predict(x[elig])) == p.target).sum())
        base = int((np.asarray(ref.predict(x[elig])) == p.target).sum())
        who = f"of class {p.source}" if p.source is not None else "not of the target class"
        note = f"evaluation inputs {who} classified as the target"
        metrics.append(
            proportion_metric("attack_success_rate", proportion(hits, int(elig.sum())), note)
        )
        metrics.append(
            proportion_metric("reference_attack_success_rate", proportion(base, int(elig.sum())))
        )
    details["loss_drift"] = _drift_summary(compare_manifests(ref_man, pois_man))
    return metrics, details


def _drift_summary(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "flagged_classes": d["flagged_classes"],
        "z": d["z"],
        "min_delta": d["min_delta"],
        "loss_z": [r["z"] for r in d["loss"]],
        "loss_excess": [r["excess"] for r in d["loss"]],
    }


def _run_backdoor(
    spec: GoalSpec, model: Any, x: np.ndarray, y: np.ndarray, data: dict[str, Any], seed: int
) -> tuple[list[GoalMetric], dict[str, Any]]:
    from advguard.attacks.poisoning import poison
    from advguard.defenses.backdoor.metrics import backdoor_metrics
    from advguard.defenses.training.monitor import compare_manifests

    p: BackdoorParams = spec.typed_params()
    tx, ty = data["train_data"]
    bounds = (float(model.bounds[0]), float(model.bounds[1]))
    pr = poison(
        tx, ty, p.trigger, rate=p.rate, target=p.target, source=p.source, bounds=bounds,
        num_classes=model.num_classes, seed=seed, size=p.size, position=p.position,
        alpha=p.alpha,
    )  # fmt: skip
    trigger = pr.manifest.trigger
    assert trigger is not None
    ref, ref_man = train_zoo(p.arch, model, tx, ty, p, seed)
    pois, pois_man = train_zoo(p.arch, model, pr.x, pr.y, p, seed)
    m = backdoor_metrics(pois, x, y, trigger)
    r = backdoor_metrics(ref, x, y, trigger)
    acc = proportion(m["clean_accuracy"]["k"], m["clean_accuracy"]["n"])
    ref_acc = proportion(r["clean_accuracy"]["k"], r["clean_accuracy"]["n"])
    metrics = [
        proportion_metric(
            "attack_success_rate", m["attack_success_rate"],
            "triggered evaluation inputs (not of the target class) classified as the target",
        ),
        proportion_metric(
            "reference_attack_success_rate", r["attack_success_rate"],
            "the same trigger on the model trained on clean data",
        ),
        proportion_metric("clean_accuracy", acc, "the model trained on the poisoned data"),
        proportion_metric("reference_clean_accuracy", ref_acc, "the model trained on clean data"),
        drop_metric("clean_accuracy_drop", ref_acc, acc),
    ]  # fmt: skip
    details = {
        "poisoned_rows": pr.manifest.n_poisoned,
        "train_rows": len(ty),
        "trigger": {"kind": trigger.kind, **dict(trigger.params or {})},
        "loss_drift": _drift_summary(compare_manifests(ref_man, pois_man)),
    }
    return metrics, details


def _run_membership(
    spec: GoalSpec, model: Any, x: np.ndarray, y: np.ndarray, data: dict[str, Any], seed: int
) -> tuple[list[GoalMetric], dict[str, Any]]:
    from advguard.attacks.inference import audit_membership

    p: MembershipParams = spec.typed_params()
    mx, my = _sample(data["members"], p.max_samples, seed)
    nx, ny = _sample(data.get("non_members") or (x, y), p.max_samples, seed + 1)
    audit = audit_membership(
        model, (mx, my), (nx, ny), population=data.get("population"), arch=p.arch,
        n_shadows=p.shadows, shadow_epochs=p.shadow_epochs, fprs=[p.fpr],
        bootstrap=p.bootstrap, seed=seed,
    )  # fmt: skip
    per = {
        name: {
            "auc": a["auc"], "auc_ci": a["auc_ci"], "tpr": a["at_fpr"][0]["tpr"],
            "fpr": a["at_fpr"][0]["fpr"], "threshold": a["at_fpr"][0]["threshold"],
            "resolvable": a["at_fpr"][0]["resolvable"], "reference": a.get("reference"),
        }
        for name, a in audit.attacks.items()
    }  # fmt: skip
    best_auc = max(per, key=lambda k: per[k]["auc"])
    best_tpr = max(per, key=lambda k: per[k]["tpr"]["value"] or 0.0)
    a = per[best_auc]
    auc = (
        GoalMetric(
            name="auc", value=a["auc"], ci_low=a["auc_ci"][0], ci_high=a["auc_ci"][1],
            interval="bootstrap", note=f"{best_auc}; percentile bootstrap, {p.bootstrap} resamples",
        )
        if a["auc_ci"] is not None
        else GoalMetric(name="auc", value=a["auc"], ci_low=None, ci_high=None, interval="none",
                        note=f"{best_auc}; no bootstrap")
    )  # fmt: skip
    t = per[best_tpr]
    fpr = t["fpr"]
    note = (
        f"{best_tpr}; members flagged at the threshold letting {fpr['k']} of {fpr['n']} "
        f"non-members through (target FPR {p.fpr:g})"
        + ("" if t["resolvable"] else f"; {fpr['n']} non-members cannot resolve FPR {p.fpr:g}")
    )
    metrics = [auc, proportion_metric("tpr_at_fpr", t["tpr"], note)]
    details = {"attacks": per, "n_members": len(my), "n_non_members": len(ny), "fpr": p.fpr}
    return metrics, details


def _run_extraction(
    spec: GoalSpec, model: Any, x: np.ndarray, y: np.ndarray, data: dict[str, Any], seed: int
) -> tuple[list[GoalMetric], dict[str, Any]]:
    from advguard.attacks.extraction import EvalSet, jacobian_augmentation, knockoff

    p: ExtractionParams = spec.typed_params()
    if "pool" in data:
        pool, ex, ey = data["pool"][0], x, y
    else:
        if len(x) < 2:
            raise InputError("extraction needs at least 2 evaluation samples (or a pool)")
        perm = np.random.default_rng(seed).permutation(len(x))
        half = len(x) // 2
        pool, ex, ey = x[perm[:half]], x[perm[half:]], y[perm[half:]]
    es = EvalSet.from_target(model, ex, ey)
    if p.method == "knockoff":
        res = knockoff(
            model, pool, budget=p.queries, mode=p.mode, arch=p.arch, eval_set=es,
            n_checkpoints=p.checkpoints, epochs=p.epochs, seed=seed,
        )  # fmt: skip
    else:
        res = jacobian_augmentation(
            model, pool, budget=p.queries, mode=p.mode, arch=p.arch, eval_set=es,
            epochs=p.epochs, seed=seed,
        )  # fmt: skip
    metrics = [
        proportion_metric(
            "fidelity", res.final["fidelity"],
            f"agreement with the model on {len(ey)} evaluation inputs not queried",
        ),
        proportion_metric("accuracy", res.final["accuracy"], "the stolen copy's accuracy"),
    ]  # fmt: skip
    details = {
        "queries_used": res.queries_used,
        "pool_size": len(pool),
        "curve": [{"queries": c["queries"], "fidelity": c["fidelity"]["value"]} for c in res.curve],
    }
    return metrics, details


RUNNERS = {
    "poisoning": _run_poisoning,
    "backdoor": _run_backdoor,
    "membership-inference": _run_membership,
    "extraction": _run_extraction,
}


def _goal_data(spec: GoalSpec, model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every data set a goal names, loaded and checked (before any goal runs)."""
    out = {}
    for key in ("train_data", "members", "non_members", "population", "pool"):
        value = spec.params.get(key)
        if isinstance(value, str):
            out[key] = load_goal_data(value, model, f"{spec.name}.{key}")
    for key in ("target", "source"):
        _class_param(spec.params.get(key), model, f"{spec.name}.{key}")
    return out


def load_goals_data(tm: ThreatModel, model: Any) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The data sets every goal of ``tm`` names, loaded and checked: bad data is an error
    before any work (evasion included) is done."""
    return [_goal_data(g, model) for g in tm.goals]


def run_goals(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    tm: ThreatModel,
    *,
    progress: Progress | None = None,
    goal_data: list[dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
) -> list[GoalResult]:
    """Run every goal of ``tm`` against ``model`` with evaluation data ``(x, y)``.

    ``goal_data``: the data sets the goals name, as :func:`load_goals_data` returned them
    (default: loaded here, before any goal runs)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    data = goal_data if goal_data is not None else load_goals_data(tm, model)
    out = []
    for i, (spec, d) in enumerate(zip(tm.goals, data, strict=True)):
        if progress is not None:
            progress("goals", i, len(tm.goals))
        seed = spec.params.get("seed")
        t0 = time.perf_counter()
        metrics, details = RUNNERS[spec.kind](
            spec, model, x, y, d, tm.seed if seed is None else int(seed)
        )
        out.append(
            GoalResult(
                name=spec.name,
                kind=spec.kind,
                params=dict(spec.params),
                metrics=metrics,
                atlas=list(GOAL_ATLAS[spec.kind]),
                details=details,
                seconds=time.perf_counter() - t0,
            )
        )
    if progress is not None:
        progress("goals", len(tm.goals), len(tm.goals))
    return out


def run_threat_model(
    model: Any,
    data: Any,
    tm: ThreatModel,
    out_dir: str | Path,
    *,
    model_info: dict[str, Any] | None = None,
    baseline: str | Path | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    html: bool = True,
    backend: Any = None,
    work: Any = None,
) -> Any:
    """``advguard evaluate``: the evasion evaluation (when the threat model has attacks; on
    ``backend``, e.g. Ray, with ``work`` its file-based description) and then its goals, in
    one report (``report.json`` + ``report.html`` in ``out_dir``)."""
    from advguard.evaluate.build_report import attach_goals, goals_only_report
    from advguard.evaluate.job import data_info, run_evaluation, write_outputs

    out = Path(out_dir)
    if not tm.goals:
        return run_evaluation(
            model, data, tm, out, model_info=model_info, baseline=baseline, progress=progress,
            resume=resume, html=html, backend=backend, work=work,
        )  # fmt: skip
    if getattr(data, "modality", None) == "text" or tm.is_text:
        raise InputError("threat-model goals need numeric (image or tabular) data and models")
    if tuple(data.input_shape) != tuple(model.input_shape):
        raise InputError(
            f"data samples have shape {tuple(data.input_shape)} but the model expects "
            f"{tuple(model.input_shape)}"
        )
    goal_data = load_goals_data(tm, model)
    if tm.has_evasion:
        report = run_evaluation(
            model, data, tm, out, model_info=model_info, baseline=baseline, progress=progress,
            resume=resume, html=False, backend=backend, work=work,
        ).report  # fmt: skip
    else:
        n = min(tm.samples, len(data.y))
        idx = np.sort(np.random.default_rng(tm.seed).permutation(len(data.y))[:n])
        report = goals_only_report(
            model, np.asarray(data.x), np.asarray(data.y), idx, tm=tm,
            model_info=model_info or {}, data_info=data_info(data), timing={},
        )  # fmt: skip
    goals = run_goals(model, data.x, data.y, tm, progress=progress, goal_data=goal_data)
    return write_outputs(attach_goals(report, goals), out, html)


__all__ = [
    "RUNNERS",
    "load_goal_data",
    "load_goals_data",
    "run_goals",
    "run_threat_model",
    "train_zoo",
]
