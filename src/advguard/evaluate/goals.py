"""Threat-model goals beyond evasion: ``poisoning``, ``backdoor``, ``membership-inference`` and
``extraction``, as data.

A threat model may carry a ``goals:`` list; each goal names its ``kind``, its ``params`` (checked
here, per kind, with upper bounds on the work) and its own ``slos``::

    goals:
      - kind: backdoor
        params: {train_data: digits-train.npz, rate: 0.05, target: 0, epochs: 10}
        slos: [attack_success_rate <= 0.05, clean_accuracy >= 0.9]
      - kind: membership-inference
        params: {members: digits-train.npz, fpr: 0.001}
        slos: [auc <= 0.6, tpr_at_fpr <= 0.01]

This module holds the schema (:class:`GoalSpec`), the report section (:class:`GoalResult`,
:class:`GoalMetric`), the SLO judging the verdict, the report validation and the gate share,
and the ATLAS findings. Running a goal trains models, so the runner sits in the defenses
layer (:mod:`advguard.defenses.goals`).

ATLAS technique IDs and names were checked against the MITRE ATLAS data release
``dist/ATLAS.yaml`` of github.com/mitre-atlas/atlas-data, versions 5.0.0 (commit c8e9674)
and 5.6.0 (commit c1050fc), where they are identical: AML.T0020 *Poison Training Data*,
AML.T0018.000 *Poison AI Model* (sub-technique of AML.T0018 *Manipulate AI Model*, the
technique earlier releases called *Backdoor ML Model*), AML.T0043.004 *Insert Backdoor
Trigger*, AML.T0024 *Exfiltration via AI Inference API* with AML.T0024.000 *Infer Training
Data Membership* and AML.T0024.002 *Extract AI Model*.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from advguard.stats import Proportion, clopper_pearson

if TYPE_CHECKING:
    from advguard.evaluate.slo_result import SLOResult

GoalKind = Literal["poisoning", "backdoor", "membership-inference", "extraction"]
GOAL_KINDS: tuple[str, ...] = ("poisoning", "backdoor", "membership-inference", "extraction")

GOAL_METRICS: dict[str, tuple[str, ...]] = {
    "poisoning": ("clean_accuracy", "clean_accuracy_drop", "attack_success_rate"),
    "backdoor": ("attack_success_rate", "clean_accuracy", "clean_accuracy_drop"),
    "membership-inference": ("auc", "tpr_at_fpr"),
    "extraction": ("fidelity", "accuracy"),
}
"""The metrics each kind measures (and its SLOs may name)."""

GOAL_ATLAS: dict[str, tuple[str, ...]] = {
    "poisoning": ("AML.T0020",),
    "backdoor": ("AML.T0020", "AML.T0018.000", "AML.T0043.004"),
    "membership-inference": ("AML.T0024", "AML.T0024.000"),
    "extraction": ("AML.T0024", "AML.T0024.002"),
}
GOAL_PATH_PARAMS = ("train_data", "members", "non_members", "population", "pool")
"""Goal parameters naming data (a file, folder or builtin data set); relative paths are read
from the threat model's folder."""

MAX_EPOCHS = 500
MAX_QUERIES = 1_000_000
MAX_SHADOWS = 64

_GOAL_SLO_RE = re.compile(
    r"^\s*(?P<metric>[a-z_]+)\s*(?P<op>>=|<=|>|<)\s*(?P<thr>[-+0-9.eE]+%?)\s*$"
)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Training(_Params):
    """How the goal's own models are trained (advguard's trainer, standard training)."""

    train_data: str = Field(min_length=1, description="the clean training data to poison")
    arch: Literal["mlp", "small_cnn"] = "mlp"
    epochs: int = Field(default=10, ge=1, le=MAX_EPOCHS)
    lr: float = Field(default=1e-3, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1, le=65536)
    rate: float = Field(default=0.1, gt=0, lt=1, description="share of training rows poisoned")
    seed: int | None = Field(default=None, ge=0, description="default: the threat model's seed")


