"""Assemble the :class:`~advguard.evaluate.report.Report` of an image/tabular evaluation from
its run state: per-epsilon results and per-attack rows, the verdict, ATLAS findings, kept
examples, feature changes, environment and provenance.

The pydantic report models live in ``report.py``; this module only fills them in.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from advguard import __version__
from advguard.attacks.registry import ATLAS_TECHNIQUES, ATLAS_VERSION, SuiteAttack
from advguard.evaluate.goals import GoalResult, goal_findings, goal_slo_results, goal_specs
from advguard.evaluate.report import (
    AttackRow,
    EpsilonResult,
    FeatureChange,
    Finding,
    Report,
    SanityCheck,
    Severity,
    Stat,
    SuiteEntry,
)
from advguard.evaluate.state import RunState, sha256_array
from advguard.evaluate.threat_model import ThreatModel
from advguard.evaluate.verdict import judge, verdict_of
from advguard.models.base import is_white_box
from advguard.stats import proportion, summary


def declared_defense(model: Any) -> tuple[list[str], bool]:
    """(non-differentiable transform names, randomized?) that ``model`` declares."""
    return list(getattr(model, "nondifferentiable", None) or []), bool(
        getattr(model, "randomized", False)
    )


def build_report(
    state: RunState,
    idx: np.ndarray,
    checks: list[SanityCheck],
    first_robust: list[int],
    timing: dict[str, float],
    *,
    tm: ThreatModel,
    model: Any,
    adaptive: dict[str, Any],
    model_info: dict[str, Any],
    data_info: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str] | None,
    baseline: Report | None,
) -> Report:
    """The report of a run whose samples ``idx`` have the records in ``state``.

    ``first_robust`` is the robust count per epsilon after the suite alone (before
    escalations); ``model_info``/``data_info`` are merged into the report's provenance.
    """
    n = len(idx)
    results = [
        epsilon_result(state, e, eps, n, first_robust[e]) for e, eps in enumerate(state.epsilons)
    ]
    clean = proportion(int(state.records.correct.sum()), n)
    trustworthy = not any(c.status == "fail" for c in checks)
    verdict = judge(tm, clean, results, trustworthy, baseline)
    return Report(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        advguard_version=__version__,
        environment=environment(model),
        model=model_section(model, adaptive, model_info),
        data={
            "n_total": len(x),
            "n_evaluated": n,
            "sha256": data_info.get("sha256") or sha256_array(x, y),
            **data_info,
        },
        threat_model=tm.model_dump(),
        suite=suite_entries(state),
        sample_indices_sha256=sha256_array(idx),
        clean_accuracy=clean,
        results=results,
        sanity_checks=checks,
        trustworthy=trustworthy,
        verdict=verdict,
        findings=findings(tm, results, state.attacks),
        examples=[ex for e in sorted(state.examples) for ex in state.examples[e]],
        feature_changes=feature_changes(state, feature_names),
        timing=timing,
        baseline=(
            {
                "clean_accuracy": baseline.clean_accuracy.value,
                "created": baseline.created,
                "model": baseline.model,
            }
            if baseline is not None
            else None
        ),
    )


def attack_rows(state: RunState, e: int, n: int) -> list[AttackRow]:
    """One row per attack and stage run at epsilon index ``e``, in the order they ran."""
    rec = state.records
    keyed = sorted(
        (state.key(ee, name, st), name, st, v)
        for (ee, name, st), v in state.stats.items()
        if ee == e
    )
    return [
        AttackRow(
            attack=name,
            order=order,
            attacked=v.attacked,
            newly_fooled=v.newly_fooled,
            attack_success_rate=proportion(v.newly_fooled, v.attacked),
            robust_accuracy_after=proportion(int(rec.robust_at(e, k).sum()), n),
            forward_evals=v.forward,
            gradient_evals=v.gradient,
            seconds=v.seconds,
            examples_per_second=(v.attacked / v.seconds) if v.seconds > 0 else None,
            stage=stage,
        )
        for order, (k, name, stage, v) in enumerate(keyed, start=1)
    ]


def epsilon_result(state: RunState, e: int, eps: float, n: int, first: int) -> EpsilonResult:
    """Robust accuracy, fooling rate, perturbation sizes and the per-attack rows at ``eps``
    (``first``: the robust count after the suite alone, before escalations)."""
    rec = state.records
    robust = int(rec.robust_at(e).sum())
    fooled = rec.correct & ~rec.robust_at(e)
    pert = {k: Stat(**summary(getattr(rec, k)[fooled])) for k in ("linf", "l2", "l0")}
    drop = rec.clean_conf[fooled] - rec.adv_conf[fooled]
    return EpsilonResult(
        epsilon=eps,
        robust_accuracy=proportion(robust, n),
        fooling_rate=proportion(int(fooled.sum()), int(rec.correct.sum())),
        first_robust_accuracy=proportion(first, n) if first != robust else None,
        perturbation=pert,
        mean_true_class_confidence_drop=float(drop.mean()) if len(drop) else None,
        per_attack=attack_rows(state, e, n),
    )


def suite_entries(state: RunState) -> list[SuiteEntry]:
    return [
        SuiteEntry(
            order=i + 1,
            attack=a.name,
            description=a.entry.description,
            knowledge=a.entry.knowledge,
            params=a.params(),
            atlas=list(a.entry.atlas),
        )
        for i, a in enumerate(state.attacks)
    ]


def feature_changes(
    state: RunState, feature_names: Sequence[str] | None
) -> dict[str, list[FeatureChange]]:
    """Tabular runs: per epsilon, the 15 features changed most, over the samples whose
    recorded adversarial is at that epsilon, summed in sample order (the same sums whatever
    the batch size or sharding)."""
    out: dict[str, list[FeatureChange]] = {}
    rec = state.records
    if feature_names is None or not rec.feat_abs.shape[1]:
        return out
    for e in sorted(set(rec.fooled_eps[rec.fooled_eps >= 0].tolist())):
        at = rec.fooled_eps == e
        cnt = int(at.sum())
        tot = rec.feat_abs[at].sum(0)
        changed = rec.feat_changed[at].sum(0)
        out[f"{state.epsilons[e]:g}"] = [
            FeatureChange(
                feature=feature_names[j],
                mean_abs_change=float(tot[j] / cnt),
                share_changed=float(changed[j] / cnt),
            )
            for j in np.argsort(-tot, kind="stable")[:15]
        ]
    return out


def model_section(
    model: Any, adaptive: dict[str, Any], model_info: dict[str, Any]
) -> dict[str, Any]:
    """The report's ``model``: adapter, spec, white-box flag, a declared defense with the
    adaptive attacks used against it, and the caller's provenance."""
    defended = (
        declared_defense(model) != ([], False) or hasattr(model, "reject_class")
    ) and hasattr(model, "describe")
    return {
        "adapter": type(model).__name__,
        "num_classes": model.num_classes,
        "input_shape": list(model.input_shape),
        "bounds": list(model.bounds),
        "white_box": is_white_box(model),
        **({"defense": model.describe(), "adaptive_attacks": adaptive} if defended else {}),
        **model_info,
    }


