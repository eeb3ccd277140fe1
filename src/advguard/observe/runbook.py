"""Markdown runbooks for a served model, generated from its threat model, its SLO file and the
guard's policy: symptoms per alert, the queries and dashboards to open, the exact commands to
run (open an incident, block/throttle/isolate, preserve and triage, roll back), escalation and
closing.

Where they live: the SLO compiler gives every alert ``runbook_url: <runbook_base_url>/<slo
name>/<model>``; :func:`write_runbooks` writes ``<out>/<slo name>/<model>.md`` for each of the
model's SLOs (publish ``<out>`` at ``runbook_base_url`` with a static site generator that serves
``x.md`` at ``x``, e.g. MkDocs) and the whole runbook as ``<out>/<model>.md``.

Every value put into the Markdown comes from validated files (names match narrow patterns);
free text (descriptions) is escaped for Markdown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advguard.errors import InputError
from advguard.observe.slo import (
    ErrorRateSLO,
    FlagRateSLO,
    LatencySLO,
    RejectedShareSLO,
    RobustAccuracySLO,
    SLOFile,
    record_name,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class GuardPolicy:
    """What the runbook needs from the guard config (built by the CLI from ``GuardConfig``)."""

    model: str
    config_path: str = "guard.yaml"
    fallback: bool = False
    registry_model: str | None = None
    detectors: list[tuple[str, list[str]]] = field(default_factory=list)
    stateful: list[tuple[str, str]] = field(default_factory=list)
    rate: float = 10.0
    burst: int = 20
    budget: int | None = None
    budget_period: str = "day"
    forensics_mode: str = "hash-only"
    retention_days: int = 30
    guard_url: str = "http://127.0.0.1:8080"


def runbook_relpath(slo: str, model: str) -> str:
    """The path under ``runbook_base_url`` an alert of ``slo`` for ``model`` links to (the SLO
    compiler's ``<base>/<slo>/{{ $labels.model }}``), without the ``.md``."""
    return f"{slo}/{model}"


def _md(text: str) -> str:
    """Free text made inert in Markdown/HTML (one line, special characters escaped)."""
    t = " ".join(str(text).split())
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", t)


def _slos_for(spec: SLOFile | None, model: str) -> list[Any]:
    if spec is None:
        return []
    return [s for s in spec.slos if s.model is None or s.model == model]


_SYMPTOMS = {
    "detector_flag_rate": "More requests than usual are flagged by a detector: an evasion or "
    "probing campaign, or drift that makes benign inputs look unusual.",
    "rejected_share": "More requests are rejected by the guard policy: an attack being refused, "
    "or a detector threshold that no longer fits the traffic.",
    "error_rate": "The guard answers 5xx: the model, the database or the rate-limit store fails.",
    "latency": "Requests are slow: overload (a scraping client?), a slow model or database.",
    "robust_accuracy": "The nightly evaluation measures a robust accuracy below target, or it is "
    "stale or untrustworthy: the served model is weaker than its SLO promises.",
}


def _alerts_of(slo: Any) -> list[str]:
    if isinstance(slo, RobustAccuracySLO):
        return [
            "AdvguardRobustAccuracyBelowTarget",
            "AdvguardEvaluationStale",
            "AdvguardEvaluationUntrustworthy",
        ]
    return ["AdvguardSLOFastBurn (page)", "AdvguardSLOSlowBurn (ticket)"]


def _check_query(slo: Any, model: str) -> str:
    if isinstance(slo, RobustAccuracySLO):
        return f'slo:{slo.name}:robust_accuracy{{model="{model}"}}'
    return f'{record_name(slo.name, "1h")}{{model="{model}"}}'


def _alert_section(slo: Any, model: str, cfg: GuardPolicy) -> list[str]:
    lines = [f"### SLO `{slo.name}` ({slo.kind})", ""]
    lines.append(f"- Alerts: {', '.join(_alerts_of(slo))}")
    lines.append(f"- Symptom: {_SYMPTOMS[slo.kind]}")
    if isinstance(slo, FlagRateSLO | RejectedShareSLO | ErrorRateSLO | LatencySLO):
        lines.append(f"- Objective: {slo.objective:.6g} good over {slo.period}")
    if isinstance(slo, RobustAccuracySLO):
        lines.append(
            f"- Objective: robust accuracy >= {slo.target:g} under {slo.threat_model} at "
            f"epsilon {slo.epsilon:g} ({slo.statistic}), evaluated within {slo.max_age}"
        )
    if slo.description:
        lines.append(f"- Note: {_md(slo.description)}")
    lines.append(f"- Check: `{_check_query(slo, model)}`")
    if isinstance(slo, FlagRateSLO) and slo.detector:
        lines.append(
            f"- Detector: `{slo.detector}`; per request flags: "
            f'`rate(advguard_guard_detector_flags_total{{model="{model}",'
            f'detector="{slo.detector}"}}[5m])`'
        )
    if slo.client:
        lines.append(f"- Owner: {slo.client}")
    return [*lines, ""]


def _dashboards(model: str) -> list[str]:
    q = f'model="{model}"'
    return [
        "## Dashboards to open",
        "",
        "Grafana (advguard guard dashboards) or Prometheus, for this model:",
        "",
        "- Decisions by action: "
        f"`sum by (action) (rate(advguard_guard_decisions_total{{{q}}}[5m]))`",
        "- Detector flags: "
        f"`sum by (detector) (rate(advguard_guard_detector_flags_total{{{q}}}[5m]))`",
        f"- Top clients: `topk(10, rate(advguard_guard_client_queries_total{{{q}}}[5m]))`",
        f"- Rate limiting: `sum by (limit) (rate(advguard_guard_rate_limited_total{{{q}}}[5m]))`",
        f"- Drift: `advguard_guard_drift_input_psi{{{q}}}`, "
        f"`advguard_guard_drift_prediction_psi{{{q}}}`, "
        f"`advguard_guard_drift_confidence_zscore{{{q}}}`",
        f"- Latency p99: `histogram_quantile(0.99, sum by (le) "
        f"(rate(advguard_guard_request_latency_seconds_bucket{{{q}}}[5m])))`",
        "- Open incidents: `advguard_guard_incidents_open`",
        "",
    ]


def _commands(cfg: GuardPolicy) -> list[str]:
    c, m = cfg.config_path, cfg.model
    slow_rate = max(cfg.rate / 10, 0.1)
    slow_burst = max(1, cfg.burst // 10)
    iso = "fallback" if cfg.fallback else "reject"
    lines = [
        "## First response",
        "",
        "Keep every step in the incident record: each command below appends to its log.",
        "",
        "```sh",
        f'advguard incident open "<what you see>" --severity sev2 --model {m} -c {c}',
        "export INC=<the incident id printed above>",
        f"advguard guard review list -c {c}",
        f"advguard incident status $INC -c {c}",
        "```",
        "",
        "Find the clients: the top-clients panel, or the decisions of the last hours with",
        f"`advguard guard export --since 2h --model {m} --out recent.npz -c {c}`. Then:",
        "",
        "```sh",
        f'advguard incident block-client $INC <key id> --reason "<why>" -c {c}',
        f"advguard incident throttle-client $INC <key id> --rate {slow_rate:g} "
        f"--burst {slow_burst} --ttl 3600 -c {c}",
        f"advguard incident isolate $INC {m} --mode {iso} -c {c}",
        f"advguard incident preserve $INC --since 2h --client <key id> --out evidence/ -c {c}",
        f"advguard incident triage --incident $INC --evidence evidence/ "
        f"--reference <benign data> --out triage/ -c {c}",
        "```",
        "",
        f"Limits today: {cfg.rate:g} requests/s (burst {cfg.burst}) per key"
        + (f", {cfg.budget} input rows per {cfg.budget_period}" if cfg.budget else "")
        + f"; forensics {cfg.forensics_mode}, kept {cfg.retention_days} days"
        + (" (triage needs 'encrypted' payloads)" if cfg.forensics_mode != "encrypted" else "")
        + ".",
        "",
    ]
    if not cfg.fallback:
        lines += ["No fallback model is configured: isolation can only reject.", ""]
    return lines


def _rollback(cfg: GuardPolicy) -> list[str]:
    name = cfg.registry_model or "<registry model name>"
    return [
        "## Rollback",
        "",
        "When triage says *attack* and the current version is the weak point, or a new "
        "version caused the alert, put the previous production version back and hot-swap it:",
        "",
        "```sh",
        "export ADVGUARD_GUARD_ADMIN_KEY=<admin key>",
        f"advguard incident rollback $INC {name} --guard-url {cfg.guard_url} -c {cfg.config_path}",
        f"advguard registry show {name}",
        "```",
        "",
        "Lift the temporary measures once the guard serves the rolled-back version:",
        "",
        "```sh",
        f"advguard incident isolate $INC {cfg.model} --mode off -c {cfg.config_path}",
        f"advguard incident throttle-client $INC <key id> --clear -c {cfg.config_path}",
        "```",
        "",
    ]


def _escalation(spec: SLOFile | None, cfg: GuardPolicy) -> list[str]:
    page = spec.alerting.page_receiver if spec else "the on-call page"
    ticket = spec.alerting.ticket_receiver if spec else "the ticket queue"
    owners = sorted({s.client for s in _slos_for(spec, cfg.model) if s.client})
    return [
        "## Escalation",
        "",
        f"- Page alerts go to `{page}`, tickets to `{ticket}`"
        + (f"; model owners: {', '.join(owners)}." if owners else "."),
        "- Raise to **sev1** when the model is isolated for more than an hour, a rollback fails, "
        "or triage says *attack* and the inputs transfer to the fallback too.",
        "- Triage *drift*: hand over to the model owners (retrain or recalibrate the detectors); "
        "*inconclusive*: keep the evidence held and ask for a second look.",
        f'- Close: `advguard incident close $INC --summary "<what happened>" -c {cfg.config_path}`',
        "",
    ]


def _threat_section(tm: Any) -> list[str]:
    if tm is None:
        return ["## Threat model", "", "None given (`--threat-model`).", ""]
    eps = ", ".join(f"{e:g}" for e in tm.epsilons)
    attacks = ", ".join(a.attack for a in tm.attacks)
    lines = [
        "## Threat model",
        "",
        f"{_md(tm.name)}: {tm.knowledge} {tm.goal} attacks under {tm.norm} "
        f"with epsilons {eps}; evaluated with {attacks}.",
    ]
    if tm.description:
        lines.append(f"{_md(tm.description)}")
    if tm.slos:
        lines.append("Offline SLOs: " + "; ".join(f"`{s}`" for s in tm.slos) + ".")
    return [*lines, ""]


def render_runbook(
    cfg: GuardPolicy,
    *,
    threat_model: Any = None,
    slos: SLOFile | None = None,
    focus: str | None = None,
) -> str:
    """The runbook of ``cfg.model``; ``focus`` (an SLO name) puts that alert first."""
    if not _NAME.match(cfg.model):
        raise InputError(f"not a model name: {cfg.model!r}")
    mine = _slos_for(slos, cfg.model)
    if focus is not None:
        mine = sorted(mine, key=lambda s: s.name != focus)
    det = ", ".join(f"`{n}` ({'/'.join(a)})" for n, a in cfg.detectors) or "none"
    st = ", ".join(f"`{n}` ({a})" for n, a in cfg.stateful) or "none"
    lines = [
        f"# Runbook: {cfg.model}" + (f" (alert: SLO {focus})" if focus else ""),
        "",
        f"Generated by `advguard runbook generate --model {cfg.model}` from the guard config "
        f"`{cfg.config_path}`. Detectors: {det}. Stateful detectors: {st}. "
        f"Fallback: {'yes' if cfg.fallback else 'no'}.",
        "",
        "## Alerts and symptoms",
        "",
    ]
    for s in mine:
        lines += _alert_section(s, cfg.model, cfg)
    if not mine:
        lines += ["No SLO of the SLO file covers this model.", ""]
    lines += _threat_section(threat_model)
    lines += _dashboards(cfg.model)
    lines += _commands(cfg)
    lines += _rollback(cfg)
    lines += _escalation(slos, cfg)
    return "\n".join(lines)


def write_runbooks(
    cfg: GuardPolicy, out_dir: Path, *, threat_model: Any = None, slos: SLOFile | None = None
) -> list[Path]:
    """``<out>/<model>.md`` and ``<out>/<slo>/<model>.md`` per SLO of the model (the pages
    the alerts' ``runbook_url`` point at)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder for the runbooks")
    from advguard.atomic import atomic_write_text

    paths = [
        atomic_write_text(
            out / f"{cfg.model}.md", render_runbook(cfg, threat_model=threat_model, slos=slos)
        )
    ]
    for s in _slos_for(slos, cfg.model):
        text = render_runbook(cfg, threat_model=threat_model, slos=slos, focus=s.name)
        paths.append(atomic_write_text(out / f"{runbook_relpath(s.name, cfg.model)}.md", text))
    return paths
