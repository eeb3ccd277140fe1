"""The robustness report: data first (a versioned, documented JSON schema), views second.

``Report`` is the single source of truth; ``report.json`` is ``Report.model_dump_json()``,
and the JSON Schema is ``Report.model_json_schema()`` (see ``docs/report-schema.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advguard.atomic import atomic_write_text
from advguard.errors import InputError
from advguard.evaluate.metrics import Proportion

SCHEMA_VERSION = "1.0"
REPORT_KIND = "advguard.robustness-report"

Status = Literal["pass", "warn", "fail", "skip"]


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
    stage: Literal["suite", "escalation", "sanity"] = "suite"


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
    escalation: str | None = Field(None, description="what the runner re-ran because of this check")
    status_before_escalation: Status | None = None


class SLOResult(_M):
    slo: str
    metric: str
    epsilon: float | None
    value: float | None
    ci_low: float | None
    ci_high: float | None
    holds: Literal["with-confidence", "point-estimate-only", "no", "not-evaluable"]
    note: str = ""


class Verdict(_M):
    status: Literal["pass", "fail", "untrustworthy", "no-slo"]
    summary: str
    slos: list[SLOResult]


class Finding(_M):
    atlas_technique: str
    atlas_name: str
    atlas_version: str
    epsilon: float | None
    summary: str
    severity: Literal["info", "low", "medium", "high"]


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

    def result_at(self, epsilon: float) -> EpsilonResult | None:
        return next((r for r in self.results if abs(r.epsilon - epsilon) < 1e-12), None)

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report.json"
        return atomic_write_text(path, self.model_dump_json(indent=2))


def load_report(path: str | Path) -> Report:
    p = Path(path)
    if not p.exists():
        raise InputError(f"report {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != REPORT_KIND:
        raise InputError(f"{p}: not an advguard robustness report")
    major = str(data.get("schema_version", "0")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise InputError(
            f"{p}: schema version {data.get('schema_version')} is not readable by this advguard "
            f"(reads {SCHEMA_VERSION.split('.')[0]}.x)"
        )
    try:
        return Report.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{p}: report does not match schema {SCHEMA_VERSION}: {e}") from None


def json_schema() -> dict[str, Any]:
    schema = Report.model_json_schema()
    schema["$id"] = f"https://advguard.dev/schemas/report-{SCHEMA_VERSION}.json"
    schema["title"] = f"advguard robustness report {SCHEMA_VERSION}"
    return schema
