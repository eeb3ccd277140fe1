"""Robustness SLOs declared in YAML, compiled to Prometheus recording and alerting rules plus
an Alertmanager routing snippet.

The alerts follow the multi-window, multi-burn-rate recipe of the Google SRE workbook
(Beyer et al., *The Site Reliability Workbook*, O'Reilly 2018, chapter 5 "Alerting on SLOs",
table 5-8): page when 2% of a 30-day error budget burns within 1 hour (14.4x, checked over 1h
and 5m) or 5% within 6 hours (6x, over 6h and 30m); open a ticket when 10% burns within 3 days
(1x, over 3d and 6h). The short window makes an alert stop soon after the burn stops.

A file is data: names and labels are checked against a narrow character set before they are
put into PromQL, alert labels or Alertmanager matchers (no templates, no quotes can slip in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic import StringConstraints as S

from advguard.errors import InputError
from advguard.observe.offline import epsilon_label

#: Bucket bounds of ``advguard_guard_request_latency_seconds`` (the guard's histogram).
GUARD_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Error-ratio windows every ratio SLO records, in order.
WINDOWS: tuple[str, ...] = ("5m", "30m", "1h", "6h", "3d")


@dataclass(frozen=True)
class BurnAlert:
    """One multi-window burn-rate condition: ``budget_share`` of the period's error budget
    spent within ``long`` (checked again over ``short`` so the alert resets quickly)."""

    severity: Literal["page", "ticket"]
    long: str
    short: str
    budget_share: float

    def factor(self, period_s: int) -> float:
        """Burn-rate factor: 14.4, 6 and 1 for a 30-day period."""
        return round(self.budget_share * period_s / parse_duration(self.long), 6)


#: The workbook's recommended conditions (table 5-8).
BURN_ALERTS: tuple[BurnAlert, ...] = (
    BurnAlert("page", "1h", "5m", 0.02),
    BurnAlert("page", "6h", "30m", 0.05),
    BurnAlert("ticket", "3d", "6h", 0.10),
)

MAX_FILE_BYTES = 1 << 20
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = r"^[1-9][0-9]{0,5}[smhdw]$"
_SAFE = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$"

Name = Annotated[str, S(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
"""SLO name: becomes part of recording-rule names (``slo:<name>:error_ratio_rate5m``)."""
LabelValue = Annotated[str, S(pattern=_SAFE)]
"""Model, detector, endpoint, client, threat model: letters, digits and ``_.:/-`` only."""
Duration = Annotated[str, S(pattern=_DURATION)]
Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
Receiver = Annotated[str, S(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Text = Annotated[str, S(max_length=500)]


def parse_duration(text: str) -> int:
    """Seconds in a Prometheus duration with one unit (``5m``, ``30d``)."""
    if not re.match(_DURATION, text):
        raise InputError(f"not a duration like 5m, 6h or 30d: {text!r}")
    return int(text[:-1]) * _UNITS[text[-1]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeRange(_Strict):
    start: Annotated[str, S(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    end: Annotated[str, S(pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end <= self.start:
            raise ValueError(f"end {self.end} must be after start {self.start} (same day)")
        return self


class Maintenance(_Strict):
    """A recurring window (e.g. the nightly retrain) during which alerts are muted."""

    name: Annotated[str, S(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
    weekdays: list[Weekday] | None = None
    times: list[TimeRange] | None = None
    location: str = "UTC"
    models: list[LabelValue] | None = Field(
        None, description="Mute only these models' alerts (default: every advguard alert)."
    )

    @field_validator("location")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name like Europe/Paris)"
            ) from None
        return v

    @model_validator(mode="after")
    def _some_time(self) -> Maintenance:
        if not self.weekdays and not self.times:
            raise ValueError("give weekdays, times or both (an empty window would mute always)")
        return self


class Alerting(_Strict):
    runbook_base_url: Annotated[str, S(pattern=r"^https?://[^\s{}\"'<>]+$", max_length=300)]
    default_receiver: Receiver = "default"
    page_receiver: Receiver = "advguard-page"
    ticket_receiver: Receiver = "advguard-ticket"
    group_by: list[Annotated[str, S(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]] = ["model", "client"]
    group_wait: Duration = "30s"
    group_interval: Duration = "5m"
    repeat_interval_page: Duration = "1h"
    repeat_interval_ticket: Duration = "1d"


class _SLOBase(_Strict):
    name: Name
    model: LabelValue | None = Field(
        None, description="Model label value; omitted: every model, one alert per model."
    )
    client: LabelValue | None = Field(default=None, description="Owner label put on the alerts.")
    description: Text = ""


class _RatioSLO(_SLOBase):
    objective: float = Field(gt=0, lt=1, description="Share of good events, e.g. 0.99.")
    period: Duration = "30d"

    @model_validator(mode="after")
    def _feasible(self) -> _RatioSLO:
        period = parse_duration(self.period)
        if period < parse_duration("3d"):
            raise ValueError(f"period {self.period} is shorter than the 3d ticket window")
        page = BURN_ALERTS[0]
        threshold = page.factor(period) * (1 - self.objective)
        if threshold >= 1:
            raise ValueError(
                f"objective {self.objective} leaves a budget so large that the "
                f"{page.factor(period):g}x page threshold ({threshold:.3g}) exceeds 100%: "
                f"the page could never fire; use an objective above "
                f"{1 - 1 / page.factor(period):.4f}"
            )
        return self


class FlagRateSLO(_RatioSLO):
    """Share of guard decisions flagged by a detector (by all detectors when none is named;
    a decision flagged by two detectors then counts twice)."""

    kind: Literal["detector_flag_rate"]
    detector: LabelValue | None = None


class RejectedShareSLO(_RatioSLO):
    """Share of guard decisions with action ``reject``."""

    kind: Literal["rejected_share"]


class ErrorRateSLO(_RatioSLO):
    """Share of guard requests answered with a 5xx status."""

    kind: Literal["error_rate"]
    endpoint: LabelValue | None = None


class LatencySLO(_RatioSLO):
    """Share of guard requests slower than ``threshold_seconds`` (a histogram bucket bound)."""

    kind: Literal["latency"]
    threshold_seconds: float = Field(gt=0)
    endpoint: LabelValue | None = None


class RobustAccuracySLO(_SLOBase):
    """The last offline evaluation's robust accuracy (a gauge) must stay at or above
    ``target``; also alerts when that evaluation is older than ``max_age`` or untrustworthy."""

    kind: Literal["robust_accuracy"]
    threat_model: LabelValue
    epsilon: float = Field(ge=0)
    target: float = Field(gt=0, le=1)
    statistic: Literal["value", "ci_low"] = Field(
        "value", description="Alert on the point estimate or on the 95% CI lower bound."
    )
    max_age: Duration = "36h"
    for_: Duration = Field(default="5m", alias="for")
    severity: Literal["page", "ticket"] = "ticket"


SLO = Annotated[
    FlagRateSLO | RejectedShareSLO | ErrorRateSLO | LatencySLO | RobustAccuracySLO,
    Field(discriminator="kind"),
]


class SLOFile(_Strict):
    version: Literal[1] = 1
    alerting: Alerting
    latency_buckets: tuple[float, ...] = GUARD_LATENCY_BUCKETS
    maintenance: list[Maintenance] = Field(default_factory=list)
    slos: list[SLO] = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _cross_checks(self) -> SLOFile:
        names = [s.name for s in self.slos]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"slos: duplicate names {dup}")
        windows = [m.name for m in self.maintenance]
        if len(set(windows)) != len(windows):
            raise ValueError("maintenance: duplicate window names")
        for i, s in enumerate(self.slos):
            if isinstance(s, LatencySLO) and s.threshold_seconds not in self.latency_buckets:
                bounds = ", ".join(f"{b:g}" for b in self.latency_buckets)
                raise ValueError(
                    f"slos[{i}].threshold_seconds: {s.threshold_seconds:g} is not a bucket bound "
                    f"of advguard_guard_request_latency_seconds; use one of {bounds}"
                )
        return self


def _one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_slo_file(data: Any, source: str = "SLO file") -> SLOFile:
    """Validate an already parsed YAML document; one-line :class:`InputError` on failure."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with 'alerting' and 'slos'")
    try:
        return SLOFile.model_validate(data)
    except ValidationError as e:
        raise InputError(_one_line(e, source)) from None