class PoisoningParams(_Training):
    """Label flipping: ``target`` only: rows of other classes relabelled ``target``; with
    ``source``: rows of ``source`` relabelled ``target``; ``target: null``: random flips."""

    target: int | None = Field(default=0, ge=0)
    source: int | None = Field(default=None, ge=0)


class BackdoorParams(_Training):
    """A dirty-label backdoor: BadNets patch or blended trigger, relabelled ``target``."""

    rate: float = Field(default=0.05, gt=0, lt=1)
    trigger: Literal["badnets", "blend"] = "badnets"
    target: int = Field(default=0, ge=0)
    source: int | None = Field(default=None, ge=0)
    size: int = Field(default=2, ge=1, le=1024, description="badnets patch size in pixels")
    position: Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"] = (
        "bottom-right"
    )
    alpha: float = Field(default=0.2, gt=0, le=1, description="blend opacity")


class MembershipParams(_Params):
    """Members are named here; non-members are the evaluation data unless ``non_members``."""

    members: str = Field(min_length=1, description="data the model was trained on")
    non_members: str | None = Field(default=None, min_length=1)
    fpr: float = Field(default=0.001, gt=0, lt=1, description="false-positive rate of tpr_at_fpr")
    max_samples: int = Field(default=2000, ge=1, le=1_000_000, description="per side")
    population: str | None = Field(
        default=None, min_length=1, description="population data: enables offline LiRA"
    )
    shadows: int = Field(default=4, ge=1, le=MAX_SHADOWS)
    shadow_epochs: int = Field(default=20, ge=1, le=MAX_EPOCHS)
    arch: Literal["mlp", "small_cnn"] = "mlp"
    bootstrap: int = Field(default=200, ge=0, le=10_000)


class ExtractionParams(_Params):
    """A stolen copy trained from at most ``queries`` answers of the model."""

    method: Literal["knockoff", "jacobian"] = "knockoff"
    queries: int = Field(default=500, ge=1, le=MAX_QUERIES, description="the query budget")
    mode: Literal["probabilities", "labels"] = "probabilities"
    pool: str | None = Field(
        default=None, min_length=1, description="query pool (default: half the evaluation data)"
    )
    arch: Literal["mlp", "small_cnn"] = "mlp"
    epochs: int = Field(default=30, ge=1, le=MAX_EPOCHS)
    checkpoints: int = Field(default=3, ge=1, le=20)


GOAL_PARAMS: dict[str, type[_Params]] = {
    "poisoning": PoisoningParams,
    "backdoor": BackdoorParams,
    "membership-inference": MembershipParams,
    "extraction": ExtractionParams,
}


class GoalSLO(BaseModel):
    """One SLO of a goal, e.g. ``attack_success_rate <= 0.05`` (no epsilon)."""

    model_config = ConfigDict(extra="forbid")
    metric: str
    op: Literal[">=", "<=", ">", "<"]
    threshold: float

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _GOAL_SLO_RE.match(v)
            if not m:
                raise ValueError(f"cannot read goal SLO {v!r}; write e.g. 'auc <= 0.6'")
            thr = m["thr"]
            value = float(thr[:-1]) / 100 if thr.endswith("%") else float(thr)
            return {"metric": m["metric"], "op": m["op"], "threshold": value}
        return v

    @model_validator(mode="after")
    def _finite(self) -> GoalSLO:
        if not math.isfinite(self.threshold):
            raise ValueError("the SLO threshold must be a finite number")
        return self

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


