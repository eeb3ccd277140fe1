"""The robustness report: data first (a versioned, documented JSON schema), views second.

``Report`` is the single source of truth; ``report.json`` is ``Report.model_dump_json()``,
and the JSON Schema is ``Report.model_json_schema()`` (see ``docs/report-schema.md``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advguard import _safejson
from advguard.atomic import atomic_write_text
from advguard.errors import InputError

# SLOResult and Verdict are defined with the judging code; this module re-exports them
from advguard.evaluate.findings import Finding as Finding
from advguard.evaluate.findings import Severity as Severity
from advguard.evaluate.goals import GoalResult, goal_problems, goal_slo_results, goal_specs
from advguard.evaluate.verdict import SLOResult as SLOResult
from advguard.evaluate.verdict import Verdict, judge_slo, slo_holds
from advguard.stats import Proportion, clopper_pearson

SCHEMA_VERSION = "1.1"
"""1.1 added ``goals`` (training-time and privacy goals); 1.0 reports read unchanged."""
REPORT_KIND = "advguard.robustness-report"

Status = Literal["pass", "warn", "fail", "skip"]
Stage = Literal["suite", "escalation", "sanity"]
Holds = Literal["with-confidence", "point-estimate-only", "no", "not-evaluable"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stat(_M):
    median: float | None
    mean: float | None


class AttackRow(_M):
    """One attack of the cascade at one epsilon."""

    attack: str
    order: int
    attacked: int = Field(description="samples this attack was run on (survivors so far)")
    newly_fooled: int
    attack_success_rate: Proportion = Field(description="newly_fooled / attacked")
    robust_accuracy_after: Proportion = Field(description="cumulative, after this attack")
    forward_evals: int
    gradient_evals: int
    seconds: float
    examples_per_second: float | None
    stage: Stage = "suite"


class EpsilonResult(_M):
    epsilon: float
    robust_accuracy: Proportion = Field(description="worst case over all attacks (final)")
    fooling_rate: Proportion = Field(description="share of correctly classified samples flipped")
    first_robust_accuracy: Proportion | None = Field(
        None, description="robust accuracy before escalation, when an escalation ran"
    )
    perturbation: dict[str, Stat] = Field(description="linf/l2/l0 size of successful examples")
    mean_true_class_confidence_drop: float | None
    per_attack: list[AttackRow]


class SanityCheck(_M):
    id: str
    title: str
    status: Status
    explanation: str
    suggestion: str = ""
    reference: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    escalation: str | None = Field(
        default=None, description="what the runner re-ran because of this check"
    )
    status_before_escalation: Status | None = None


class Example(_M):
    """One adversarial example kept for the report's picture grid."""

    epsilon: float
    attack: str
    index: int = Field(description="index of the sample in the data set")
    label: int
    clean_prediction: int
    clean_confidence: float
    adversarial_prediction: int
    adversarial_confidence: float
    x: list[Any] = Field(description="original input, nested lists")
    x_adv: list[Any] = Field(description="adversarial input, nested lists")


class FeatureChange(_M):
    feature: str
    mean_abs_change: float
    share_changed: float


class SuiteEntry(_M):
    order: int
    attack: str
    description: str
    knowledge: str
    params: dict[str, Any]
    atlas: list[str]


class Report(_M):
    schema_version: str = SCHEMA_VERSION
    kind: str = REPORT_KIND
    created: str
    advguard_version: str
    environment: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    threat_model: dict[str, Any]
    suite: list[SuiteEntry]
    sample_indices_sha256: str
    clean_accuracy: Proportion
    results: list[EpsilonResult]
    sanity_checks: list[SanityCheck]
    trustworthy: bool
    verdict: Verdict
    findings: list[Finding]
    examples: list[Example] = Field(default_factory=list)
    feature_changes: dict[str, list[FeatureChange]] = Field(
        default_factory=dict, description="tabular data: per epsilon, features changed most"
    )
    timing: dict[str, float]
    baseline: dict[str, Any] | None = None
    goals: list[GoalResult] = Field(
        default_factory=list,
        description="training-time and privacy goals of the threat model (schema 1.1)",
    )

    def result_at(self, epsilon: float) -> EpsilonResult | None:
        return next((r for r in self.results if abs(r.epsilon - epsilon) < 1e-12), None)

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report.json"
        return atomic_write_text(path, self.model_dump_json(indent=2))