def load_slo_file(path: str | Path) -> SLOFile:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"SLO file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise InputError(f"{p}: larger than {MAX_FILE_BYTES} bytes")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        pos = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise InputError(f"{p}: {problem}{pos}") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: not UTF-8 text") from None
    return parse_slo_file(data, str(p))


# -- compilation ------------------------------------------------------------------------------


def _sel(**labels: str | None) -> str:
    """A PromQL label selector from validated (safe-charset) values; ``~`` prefix = regex."""
    parts = []
    for k, v in labels.items():
        if v is None:
            continue
        op, val = ("=~", v[1:]) if v.startswith("~") else ("=", v)
        parts.append(f'{k}{op}"{val}"')
    return "{" + ",".join(parts) + "}"


def _rate(metric: str, sel: str, window: str) -> str:
    return f"sum by (model) (rate({metric}{sel}[{window}]))"


def ratio_expr(slo: FlagRateSLO | RejectedShareSLO | ErrorRateSLO | LatencySLO, w: str) -> str:
    """PromQL for the SLO's error ratio (bad events / all events) over window ``w``."""
    m = slo.model
    if isinstance(slo, FlagRateSLO):
        bad = _rate("advguard_guard_detector_flags_total", _sel(model=m, detector=slo.detector), w)
        return f"{bad}\n/\n{_rate('advguard_guard_decisions_total', _sel(model=m), w)}"
    if isinstance(slo, RejectedShareSLO):
        bad = _rate("advguard_guard_decisions_total", _sel(model=m, action="reject"), w)
        return f"{bad}\n/\n{_rate('advguard_guard_decisions_total', _sel(model=m), w)}"
    if isinstance(slo, ErrorRateSLO):
        bad = _rate(
            "advguard_guard_requests_total", _sel(model=m, endpoint=slo.endpoint, status="~5.."), w
        )
        total = _rate("advguard_guard_requests_total", _sel(model=m, endpoint=slo.endpoint), w)
        return f"{bad}\n/\n{total}"
    le = floatToGoString(slo.threshold_seconds)  # how prometheus-client writes the bound
    h = "advguard_guard_request_latency_seconds"
    fast = _rate(f"{h}_bucket", _sel(model=m, endpoint=slo.endpoint, le=le), w)
    total = _rate(f"{h}_count", _sel(model=m, endpoint=slo.endpoint), w)
    return f"1 - (\n{fast}\n/\n{total}\n)"


