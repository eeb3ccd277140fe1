"""The metric names advguard exports: the one authoritative list the dashboards, the SLO
rules and the tests check PromQL against.

``GUARD_METRICS`` is the guard's contract (``/metrics`` of ``advguard guard serve``; labels
in the comments), ``OFFLINE_METRICS`` the gauges of the nightly jobs
(:mod:`advguard.observe.offline`), ``PROMETHEUS_METRICS`` the series Prometheus itself
synthesises for alerting rules, and ``RECORDING_RULES`` the name patterns of the recording
rules :mod:`advguard.observe.slo` compiles. Names are the series names a query uses:
counters end in ``_total``; a histogram ``h`` is queried as ``h_bucket``, ``h_sum`` and
``h_count`` (:func:`series_names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from advguard.observe.slo import WINDOWS

MetricType = Literal["counter", "gauge", "histogram"]

GUARD_METRICS: dict[str, MetricType] = {
    # {model, version, endpoint, status}
    "advguard_guard_requests_total": "counter",
    # {model, version, action}; action: allow|fallback|review|reject|block|error
    "advguard_guard_decisions_total": "counter",
    # {model, version}
    "advguard_guard_input_rows_total": "counter",
    # {model, endpoint}
    "advguard_guard_request_latency_seconds": "histogram",
    # {model, limit}; limit: rate|budget
    "advguard_guard_rate_limited_total": "counter",
    # {reason}
    "advguard_guard_auth_failures_total": "counter",
    # {model, version, detector}: decisions in which the detector flagged at least one row
    "advguard_guard_detector_flags_total": "counter",
    # {model, detector}: unitless detector score
    "advguard_guard_detector_score": "histogram",
    # {model, version}: buckets in [0, 1]
    "advguard_guard_top1_confidence": "histogram",
    # {model, stage}; stage: limit|read|parse|validate|sanitize|detect|stateful|predict|record
    "advguard_guard_stage_latency_seconds": "histogram",
    # {model, client}; client: 12 hex of sha256(key id) for the top clients, "other"
    "advguard_guard_client_queries_total": "counter",
    # {model, detector, action}
    "advguard_guard_stateful_alerts_total": "counter",
    # {model}
    "advguard_guard_forensic_write_failures_total": "counter",
    # {model}: 1 small requests on the event loop, 0 in the thread pool (the inline rule)
    "advguard_guard_inline": "gauge",
    # {model}: moving average of the model's inline runs, seconds
    "advguard_guard_inline_run_seconds": "gauge",
    # {model, to}: moves between the event loop (to=loop) and the thread pool (to=pool)
    "advguard_guard_inline_switches_total": "counter",
    # {model}
    "advguard_guard_drift_input_psi": "gauge",
    "advguard_guard_drift_prediction_psi": "gauge",
    "advguard_guard_drift_confidence_zscore": "gauge",
    # {model, version, role}; role: production|canary|shadow
    "advguard_guard_routed_requests_total": "counter",
    # {model, reason}
    "advguard_guard_rollbacks_total": "counter",
    "advguard_guard_shadow_rows_total": "counter",
    # no labels: open incidents in the guard database
    "advguard_guard_incidents_open": "gauge",
}

OFFLINE_METRICS: dict[str, MetricType] = {
    # {model, threat_model, epsilon}
    "advguard_eval_robust_accuracy": "gauge",
    "advguard_eval_robust_accuracy_ci_low": "gauge",
    "advguard_eval_fooling_rate": "gauge",
    # {model, threat_model}
    "advguard_eval_clean_accuracy": "gauge",
    "advguard_eval_trustworthy": "gauge",
    "advguard_eval_verdict_passed": "gauge",
    "advguard_eval_samples": "gauge",
    "advguard_eval_timestamp_seconds": "gauge",
    # {model, policy}
    "advguard_gate_passed": "gauge",
    "advguard_gate_failed_checks": "gauge",
    # {model, method, norm, radius} / {model, method, norm}
    "advguard_certified_accuracy": "gauge",
    "advguard_certification_timestamp_seconds": "gauge",
}

#: Synthesised by Prometheus for alerting rules: ``ALERTS{alertname, alertstate, ...}``.
PROMETHEUS_METRICS: dict[str, MetricType] = {"ALERTS": "gauge"}

_SLO_NAME = r"[a-z][a-z0-9_]{0,62}"
_WINDOW = "|".join(re.escape(w) for w in WINDOWS)
#: Recording rules of :func:`advguard.observe.slo.compile_rules` (``slo`` label = SLO name).
RECORDING_RULES: tuple[re.Pattern[str], ...] = (
    re.compile(rf"slo:{_SLO_NAME}:error_ratio_rate(?:{_WINDOW})"),
    re.compile(rf"slo:{_SLO_NAME}:robust_accuracy"),
)


def series_names(metrics: Mapping[str, MetricType]) -> frozenset[str]:
    """The names queries use: a histogram's ``_bucket``/``_sum``/``_count``, others as is."""
    out: set[str] = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            out.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            out.add(name)
    return frozenset(out)


#: Every series name a dashboard or rule may query (recording rules are patterns, apart).
KNOWN_SERIES: frozenset[str] = (
    series_names(GUARD_METRICS) | series_names(OFFLINE_METRICS) | series_names(PROMETHEUS_METRICS)
)


def is_recording_rule(name: str) -> bool:
    return any(p.fullmatch(name) for p in RECORDING_RULES)


def is_known(name: str) -> bool:
    """True for an exported series name or a recording-rule name."""
    return name in KNOWN_SERIES or is_recording_rule(name)


def unknown(names: Iterable[str]) -> list[str]:
    """The names of ``names`` that no exporter or rule produces, sorted."""
    return sorted({n for n in names if not is_known(n)})


__all__ = [
    "GUARD_METRICS",
    "KNOWN_SERIES",
    "OFFLINE_METRICS",
    "PROMETHEUS_METRICS",
    "RECORDING_RULES",
    "MetricType",
    "is_known",
    "is_recording_rule",
    "is_rule_regex",
    "series_names",
    "unknown",
]


_RULE_REGEX = re.compile(
    rf"slo:[^:]+:(?:error_ratio_rate(?:{_WINDOW})|error_ratio_rate\((?:{_WINDOW})(?:\|(?:{_WINDOW}))*\)"
    r"|robust_accuracy)"
)


def is_rule_regex(regex: str) -> bool:
    """True when a ``__name__=~`` regex can only match recording-rule names: ``slo:``, any
    SLO-name pattern without ``:``, then a literal rule suffix (one window, an alternation of
    windows, or ``robust_accuracy``)."""
    return _RULE_REGEX.fullmatch(regex) is not None