def findings(
    tm: ThreatModel, results: list[EpsilonResult], attacks: list[SuiteAttack]
) -> list[Finding]:
    """One ATLAS-tagged finding per epsilon where attacks evaded the model."""
    out = []
    techniques = sorted({t for a in attacks for t in a.entry.atlas if t.startswith("AML.T0043.")})
    for r in results:
        fr = r.fooling_rate.value
        if not fr:
            continue
        severity: Severity = "high" if fr >= 0.5 else "medium" if fr >= 0.2 else "low"
        for tid in ["AML.T0015", *techniques]:
            out.append(
                Finding(
                    atlas_technique=tid,
                    atlas_name=ATLAS_TECHNIQUES[tid],
                    atlas_version=ATLAS_VERSION,
                    epsilon=r.epsilon,
                    severity=severity,
                    summary=(
                        f"{r.fooling_rate.k} of {r.fooling_rate.n} correctly classified samples "
                        f"({fr:.1%}) were evaded within {tm.norm} epsilon {r.epsilon:g}"
                    ),
                )
            )
    return out


def environment(model: Any) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "numpy", "scipy", "scikit-learn", "onnxruntime", "pydantic"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    dev = getattr(model, "device", torch.device("cpu"))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "gpu": gpu,
        "packages": versions,
    }


def attach_goals(report: Report, goals: list[GoalResult]) -> Report:
    """``report`` with the results of its threat model's goals: the goal section, the
    goal SLOs judged after the evasion SLOs in the verdict, and the goals' ATLAS findings."""
    specs = goal_specs(report.threat_model)
    n_evasion = len(report.threat_model.get("slos") or [])
    slos = report.verdict.slos[:n_evasion] + goal_slo_results(specs, goals)
    timing = {**report.timing, "goals": float(sum(g.seconds for g in goals))}
    return report.model_copy(
        update={
            "goals": list(goals),
            "verdict": verdict_of(slos, report.trustworthy),
            "findings": [*report.findings, *goal_findings(goals)],
            "timing": timing,
        }
    )


def goals_only_report(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray,
    *,
    tm: ThreatModel,
    model_info: dict[str, Any],
    data_info: dict[str, Any],
    timing: dict[str, float],
) -> Report:
    """The report of a threat model without an evasion part: the model's clean accuracy on
    the evaluated samples ``idx`` of ``(x, y)``, no epsilon results, no sanity checks (they
    test evasion attacks). :func:`attach_goals` adds the goals."""
    pred = np.asarray(model.predict(x[idx]))
    clean = proportion(int((pred == y[idx]).sum()), len(idx))
    report = Report(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        advguard_version=__version__,
        environment=environment(model),
        model={
            "adapter": type(model).__name__,
            "num_classes": model.num_classes,
            "input_shape": list(model.input_shape),
            "bounds": list(model.bounds),
            "white_box": is_white_box(model),
            **model_info,
        },
        data={
            "n_total": len(x),
            "n_evaluated": len(idx),
            "sha256": data_info.get("sha256") or sha256_array(x, y),
            **data_info,
        },
        threat_model=tm.model_dump(),
        suite=[],
        sample_indices_sha256=sha256_array(idx),
        clean_accuracy=clean,
        results=[],
        sanity_checks=[],
        trustworthy=True,
        verdict=judge(tm, clean, [], True, None),
        findings=[],
        timing=timing,
    )
    return report