class GoalSpec(BaseModel):
    """One goal of a threat model: ``kind``, ``params`` (per kind) and ``slos``."""

    model_config = ConfigDict(extra="forbid")
    kind: GoalKind
    name: str = Field(default="", max_length=100, description="default: the kind")
    params: dict[str, Any] = Field(default_factory=dict)
    slos: list[GoalSLO] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> GoalSpec:
        if not self.name:
            self.name = self.kind
        try:
            checked = GOAL_PARAMS[self.kind].model_validate(self.params)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "params"
            raise ValueError(f"{self.kind} parameter '{where}': {err['msg']}") from None
        self.params = checked.model_dump()
        known = GOAL_METRICS[self.kind]
        for slo in self.slos:
            if slo.metric not in known:
                raise ValueError(
                    f"a {self.kind} goal measures {', '.join(known)}; not {slo.metric!r}"
                )
        return self

    def typed_params(self) -> Any:
        return GOAL_PARAMS[self.kind].model_validate(self.params)


# -- the report section ------------------------------------------------------------------
Interval = Literal["clopper-pearson", "bootstrap", "baseline-fixed", "none"]


class GoalMetric(BaseModel):
    """One measured metric of a goal, with its 95% interval.

    ``clopper-pearson``: a proportion ``k/n`` with its exact interval; ``bootstrap``: a
    percentile bootstrap interval (membership AUC); ``baseline-fixed``: a drop against the
    goal's reference metric taken as fixed, the interval from the measured metric (as for
    the evasion drop SLOs); ``none``: no interval (``ci_low``/``ci_high`` null)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    interval: Interval
    k: int | None = None
    n: int | None = None
    confidence: float = 0.95
    note: str = ""

    def proportion(self) -> Proportion | None:
        if self.interval != "clopper-pearson" or self.k is None or self.n is None:
            return None
        return Proportion(
            value=self.value, k=self.k, n=self.n, ci_low=self.ci_low or 0.0,
            ci_high=self.ci_high if self.ci_high is not None else 1.0,
            confidence=self.confidence,
        )  # fmt: skip


class GoalResult(BaseModel):
    """What one goal measured: its metrics, ATLAS technique IDs and details."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: GoalKind
    params: dict[str, Any]
    metrics: list[GoalMetric]
    atlas: list[str]
    details: dict[str, Any] = Field(default_factory=dict)
    seconds: float

    def metric(self, name: str) -> GoalMetric | None:
        return next((m for m in self.metrics if m.name == name), None)


def proportion_metric(name: str, p: Proportion | dict[str, Any], note: str = "") -> GoalMetric:
    """A :class:`GoalMetric` from a proportion (or its ``model_dump()``)."""
    q = p if isinstance(p, Proportion) else Proportion.model_validate(p)
    return GoalMetric(
        name=name, value=q.value, ci_low=q.ci_low, ci_high=q.ci_high, interval="clopper-pearson",
        k=q.k, n=q.n, confidence=q.confidence, note=note,
    )  # fmt: skip


def drop_metric(name: str, reference: Proportion, current: Proportion) -> GoalMetric:
    """``reference - current`` with the reference taken as fixed."""
    if reference.value is None or current.value is None:
        return GoalMetric(
            name=name, value=None, ci_low=None, ci_high=None, interval="none",
            note="no samples to measure",
        )  # fmt: skip
    return GoalMetric(
        name=name,
        value=reference.value - current.value,
        ci_low=reference.value - current.ci_high,
        ci_high=reference.value - current.ci_low,
        interval="baseline-fixed",
        confidence=current.confidence,
        note="reference (clean-trained) accuracy taken as fixed; interval from this model's",
    )


# -- judging -----------------------------------------------------------------------------
def goal_specs(threat_model: dict[str, Any]) -> list[GoalSpec]:
    """The goals of a dumped threat model (as stored in a report); raises ``ValueError``."""
    raw = threat_model.get("goals") or []
    if not isinstance(raw, list):
        raise ValueError("threat_model.goals is not a list")
    try:
        return [GoalSpec.model_validate(g) for g in raw]
    except ValidationError as e:
        raise ValueError(f"unreadable goal ({e.errors()[0]['msg']})") from None