class InconsistentReportError(InputError):
    """A report whose numbers contradict each other (edited by hand, or corrupted)."""


def load_report(path: str | Path) -> Report:
    """Read ``report.json`` safely and check it fully; raise :class:`InputError` if it is not
    a well-formed, internally consistent advguard report.

    The file is parsed with size, depth and number limits, validated strictly against the
    schema (no ``"0.99"`` for a number, no ``"true"`` for a boolean), then checked for
    internal consistency (:func:`consistency_problems`). Consistency cannot catch an edit
    that recomputes every dependent number: only a signed attestation can (docs/gate.md).
    """
    data = _safejson.load_file(path, what="report")
    return parse_report(data, str(path))


def parse_report(data: Any, source: str = "<report>") -> Report:
    """Validate a parsed report (a JSON object) as :func:`load_report` does."""
    if not isinstance(data, dict) or data.get("kind") != REPORT_KIND:
        raise InputError(f"{source}: not an advguard robustness report")
    major = str(data.get("schema_version", "0")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise InputError(
            f"{source}: schema version {str(data.get('schema_version'))[:20]!r} is not readable "
            f"by this advguard (reads {SCHEMA_VERSION.split('.')[0]}.x)"
        )
    try:
        report = Report.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise InputError(
            f"{source}: report does not match schema {SCHEMA_VERSION}: field '{where}': "
            f"{first['msg']}{more}"
        ) from None
    problems = consistency_problems(report)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InconsistentReportError(
            f"{source}: report is internally inconsistent (edited or corrupted): "
            f"{problems[0]}{more}"
        )
    return report


_TOL_VALUE = 1e-9  # k/n is exact up to float rounding
_TOL_CI = 1e-6  # Clopper-Pearson quantiles agree to ~1e-12 across scipy versions


def _proportion_problems(name: str, p: Proportion) -> list[str]:
    if not (0 <= p.k <= p.n):
        return [f"{name}: k={p.k}, n={p.n} (need 0 <= k <= n)"]
    if not 0 < p.confidence < 1:
        return [f"{name}: confidence {p.confidence} is not in (0, 1)"]
    if p.n == 0:
        if p.value is not None:
            return [f"{name}: value {p.value} with n=0 (must be null)"]
    elif p.value is None or not abs(p.value - p.k / p.n) <= _TOL_VALUE:
        return [f"{name}: value {p.value} is not k/n = {p.k}/{p.n}"]
    lo, hi = clopper_pearson(p.k, p.n, p.confidence)
    if not (abs(p.ci_low - lo) <= _TOL_CI and abs(p.ci_high - hi) <= _TOL_CI):
        return [
            f"{name}: interval [{p.ci_low}, {p.ci_high}] is not the Clopper-Pearson "
            f"{p.confidence:g} interval of {p.k}/{p.n} ([{lo:.6f}, {hi:.6f}])"
        ]
    return []


def consistency_problems(report: Report) -> list[str]:
    """What in ``report`` contradicts the rest of it (empty: consistent).

    Every proportion must be ``k/n`` with its exact Clopper-Pearson interval (the method
    advguard reports use) at its own confidence, so within [0, 1]; per epsilon, robust
    accuracy is measured on the clean samples (same n, robust k <= clean k) and the fooling
    rate is the rest of the correctly classified samples; robust accuracy cannot rise with
    epsilon (a sample fooled at a smaller budget counts as fooled at every larger one); the
    ``trustworthy`` flag must match the sanity checks, and the verdict must follow from the
    trust flag and the SLOs recomputed from the report's own numbers.
    """
    out: list[str] = []
    clean = report.clean_accuracy
    out += _proportion_problems("clean_accuracy", clean)
    prev: tuple[float, int] | None = None
    for r in sorted(report.results, key=lambda r: r.epsilon):
        at = f"results[eps={r.epsilon:g}]"
        if not (math.isfinite(r.epsilon) and r.epsilon >= 0):
            out.append(f"{at}: epsilon {r.epsilon} is not a finite number >= 0")
            continue
        ra, fr = r.robust_accuracy, r.fooling_rate
        out += _proportion_problems(f"{at}.robust_accuracy", ra)
        out += _proportion_problems(f"{at}.fooling_rate", fr)
        if ra.n != clean.n or ra.k > clean.k:
            out.append(
                f"{at}.robust_accuracy {ra.k}/{ra.n} does not fit clean accuracy "
                f"{clean.k}/{clean.n} (robust samples are correctly classified clean samples)"
            )
        elif fr.n != clean.k or fr.k != clean.k - ra.k:
            out.append(
                f"{at}.fooling_rate {fr.k}/{fr.n} is not the {clean.k - ra.k} fooled of the "
                f"{clean.k} correctly classified samples"
            )
        if r.first_robust_accuracy is not None:
            f = r.first_robust_accuracy
            out += _proportion_problems(f"{at}.first_robust_accuracy", f)
            if f.n != ra.n or not (ra.k <= f.k <= clean.k):
                out.append(
                    f"{at}.first_robust_accuracy {f.k}/{f.n} is not between the final robust "
                    f"accuracy and the clean accuracy (escalation only lowers it)"
                )
        for row in r.per_attack:
            rat = f"{at}.per_attack[{row.order}. {row.attack}]"
            out += _proportion_problems(f"{rat}.attack_success_rate", row.attack_success_rate)
            out += _proportion_problems(f"{rat}.robust_accuracy_after", row.robust_accuracy_after)
            asr, after = row.attack_success_rate, row.robust_accuracy_after
            if (asr.k, asr.n) != (row.newly_fooled, row.attacked):
                out.append(f"{rat}: success rate {asr.k}/{asr.n} is not newly_fooled/attacked")
            if after.n != clean.n or not (ra.k <= after.k <= clean.k):
                out.append(
                    f"{rat}: robust accuracy after it, {after.k}/{after.n}, is not between the "
                    "final robust accuracy and the clean accuracy"
                )
        if prev is not None:
            if abs(r.epsilon - prev[0]) <= 1e-12:
                out.append(f"{at}: epsilon listed twice")
            elif ra.k > prev[1]:
                out.append(
                    f"{at}.robust_accuracy {ra.k}/{ra.n} is higher than at the smaller epsilon "
                    f"{prev[0]:g} ({prev[1]}/{ra.n}); robust accuracy cannot rise with epsilon"
                )
        prev = (r.epsilon, ra.k)
    failed = [c.id for c in report.sanity_checks if c.status == "fail"]
    if report.trustworthy == bool(failed):
        why = f"sanity checks failed ({', '.join(failed)})" if failed else "no sanity check failed"
        out.append(f"trustworthy is {str(report.trustworthy).lower()} but {why}")
    out += _verdict_problems(report)
    return out


def _goal_verdict_problems(report: Report, got: list[SLOResult]) -> list[str]:
    """Goal results consistent in themselves, and the verdict's goal SLOs recomputed."""
    try:
        specs = goal_specs(report.threat_model)
    except ValueError as e:
        return [f"threat_model.goals: {e}"]
    out = goal_problems(specs, report.goals)
    if out:
        return out
    want = goal_slo_results(specs, report.goals)
    if len(want) != len(got):
        return [f"verdict judges {len(got)} goal SLOs, the threat model's goals have {len(want)}"]
    for w, g in zip(want, got, strict=True):
        if (w.slo, w.metric, w.value, w.ci_low, w.ci_high, w.holds) != (
            g.slo,
            g.metric,
            g.value,
            g.ci_low,
            g.ci_high,
            g.holds,
        ):
            out.append(
                f"verdict goal SLO '{w.slo}': {g.value} [{g.ci_low}, {g.ci_high}] {g.holds!r} "
                f"is not the report's measured {w.value} [{w.ci_low}, {w.ci_high}] {w.holds!r}"
            )
    return out


def _verdict_problems(report: Report) -> list[str]:
    from advguard.evaluate.threat_model import SLO

    v = report.verdict
    if (v.status == "untrustworthy") != (not report.trustworthy):
        return [f"verdict is {v.status!r} but trustworthy is {str(report.trustworthy).lower()}"]
    raw = report.threat_model.get("slos") or []
    if not isinstance(raw, list):
        return ["threat_model.slos is not a list"]
    try:
        slos = [SLO.model_validate(s) for s in raw]
    except ValidationError as e:
        return [f"threat_model.slos: unreadable SLO ({e.errors()[0]['msg']})"]
    if len(v.slos) < len(slos):
        return [f"verdict judges {len(v.slos)} SLOs, the threat model has {len(slos)}"]
    out: list[str] = _goal_verdict_problems(report, v.slos[len(slos) :])
    for slo, got in zip(slos, v.slos[: len(slos)], strict=True):
        name = f"verdict SLO '{slo}'"
        if got.metric != slo.metric:
            out.append(f"{name}: metric {got.metric!r}")
            continue
        if slo.metric.endswith("_drop"):
            if got.value is None or got.ci_low is None or got.ci_high is None:
                if got.holds != "not-evaluable":
                    out.append(f"{name}: holds {got.holds!r} without a value")
                continue
            cur = (
                report.clean_accuracy
                if slo.metric == "clean_accuracy_drop"
                else getattr(report.result_at(slo.epsilon or 0.0), "robust_accuracy", None)
            )
            if cur is None or cur.value is None:
                out.append(f"{name}: the measured value is missing from the report")
                continue
            ref = got.value + cur.value  # the baseline value the drop was taken from
            if not (
                -_TOL_VALUE <= ref <= 1 + _TOL_VALUE
                and abs(got.ci_low - (ref - cur.ci_high)) <= _TOL_CI
                and abs(got.ci_high - (ref - cur.ci_low)) <= _TOL_CI
            ):
                out.append(f"{name}: drop and interval do not match the measured accuracy")
                continue
            want: Holds = slo_holds(slo, got.value, got.ci_low, got.ci_high)
        else:
            exp = judge_slo(slo, report.clean_accuracy, report.results, None)
            if (exp.value, exp.ci_low, exp.ci_high) != (got.value, got.ci_low, got.ci_high):
                out.append(
                    f"{name}: value {got.value} [{got.ci_low}, {got.ci_high}] is not the "
                    f"report's measured {exp.value} [{exp.ci_low}, {exp.ci_high}]"
                )
                continue
            want = exp.holds
        if got.holds != want:
            out.append(f"{name}: says {got.holds!r}, the numbers say {want!r}")
    if out or not report.trustworthy:
        return out
    held = [s.holds for s in v.slos]
    want_status = (
        "no-slo"
        if not held
        else "fail"
        if any(h in ("no", "not-evaluable") for h in held)
        else "pass"
    )
    if v.status != want_status:
        out.append(f"verdict is {v.status!r} but its SLO results make it {want_status!r}")
    return out


RUN_DEPENDENT_FIELDS = ("second", "created", "environment", "timing", "duration")
"""Path fragments of the report fields that differ between two runs of one evaluation."""


def report_fields(report: Report | dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """A report (model or JSON document) as flat ``path -> value``, without the fields that
    depend on the run (timings, dates, the environment) nor paths containing ``ignore``:
    what two runs of the same evaluation (batch sizes, shards, backends, a resume) must agree
    on, field by field."""
    doc = json.loads(report.model_dump_json()) if isinstance(report, Report) else report
    out: dict[str, Any] = {}

    def walk(o: Any, p: str) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{p}.{k}")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, f"{p}[{i}]")
        else:
            out[p] = o

    walk(doc, "")
    skip = RUN_DEPENDENT_FIELDS + tuple(ignore)
    return {k: v for k, v in out.items() if not any(s in k for s in skip)}


def json_schema() -> dict[str, Any]:
    schema = Report.model_json_schema()
    schema["$id"] = f"https://advguard.dev/schemas/report-{SCHEMA_VERSION}.json"
    schema["title"] = f"advguard robustness report {SCHEMA_VERSION}"
    return schema