def record_name(slo_name: str, window: str) -> str:
    return f"slo:{slo_name}:error_ratio_rate{window}"


_KIND_TEXT = {
    "detector_flag_rate": "detector flag rate",
    "rejected_share": "rejected share",
    "error_rate": "5xx error rate",
    "latency": "latency",
    "robust_accuracy": "robust accuracy",
}


def _labels(slo: _SLOBase, severity: str) -> dict[str, str]:
    out = {"severity": severity, "slo": slo.name}
    if slo.model:
        out["model"] = slo.model
    if slo.client:
        out["client"] = slo.client
    return out


def _runbook(base: str, slo: str) -> str:
    return f"{base.rstrip('/')}/{slo}/{{{{ $labels.model }}}}"


def _ratio_group(slo: Any, alerting: Alerting) -> dict[str, Any]:
    period = parse_duration(slo.period)
    budget = 1 - slo.objective
    what = _KIND_TEXT[slo.kind]
    if isinstance(slo, LatencySLO):
        what = f"share of requests slower than {slo.threshold_seconds:g}s"
    rules: list[dict[str, Any]] = [
        {
            "record": record_name(slo.name, w),
            "expr": ratio_expr(slo, w),
            "labels": {"slo": slo.name},
        }
        for w in WINDOWS
    ]
    for severity in ("page", "ticket"):
        conds = [b for b in BURN_ALERTS if b.severity == severity]
        terms, texts = [], []
        for b in conds:
            thr = f"{b.factor(period) * budget:.6g}"
            terms.append(
                f"({record_name(slo.name, b.long)} > {thr}"
                f" and {record_name(slo.name, b.short)} > {thr})"
            )
            texts.append(f"{b.factor(period):g}x over {b.long} and {b.short}")
        pct = f"{slo.objective * 100:.6g}%"
        rules.append(
            {
                "alert": "AdvguardSLOFastBurn" if severity == "page" else "AdvguardSLOSlowBurn",
                "expr": "\nor\n".join(terms),
                "labels": _labels(slo, severity),
                "annotations": {
                    "summary": f"{{{{ $labels.model }}}}: {what} is burning the error budget "
                    f"of SLO {slo.name}",
                    "description": f"SLO {slo.name} ({pct} good over {slo.period}, error budget "
                    f"{budget:.6g}): the {what} error ratio burns the budget at "
                    + " or ".join(texts)
                    + f". Error ratios are recorded as slo:{slo.name}:error_ratio_rate<window>."
                    + (f" {slo.description}" if slo.description else ""),
                    "runbook_url": _runbook(alerting.runbook_base_url, slo.name),
                },
            }
        )
    return {"name": f"advguard-slo-{slo.name}", "rules": rules}