def judge_goal_slo(spec: GoalSpec, slo: GoalSLO, result: GoalResult | None) -> SLOResult:
    """The :class:`~advguard.evaluate.verdict.SLOResult` of one goal SLO."""
    from advguard.evaluate.slo_result import SLOResult, slo_holds

    name = f"{spec.name}: {slo}"
    m = result.metric(slo.metric) if result is not None else None
    if m is None or m.value is None:
        why = "the goal did not run" if result is None else (m.note if m else "not measured")
        return SLOResult(
            slo=name, metric=slo.metric, epsilon=None, value=None, ci_low=None, ci_high=None,
            holds="not-evaluable", note=why or "not measured",
        )  # fmt: skip
    lo = m.ci_low if m.ci_low is not None else m.value
    hi = m.ci_high if m.ci_high is not None else m.value
    holds = slo_holds(slo, m.value, lo, hi)  # type: ignore[arg-type]
    return SLOResult(
        slo=name, metric=slo.metric, epsilon=None, value=m.value, ci_low=m.ci_low,
        ci_high=m.ci_high, holds=holds, note=m.note,
    )  # fmt: skip


def goal_slo_results(specs: list[GoalSpec], results: list[GoalResult]) -> list[SLOResult]:
    """Every goal SLO of ``specs`` judged on the goal results of the same name."""
    by_name = {r.name: r for r in results}
    return [judge_goal_slo(s, slo, by_name.get(s.name)) for s in specs for slo in s.slos]


# -- consistency -------------------------------------------------------------------------
_TOL = 1e-6


def _metric_problems(at: str, m: GoalMetric, metrics: dict[str, GoalMetric]) -> list[str]:
    where = f"{at}.{m.name}"
    if not 0 < m.confidence < 1:
        return [f"{where}: confidence {m.confidence} is not in (0, 1)"]
    finite = all(v is None or math.isfinite(v) for v in (m.value, m.ci_low, m.ci_high))
    if not finite:
        return [f"{where}: not a finite number"]
    if m.interval == "clopper-pearson":
        if m.k is None or m.n is None or not 0 <= m.k <= m.n:
            return [f"{where}: a proportion needs 0 <= k <= n, got k={m.k}, n={m.n}"]
        want = None if m.n == 0 else m.k / m.n
        if (want is None) != (m.value is None) or (
            want is not None and abs((m.value or 0.0) - want) > 1e-9
        ):
            return [f"{where}: value {m.value} is not k/n = {m.k}/{m.n}"]
        lo, hi = clopper_pearson(m.k, m.n, m.confidence)
        if (
            m.ci_low is None
            or m.ci_high is None
            or abs(m.ci_low - lo) > _TOL
            or abs(m.ci_high - hi) > _TOL
        ):
            return [f"{where}: interval is not the Clopper-Pearson interval of {m.k}/{m.n}"]
        return []
    if m.k is not None or m.n is not None:
        return [f"{where}: k/n given for a {m.interval} interval"]
    if m.interval == "none":
        return [] if m.ci_low is None and m.ci_high is None else [f"{where}: interval given"]
    if m.value is None or m.ci_low is None or m.ci_high is None or m.ci_low > m.ci_high + _TOL:
        return [f"{where}: needs a value and an interval ci_low <= ci_high"]
    if m.interval == "bootstrap":
        ok = all(-_TOL <= v <= 1 + _TOL for v in (m.value, m.ci_low, m.ci_high))
        return [] if ok else [f"{where}: value or interval outside [0, 1]"]
    base = m.name.removesuffix("_drop")
    cur, ref = metrics.get(base), metrics.get(f"reference_{base}")
    if cur is None or ref is None or cur.value is None or ref.value is None:
        return [f"{where}: a drop needs the metrics {base} and reference_{base}"]
    if cur.ci_low is None or cur.ci_high is None:
        return [f"{where}: {base} has no interval"]
    if not (
        abs(m.value - (ref.value - cur.value)) <= _TOL
        and abs(m.ci_low - (ref.value - cur.ci_high)) <= _TOL
        and abs(m.ci_high - (ref.value - cur.ci_low)) <= _TOL
    ):
        return [f"{where}: drop and interval do not follow from {base} and reference_{base}"]
    return []


