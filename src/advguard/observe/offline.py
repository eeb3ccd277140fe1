"""Headline numbers of offline jobs (evaluation, gate, certification) as Prometheus metrics.

Nightly jobs are batch jobs: they cannot be scraped, so they write a text file for node
exporter's textfile collector (:func:`write_textfile`, atomic rename) or push to a Pushgateway
(:func:`push`). Every metric lives in a private :class:`~prometheus_client.CollectorRegistry`
built per call (:func:`build_registry`), never in the process-global one.

All metrics are gauges (the value of the last run), ratios in [0, 1], times in seconds since
the epoch. Reports are read as data and validated (size, schema) before anything is exported;
a proportion that could not be measured (``n = 0``) is left out rather than exported as a
number.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from advguard.errors import AdvguardError, InputError, MissingDependencyError

try:
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile
except ImportError:  # pragma: no cover - the observe extra is missing
    raise MissingDependencyError(
        "prometheus-client", "observe", "Prometheus rules and metrics"
    ) from None

SAFE_LABEL = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$"
"""Model, threat-model and job names we export: the characters the SLO YAML accepts."""

MAX_REPORT_BYTES = 256 << 20
MAX_GATE_BYTES = 16 << 20
MAX_CERT_BYTES = 64 << 20


def epsilon_label(eps: float) -> str:
    """The ``epsilon`` label value: the shortest text that reads back as the same float."""
    return repr(float(eps))


def _check_label(value: str, what: str) -> str:
    if not re.match(SAFE_LABEL, value):
        raise InputError(
            f"{what} {value[:80]!r} is not a usable label value (letters, digits and _.:/- "
            "only, at most 128 characters); name the model with --model"
        )
    return value


def _first(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def _read_json(path: str | Path, limit: int, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} does not exist")
    if p.stat().st_size > limit:
        raise InputError(f"{p}: {what} larger than {limit} bytes")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None


def load_gate_result(path: str | Path) -> Any:
    """A gate result saved from ``advguard gate --json``."""
    from advguard.registry.gate import GateResult

    data = _read_json(path, MAX_GATE_BYTES, "gate result")
    if not isinstance(data, dict) or "checks" not in data:
        raise InputError(f"{path}: not an advguard gate result (advguard gate --json)")
    try:
        return GateResult.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{path}: gate result does not match its schema: {_first(e)}") from None


def load_certification_report(path: str | Path) -> Any:
    from advguard.defenses.certify.report import CertificationReport

    data = _read_json(path, MAX_CERT_BYTES, "certification report")
    if not isinstance(data, dict) or data.get("kind") != "certification":
        raise InputError(f"{path}: not an advguard certification report (certify.json)")
    try:
        return CertificationReport.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{path}: certification report does not match: {_first(e)}") from None


def load_evaluation_report(path: str | Path) -> Any:
    from advguard.evaluate.report import load_report

    p = Path(path)
    if p.is_file() and p.stat().st_size > MAX_REPORT_BYTES:
        raise InputError(f"{p}: report larger than {MAX_REPORT_BYTES} bytes")
    return load_report(p)


def _model_name(info: dict[str, Any]) -> str | None:
    """The report's model name, else its file's stem: the first that is a usable label."""
    candidates = [info.get("name"), info.get("registry_name")]
    path = info.get("path")
    if isinstance(path, str) and path:
        candidates.append(Path(path).stem)
    for v in candidates:
        if isinstance(v, str) and re.match(SAFE_LABEL, v):
            return v
    return None


def _timestamp(iso: str, what: str) -> float:
    try:
        t = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        raise InputError(f"{what}: 'created' is not an ISO 8601 time: {iso!r}") from None
    if t.tzinfo is None:
        raise InputError(f"{what}: 'created' has no time zone: {iso!r}")
    return t.timestamp()


def build_registry(
    report: Any | None = None,
    *,
    gate: Any | None = None,
    certification: Any | None = None,
    model: str | None = None,
) -> tuple[CollectorRegistry, str]:
    """Metrics for an evaluation ``Report``, a ``GateResult`` and/or a
    ``CertificationReport``, in a new registry. Returns the registry and the model label
    (``model`` if given, else the report's model name)."""
    if report is None and gate is None and certification is None:
        raise InputError("nothing to export: give a report, a gate result or a certification")
    if model is None:
        for src in (report, certification):
            if src is not None:
                model = _model_name(src.model)
                if model:
                    break
    if not model:
        raise InputError("cannot tell the model's name from the files; pass --model NAME")
    _check_label(model, "model name")
    reg = CollectorRegistry(auto_describe=True)
    if report is not None:
        _report_metrics(reg, report, model)
    if gate is not None:
        _gate_metrics(reg, gate, model)
    if certification is not None:
        _certification_metrics(reg, certification, model)
    return reg, model


def _report_metrics(reg: CollectorRegistry, report: Any, model: str) -> None:
    """The evaluation's robust and clean accuracy, trust, verdict, samples and time."""
    tm = report.threat_model.get("name")
    if not isinstance(tm, str) or not tm:
        raise InputError("the report's threat model has no name")
    _check_label(tm, "threat model name")
    run = {"model": model, "threat_model": tm}
    per_eps = ["model", "threat_model", "epsilon"]
    ra = Gauge(
        "advguard_eval_robust_accuracy",
        "Robust accuracy of the last evaluation (worst case over the attack suite), by "
        "model, threat model and epsilon.",
        per_eps,
        registry=reg,
    )
    ra_low = Gauge(
        "advguard_eval_robust_accuracy_ci_low",
        "Lower end of the 95% Clopper-Pearson interval of the robust accuracy.",
        per_eps,
        registry=reg,
    )
    fool = Gauge(
        "advguard_eval_fooling_rate",
        "Share of correctly classified samples the attacks flipped, by epsilon.",
        per_eps,
        registry=reg,
    )
    for r in report.results:
        labels = {**run, "epsilon": epsilon_label(r.epsilon)}
        if r.robust_accuracy.value is not None:
            ra.labels(**labels).set(r.robust_accuracy.value)
            ra_low.labels(**labels).set(r.robust_accuracy.ci_low)
        if r.fooling_rate.value is not None:
            fool.labels(**labels).set(r.fooling_rate.value)
    clean = Gauge(
        "advguard_eval_clean_accuracy",
        "Clean accuracy on the evaluated samples.",
        list(run),
        registry=reg,
    )
    if report.clean_accuracy.value is not None:
        clean.labels(**run).set(report.clean_accuracy.value)
    Gauge(
        "advguard_eval_trustworthy",
        "1 if every sanity check of the last evaluation passed (its numbers can be "
        "trusted), 0 if not.",
        list(run),
        registry=reg,
    ).labels(**run).set(1 if report.trustworthy else 0)
    Gauge(
        "advguard_eval_verdict_passed",
        "1 if the last evaluation's verdict is pass (trustworthy and every SLO holds).",
        list(run),
        registry=reg,
    ).labels(**run).set(1 if report.verdict.status == "pass" else 0)
    Gauge(
        "advguard_eval_samples",
        "Number of samples the last evaluation attacked.",
        list(run),
        registry=reg,
    ).labels(**run).set(int(report.data.get("n_evaluated", 0)))
    Gauge(
        "advguard_eval_timestamp_seconds",
        "When the last evaluation ran (seconds since the epoch).",
        list(run),
        registry=reg,
    ).labels(**run).set(_timestamp(report.created, "report"))


def _gate_metrics(reg: CollectorRegistry, gate: Any, model: str) -> None:
    """Whether the release gate passed and how many checks failed."""
    g = {"model": model, "policy": str(gate.policy)[:200]}
    Gauge(
        "advguard_gate_passed",
        "1 if the last release gate passed, 0 if it failed.",
        list(g),
        registry=reg,
    ).labels(**g).set(1 if gate.passed else 0)
    Gauge(
        "advguard_gate_failed_checks",
        "Number of failed checks in the last release gate.",
        list(g),
        registry=reg,
    ).labels(**g).set(len(gate.failures))


def _certification_metrics(reg: CollectorRegistry, certification: Any, model: str) -> None:
    """Certified accuracy per radius and when the certification ran."""
    c = certification
    cl = {"model": model, "method": c.method, "norm": c.norm}
    cert = Gauge(
        "advguard_certified_accuracy",
        "Certified accuracy of the last certification run at a radius (L2 radius for "
        "smoothing, Linf epsilon for IBP).",
        [*cl, "radius"],
        registry=reg,
    )
    for p in c.results:
        if p.certified_accuracy.value is not None:
            cert.labels(**cl, radius=epsilon_label(p.radius)).set(p.certified_accuracy.value)
    Gauge(
        "advguard_certification_timestamp_seconds",
        "When the last certification ran (seconds since the epoch).",
        list(cl),
        registry=reg,
    ).labels(**cl).set(_timestamp(c.created, "certification report"))


def write_textfile(registry: CollectorRegistry, path: str | Path) -> Path:
    """Write the metrics in the Prometheus text format; atomic (temporary file + rename), so
    node exporter's textfile collector never reads half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(p), registry)
    return p


def push(
    registry: CollectorRegistry,
    url: str,
    *,
    job: str,
    model: str,
    timeout: float = 10.0,
) -> None:
    """PUT the metrics to a Pushgateway at ``url`` under ``job`` and grouping key ``model``
    (replacing that model's previous push, leaving other models' alone)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--pushgateway must be an http(s) URL, got {url[:100]!r}")
    if parts.username or parts.password:
        raise InputError("--pushgateway: credentials in the URL are not supported")
    _check_label(job, "job name")
    try:
        push_to_gateway(
            url, job=job, registry=registry, grouping_key={"model": model}, timeout=timeout
        )
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise AdvguardError(f"push to {url} failed: {e}") from None


__all__ = [
    "SAFE_LABEL",
    "build_registry",
    "epsilon_label",
    "load_certification_report",
    "load_evaluation_report",
    "load_gate_result",
    "push",
    "write_textfile",
]