def _gauge_group(slo: RobustAccuracySLO, alerting: Alerting) -> dict[str, Any]:
    metric = (
        "advguard_eval_robust_accuracy"
        if slo.statistic == "value"
        else "advguard_eval_robust_accuracy_ci_low"
    )
    eps = epsilon_label(slo.epsilon)
    sel = _sel(model=slo.model, threat_model=slo.threat_model, epsilon=eps)
    run_sel = _sel(model=slo.model, threat_model=slo.threat_model)
    record = f"slo:{slo.name}:robust_accuracy"
    where = f"{slo.threat_model} at epsilon {eps}"
    runbook = _runbook(alerting.runbook_base_url, slo.name)
    stale = f"time() - max by (model) (advguard_eval_timestamp_seconds{run_sel}) > " + str(
        parse_duration(slo.max_age)
    )
    if slo.model:
        stale += f"\nor\nabsent(advguard_eval_timestamp_seconds{run_sel})"
    rules: list[dict[str, Any]] = [
        {"record": record, "expr": f"min by (model) ({metric}{sel})", "labels": {"slo": slo.name}},
        {
            "alert": "AdvguardRobustAccuracyBelowTarget",
            "expr": f"{record} < {slo.target:g}",
            "for": slo.for_,
            "labels": _labels(slo, slo.severity),
            "annotations": {
                "summary": f"{{{{ $labels.model }}}}: robust accuracy under {where} is below "
                f"{slo.target:g}",
                "description": f"The last offline evaluation measured a robust accuracy "
                f"({'95% CI lower bound' if slo.statistic == 'ci_low' else 'point estimate'}) "
                f"of {{{{ $value | humanizePercentage }}}} under {where}; the SLO {slo.name} "
                f"requires at least {slo.target:g}."
                + (f" {slo.description}" if slo.description else ""),
                "runbook_url": runbook,
            },
        },
        {
            "alert": "AdvguardEvaluationStale",
            "expr": stale,
            "labels": _labels(slo, "ticket"),
            "annotations": {
                "summary": f"{{{{ $labels.model }}}}: no evaluation under {slo.threat_model} "
                f"within {slo.max_age}",
                "description": f"SLO {slo.name} needs a nightly evaluation under "
                f"{slo.threat_model}; the last exported one is older than {slo.max_age} or "
                "missing, so its robust accuracy no longer describes the served model.",
                "runbook_url": runbook,
            },
        },
        {
            "alert": "AdvguardEvaluationUntrustworthy",
            "expr": f"min by (model) (advguard_eval_trustworthy{run_sel}) == 0",
            "labels": _labels(slo, "ticket"),
            "annotations": {
                "summary": f"{{{{ $labels.model }}}}: the last evaluation under "
                f"{slo.threat_model} is untrustworthy",
                "description": "A sanity check failed (e.g. gradient masking): the exported "
                f"robust accuracy may overstate robustness; SLO {slo.name} cannot be trusted "
                "until a trustworthy evaluation is exported.",
                "runbook_url": runbook,
            },
        },
    ]
    return {"name": f"advguard-slo-{slo.name}", "rules": rules}


def compile_rules(spec: SLOFile) -> dict[str, Any]:
    """The Prometheus rule file (``groups: [...]``) for every SLO in ``spec``."""
    groups = [
        _gauge_group(s, spec.alerting)
        if isinstance(s, RobustAccuracySLO)
        else _ratio_group(s, spec.alerting)
        for s in spec.slos
    ]
    return {"groups": groups}