def goal_problems(specs: list[GoalSpec], results: list[GoalResult]) -> list[str]:
    """What in the goal results contradicts itself or the threat model's goals."""
    from advguard.attacks.registry import ATLAS_TECHNIQUES

    out: list[str] = []
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        out.append("goals: a goal name is listed twice")
    spec_by_name = {s.name: s for s in specs}
    for r in results:
        at = f"goals[{r.name}]"
        spec = spec_by_name.get(r.name)
        if spec is None or spec.kind != r.kind:
            out.append(f"{at}: no {r.kind} goal of that name in the threat model")
        if set(r.atlas) != set(GOAL_ATLAS[r.kind]) or any(
            t not in ATLAS_TECHNIQUES for t in r.atlas
        ):
            out.append(f"{at}: ATLAS techniques {r.atlas} are not those of a {r.kind} goal")
        if not (math.isfinite(r.seconds) and r.seconds >= 0):
            out.append(f"{at}: seconds {r.seconds} is not a finite number >= 0")
        metrics = {m.name: m for m in r.metrics}
        if len(metrics) != len(r.metrics):
            out.append(f"{at}: a metric is listed twice")
        for m in r.metrics:
            out += _metric_problems(at, m, metrics)
    return out


# -- findings ----------------------------------------------------------------------------
_HEADLINE = {
    "poisoning": ("attack_success_rate", (0.5, 0.2, 0.05)),
    "backdoor": ("attack_success_rate", (0.5, 0.2, 0.05)),
    "membership-inference": ("auc", (0.8, 0.6, 0.55)),
    "extraction": ("fidelity", (0.9, 0.7, 0.5)),
}


def _summary(r: GoalResult, m: GoalMetric) -> str:
    ci = (
        f" [{m.ci_low:.3f}, {m.ci_high:.3f}]"
        if m.ci_low is not None and m.ci_high is not None
        else ""
    )
    kn = f" ({m.k} of {m.n})" if m.k is not None else ""
    what = {
        "poisoning": f"label flipping of {r.params.get('rate', 0):.1%} of the training rows",
        "backdoor": f"a {r.params.get('trigger')} backdoor in {r.params.get('rate', 0):.1%} "
        "of the training rows",
        "membership-inference": "membership inference on the model's outputs",
        "extraction": f"{r.params.get('method')} extraction with {r.params.get('queries')} queries",
    }[r.kind]
    return f"{what}: {m.name} {m.value:.3f}{ci}{kn}"


def goal_findings(results: list[GoalResult]) -> list[Any]:
    """One ATLAS-tagged finding per technique of each goal, with a severity from its headline
    metric (backdoor/poisoning attack success rate, membership AUC, extraction fidelity)."""
    from advguard.attacks.registry import ATLAS_TECHNIQUES, ATLAS_VERSION
    from advguard.evaluate.findings import Finding, Severity

    out = []
    for r in results:
        name, (high, medium, low) = _HEADLINE[r.kind]
        m = r.metric(name)
        if r.kind == "poisoning" and (m is None or m.value is None):
            m = r.metric("clean_accuracy_drop")
            high, medium, low = 0.2, 0.05, 0.01
        if m is None or m.value is None:
            continue
        v = m.value
        sev: Severity = (
            "high" if v >= high else "medium" if v >= medium else "low" if v >= low else "info"
        )
        for tid in r.atlas:
            out.append(
                Finding(
                    atlas_technique=tid,
                    atlas_name=ATLAS_TECHNIQUES[tid],
                    atlas_version=ATLAS_VERSION,
                    epsilon=None,
                    severity=sev,
                    summary=f"{r.name}: {_summary(r, m)}",
                )
            )
    return out
