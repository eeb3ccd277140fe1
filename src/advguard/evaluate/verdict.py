"""Judge evaluation results against the threat model's SLOs, with confidence intervals.

An SLO *holds with confidence* when the whole 95% interval is on the right side of the
threshold, *on the point estimate only* when just the measured value is, and *not* otherwise.
A gate on 100 samples therefore cannot look as certain as one on 10,000.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict

from pydantic import BaseModel, ConfigDict

from advguard.evaluate.slo_result import SLOResult, slo_holds
from advguard.evaluate.threat_model import SLO, ThreatModel
from advguard.stats import Proportion

if TYPE_CHECKING:
    from advguard.evaluate.report import EpsilonResult, Report


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # as report.py's models

    status: Literal["pass", "fail", "untrustworthy", "no-slo"]
    summary: str
    slos: list[SLOResult]


class _SLOHead(TypedDict):
    """The fields of :class:`SLOResult` that name the SLO."""

    slo: str
    metric: str
    epsilon: float | None


def _at(results: list[EpsilonResult], eps: float | None) -> EpsilonResult | None:
    return next((r for r in results if eps is not None and abs(r.epsilon - eps) < 1e-12), None)


def judge_slo(
    slo: SLO,
    clean: Proportion,
    results: list[EpsilonResult],
    baseline: Report | None,
) -> SLOResult:
    base: _SLOHead = {"slo": str(slo), "metric": slo.metric, "epsilon": slo.epsilon}
    p: Proportion | None = None
    value = lo = hi = None
    note = ""
    if slo.metric == "clean_accuracy":
        p = clean
    elif slo.metric in ("robust_accuracy", "fooling_rate"):
        r = _at(results, slo.epsilon)
        p = None if r is None else getattr(r, slo.metric)
    else:  # drops against a baseline report
        if baseline is None:
            return SLOResult(
                **base,
                value=None,
                ci_low=None,
                ci_high=None,
                holds="not-evaluable",
                note="needs a baseline report (--baseline)",
            )
        if slo.metric == "clean_accuracy_drop":
            ref, cur = baseline.clean_accuracy, clean
        else:
            rb, rc = baseline.result_at(slo.epsilon or 0.0), _at(results, slo.epsilon)
            if rb is None or rc is None:
                return SLOResult(
                    **base,
                    value=None,
                    ci_low=None,
                    ci_high=None,
                    holds="not-evaluable",
                    note=f"epsilon {slo.epsilon:g} missing from the baseline report",
                )
            ref, cur = rb.robust_accuracy, rc.robust_accuracy
        if ref.value is None or cur.value is None:
            return SLOResult(**base, value=None, ci_low=None, ci_high=None, holds="not-evaluable")
        value = ref.value - cur.value
        lo, hi = ref.value - cur.ci_high, ref.value - cur.ci_low
        note = f"baseline {ref.value:.4f} taken as fixed; interval from this run's samples"
    if p is not None:
        value, lo, hi = p.value, p.ci_low, p.ci_high
    if value is None or lo is None or hi is None:
        return SLOResult(
            **base,
            value=None,
            ci_low=None,
            ci_high=None,
            holds="not-evaluable",
            note="no samples to measure",
        )
    holds = slo_holds(slo, value, lo, hi)
    return SLOResult(**base, value=value, ci_low=lo, ci_high=hi, holds=holds, note=note)


def judge(
    tm: ThreatModel,
    clean: Proportion,
    results: list[EpsilonResult],
    trustworthy: bool,
    baseline: Report | None = None,
    goal_slos: list[SLOResult] | None = None,
) -> Verdict:
    """The verdict on ``tm``'s SLOs, then the already judged ``goal_slos`` (in that order)."""
    slos = [judge_slo(s, clean, results, baseline) for s in tm.slos]
    return verdict_of(slos + list(goal_slos or []), trustworthy)


def verdict_of(slos: list[SLOResult], trustworthy: bool) -> Verdict:
    """The verdict of judged SLOs: untrustworthy, no-slo, fail (an SLO not met or not
    evaluable) or pass."""
    failed = [s for s in slos if s.holds in ("no", "not-evaluable")]
    weak = [s for s in slos if s.holds == "point-estimate-only"]
    status: Literal["pass", "fail", "untrustworthy", "no-slo"]
    if not trustworthy:
        status = "untrustworthy"
        summary = (
            "Sanity checks failed: the robustness numbers may be overstated and must not "
            "be relied on. See the sanity checks."
        )
    elif not slos:
        status, summary = "no-slo", "No SLOs in the threat model; numbers reported only."
    elif failed:
        status = "fail"
        summary = f"{len(failed)} of {len(slos)} SLOs not met: " + "; ".join(s.slo for s in failed)
    else:
        status = "pass"
        summary = f"All {len(slos)} SLOs met"
        summary += (
            f"; {len(weak)} only on the point estimate (95% interval crosses the threshold: "
            "evaluate more samples to establish them)"
            if weak
            else " with 95% confidence"
        )
    return Verdict(status=status, summary=summary, slos=slos)