def _interval(m: Maintenance) -> dict[str, Any]:
    ti: dict[str, Any] = {}
    if m.weekdays:
        ti["weekdays"] = list(m.weekdays)
    if m.times:
        ti["times"] = [{"start_time": t.start, "end_time": t.end} for t in m.times]
    ti["location"] = m.location
    return {"name": m.name, "time_intervals": [ti]}


def compile_alertmanager(spec: SLOFile) -> dict[str, Any]:
    """A complete, minimal Alertmanager config whose root route has one child for advguard
    alerts (copy that child under your own root route), grouping by model and client, with
    maintenance windows as ``time_intervals`` muting it. Receivers are empty shells to fill in
    (a receiver without integrations drops alerts)."""
    a = spec.alerting
    everywhere = [m.name for m in spec.maintenance if not m.models]
    # models with their own windows: route them separately, as the first matching route wins
    per_model: dict[str, list[str]] = {}
    for m in spec.maintenance:
        for model in m.models or []:
            per_model.setdefault(model, list(everywhere)).append(m.name)
    by_windows: dict[tuple[str, ...], list[str]] = {}
    for model, names in sorted(per_model.items()):
        by_windows.setdefault(tuple(names), []).append(model)
    receivers = {"page": a.page_receiver, "ticket": a.ticket_receiver}
    repeat = {"page": a.repeat_interval_page, "ticket": a.repeat_interval_ticket}
    routes: list[dict[str, Any]] = []
    for severity in ("page", "ticket"):
        for windows, models in by_windows.items():
            routes.append(
                {
                    "matchers": [
                        f'severity="{severity}"',
                        f'model=~"{"|".join(m.replace(".", "[.]") for m in models)}"',
                    ],
                    "receiver": receivers[severity],
                    "repeat_interval": repeat[severity],
                    "mute_time_intervals": list(windows),
                }
            )
        route: dict[str, Any] = {
            "matchers": [f'severity="{severity}"'],
            "receiver": receivers[severity],
            "repeat_interval": repeat[severity],
        }
        if everywhere:
            route["mute_time_intervals"] = list(everywhere)
        routes.append(route)
    out: dict[str, Any] = {
        "route": {
            "receiver": a.default_receiver,
            "routes": [
                {
                    "matchers": ['alertname=~"Advguard.+"'],
                    "receiver": a.ticket_receiver,
                    "group_by": list(a.group_by),
                    "group_wait": a.group_wait,
                    "group_interval": a.group_interval,
                    "routes": routes,
                }
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": ['severity="page"', 'alertname=~"Advguard.+"'],
                "target_matchers": ['severity="ticket"', 'alertname=~"Advguard.+"'],
                "equal": ["slo", "model"],
            }
        ],
        "receivers": [
            {"name": n} for n in dict.fromkeys([a.default_receiver, *receivers.values()])
        ],
    }
    if spec.maintenance:
        out["time_intervals"] = [_interval(m) for m in spec.maintenance]
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


RULES_FILE = "advguard-slo.rules.yml"
ALERTMANAGER_FILE = "alertmanager.yml"


def write_compiled(spec: SLOFile, out_dir: str | Path) -> list[Path]:
    """Write the rule file and the Alertmanager snippet into ``out_dir`` (atomically)."""
    from advguard.atomic import atomic_write_text

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is not a directory")
    header = "# Generated by `advguard slo compile`; edit the SLO YAML, not this file.\n"
    return [
        atomic_write_text(out / RULES_FILE, header + to_yaml(compile_rules(spec))),
        atomic_write_text(out / ALERTMANAGER_FILE, header + to_yaml(compile_alertmanager(spec))),
    ]


__all__ = [
    "BURN_ALERTS",
    "GUARD_LATENCY_BUCKETS",
    "SLO",
    "WINDOWS",
    "Alerting",
    "ErrorRateSLO",
    "FlagRateSLO",
    "LatencySLO",
    "Maintenance",
    "RejectedShareSLO",
    "RobustAccuracySLO",
    "SLOFile",
    "compile_alertmanager",
    "compile_rules",
    "load_slo_file",
    "parse_duration",
    "parse_slo_file",
    "ratio_expr",
    "record_name",
    "to_yaml",
    "write_compiled",
]
