"""The CI release gate: judge a robustness report against a policy (and a baseline).

Each rule of the policy becomes a *check* with an expected and an actual value and a status
(``pass``/``fail``/``skip``). The gate passes only when no check fails; an untrustworthy
evaluation never passes. Views: a table (CLI), Markdown (PR comments), JUnit XML (CI test
reports) and JSON. See ``docs/gate.md``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advguard.errors import InputError
from advguard.evaluate.compare import compare_reports
from advguard.evaluate.metrics import Proportion
from advguard.evaluate.report import Report, load_report
from advguard.evaluate.threat_model import SLO
from advguard.evaluate.verdict import judge_slo
from advguard.registry.policy import Policy

CheckStatus = Literal["pass", "fail", "skip"]


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    expected: str
    actual: str
    status: CheckStatus
    message: str = ""


class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["pass", "fail"]
    policy: str
    report: str = Field(description="label of the candidate report (model name/path)")
    baseline: str | None = None
    checks: list[Check]
    warnings: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]


# ----------------------------------------------------------------------------- baseline
def resolve_baseline(
    spec: str | Path, *, registry_model: str | None = None, threat_model: str | None = None
) -> Report:
    """Load the baseline: a report path, or ``production`` (the registry's production report).

    ``production`` asks the model registry's hook
    ``advguard.registry.store.resolve_baseline(name) -> Report | path`` for the report of the
    model ``registry_model`` now in production (for ``threat_model`` when given; the registry
    location comes from ``ADVGUARD_REGISTRY`` / ``ADVGUARD_REGISTRY_DB``).
    """
    if str(spec) != "production":
        return load_report(spec)
    if not registry_model:
        raise InputError(
            "--baseline production needs --registry-model NAME (the registered model whose "
            "production report is the baseline), or pass --baseline path/to/report.json"
        )
    try:
        from advguard.registry import store
    except ImportError:
        store = None  # type: ignore[assignment]
    hook = getattr(store, "resolve_baseline", None)
    if hook is None:
        raise InputError(
            "--baseline production: the model registry is unavailable in this installation "
            "(advguard.registry.store.resolve_baseline is missing); pass --baseline "
            "path/to/report.json instead"
        )
    found = hook(registry_model, threat_model=threat_model)
    if isinstance(found, Report):
        return found
    return load_report(found)


# ----------------------------------------------------------------------------- checks
def _pct(p: Proportion | float | None) -> str:
    if p is None:
        return "n/a"
    if isinstance(p, Proportion):
        if p.value is None:
            return "n/a (n=0)"
        return f"{p.value:.1%} [{p.ci_low:.1%}, {p.ci_high:.1%}]"
    return f"{p:.1%}"


def _report_slos(report: Report) -> list[SLO]:
    raw = report.threat_model.get("slos") or []
    out = []
    for s in raw:
        try:
            out.append(SLO.model_validate(s))
        except ValidationError as e:
            raise InputError(
                f"the report's threat model has an unreadable SLO {s!r}: {e}"
            ) from None
    return out


def _slo_check(
    slo: SLO, report: Report, baseline: Report | None, policy: Policy, src: str
) -> Check:
    r = judge_slo(slo, report.clean_accuracy, report.results, baseline)
    ok = {"with-confidence"} | (
        {"point-estimate-only"} if policy.slo_mode == "point-estimate" else set()
    )
    mode = "95% interval" if policy.slo_mode == "confidence" else "point estimate"
    if r.value is None:
        actual = "not evaluable"
    elif slo.metric.endswith("_drop"):
        actual = f"{r.value:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
    else:
        actual = f"{r.value:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]"
    status: CheckStatus = "pass" if r.holds in ok else "fail"
    if r.holds == "point-estimate-only" and status == "fail":
        msg = (
            "holds on the point estimate only: the 95% interval crosses the threshold; "
            "evaluate more samples (or use slo_mode: point-estimate)"
        )
    elif r.holds == "not-evaluable":
        missing = slo.epsilon is not None and report.result_at(slo.epsilon) is None
        evaluated = ", ".join(f"{e.epsilon:g}" for e in report.results)
        msg = (
            f"epsilon {slo.epsilon:g} was not evaluated in this report (evaluated: {evaluated})"
            if missing
            else r.note or "not evaluable"
        )
    elif r.holds == "no":
        msg = "SLO not met"
    else:
        msg = r.holds.replace("-", " ")
    return Check(
        name=f"{src} SLO: {slo}",
        expected=f"{slo.op} {slo.threshold:g} ({mode})",
        actual=actual,
        status=status,
        message=msg,
    )


def _attacks(r: Report) -> list[Any]:
    if r.suite:
        return [(s.attack, s.params) for s in r.suite]
    return list(r.threat_model.get("attacks") or [])


def _threat_model_diffs(base: Report, cand: Report) -> list[str]:
    diffs = []
    tb, tc = base.threat_model, cand.threat_model
    for key in ("norm", "knowledge", "goal"):
        if tb.get(key) != tc.get(key):
            diffs.append(f"{key} {tb.get(key)!r} vs {tc.get(key)!r}")
    eb = sorted(r.epsilon for r in base.results)
    ec = sorted(r.epsilon for r in cand.results)
    if len(eb) != len(ec) or any(abs(a - b) > 1e-9 for a, b in zip(eb, ec, strict=False)):
        diffs.append(f"epsilons {eb} vs {ec}")
    if _attacks(base) != _attacks(cand):
        na, nc = (", ".join(s.attack for s in r.suite) or "?" for r in (base, cand))
        diffs.append(f"attack suites [{na}] vs [{nc}] (or their parameters)")
    return diffs


def _baseline_checks(report: Report, baseline: Report, policy: Policy) -> list[Check]:
    checks: list[Check] = []
    diffs = _threat_model_diffs(baseline, report)
    if policy.require_same_threat_model:
        checks.append(
            Check(
                name="same threat model as baseline",
                expected="same norm, knowledge, goal, attacks, epsilons",
                actual="same" if not diffs else "; ".join(diffs),
                status="fail" if diffs else "pass",
                message=(
                    "baseline and candidate measure different threats: regressions cannot be "
                    "judged; re-evaluate both with the same threat model"
                    if diffs
                    else ""
                ),
            )
        )
    rob = policy.max_robust_accuracy_drop
    cln = policy.max_clean_accuracy_drop
    cmp = compare_reports(
        baseline,
        report,
        robust_tolerance=(rob if rob is not None else 0.0) / 100,
        clean_tolerance=(cln if cln is not None else 0.0) / 100,
    )
    for row in cmp.rows:
        limit = rob if row.metric == "robust_accuracy" else cln
        what = row.metric.replace("_", " ")
        name = f"{what} drop vs baseline" + (
            f" at eps {row.epsilon:g}" if row.epsilon is not None else ""
        )
        if row.only_in:
            checks.append(
                Check(
                    name=name,
                    expected=f"<= {limit:g} pts" if limit is not None else "no limit",
                    actual=f"epsilon only in the {'baseline' if row.only_in == 'a' else 'report'}",
                    status="skip",
                    message="not compared: evaluated in one report only",
                )
            )
            continue
        if row.delta is None:
            checks.append(
                Check(
                    name=name,
                    expected="a value in both reports",
                    actual="n/a (no samples)",
                    status="fail",
                    message="cannot compare: a report has no samples",
                )
            )
            continue
        drop = 0.0 - row.delta * 100  # (0.0 - x: no '-0.00' for equal values)
        actual = f"{drop:+.2f} pts ({_pct(row.a)} -> {_pct(row.b)})"
        if limit is None:
            checks.append(
                Check(name=name, expected="no limit", actual=actual, status="skip", message="")
            )
            continue
        checks.append(
            Check(
                name=name,
                expected=f"<= {limit:g} pts",
                actual=actual,
                status="fail" if row.regression else "pass",
                message=f"dropped {drop:.2f} points, limit {limit:g}" if row.regression else "",
            )
        )
    return checks


def run_gate(report: Report, policy: Policy, baseline: Report | None = None) -> GateResult:
    """Judge ``report`` against ``policy`` (and regression limits against ``baseline``)."""
    checks: list[Check] = []
    warnings: list[str] = []
    failed_sanity = [c.id for c in report.sanity_checks if c.status == "fail"]
    checks.append(
        Check(
            name="evaluation trustworthy",
            expected="true (all sanity checks pass)",
            actual=str(report.trustworthy).lower(),
            status="pass" if report.trustworthy else "fail",
            message=""
            if report.trustworthy
            else "sanity checks failed"
            + (f" ({', '.join(failed_sanity)})" if failed_sanity else "")
            + ": robust accuracy may be overstated; an untrustworthy evaluation never passes",
        )
    )
    if policy.min_samples is not None:
        n = report.clean_accuracy.n
        checks.append(
            Check(
                name="samples evaluated",
                expected=f">= {policy.min_samples}",
                actual=str(n),
                status="pass" if n >= policy.min_samples else "fail",
                message="" if n >= policy.min_samples else "too few samples for a release claim",
            )
        )
    slos = [("report", s) for s in _report_slos(report)] if policy.report_slos else []
    slos += [("policy", s) for s in policy.slos]
    if not slos:
        warnings.append("no SLOs in the report's threat model or the policy: nothing is required")
    for src, slo in slos:
        checks.append(_slo_check(slo, report, baseline, policy, src))
    if baseline is not None:
        if not baseline.trustworthy:
            warnings.append(
                "the baseline report is untrustworthy: regressions are judged against "
                "numbers that may be overstated"
            )
        checks += _baseline_checks(report, baseline, policy)
    elif policy.require_baseline:
        checks.append(
            Check(
                name="baseline given",
                expected="a baseline report",
                actual="none",
                status="fail",
                message="the policy requires --baseline",
            )
        )
    else:
        warnings.append("no baseline: regression limits not checked")
    status = "fail" if any(c.status == "fail" for c in checks) else "pass"
    return GateResult(
        status=status,
        policy=policy.name,
        report=_label(report),
        baseline=None if baseline is None else _label(baseline),
        checks=checks,
        warnings=warnings,
    )


def _label(r: Report) -> str:
    for key in ("name", "path", "source", "adapter"):
        if r.model.get(key):
            return str(r.model[key])
    return "model"


# ----------------------------------------------------------------------------- views
def _md(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_ICON = {"pass": "✅ pass", "fail": "❌ **FAIL**", "skip": "➖ skip"}


def gate_markdown(res: GateResult) -> str:
    """Markdown for a PR comment: the outcome, a table of checks and the warnings."""
    n = len(res.failures)
    head = "✅ **PASSED**" if res.passed else f"❌ **FAILED** ({n} check{'s' if n != 1 else ''})"
    base = f", baseline `{_md(res.baseline)}`" if res.baseline else ""
    out = [
        "## advguard release gate",
        "",
        f"{head} — model `{_md(res.report)}`, policy `{_md(res.policy)}`{base}",
        "",
        "| check | expected | actual | status |",
        "|---|---|---|---|",
    ]
    for c in res.checks:
        out.append(f"| {_md(c.name)} | {_md(c.expected)} | {_md(c.actual)} | {_ICON[c.status]} |")
    if res.failures:
        out += ["", "**Failures:**", ""]
        out += [f"- {_md(c.name)}: {_md(c.message)}" for c in res.failures]
    if res.warnings:
        out += ["", "**Warnings:**", ""]
        out += [f"- ⚠ {_md(w)}" for w in res.warnings]
    return "\n".join(out) + "\n"


def gate_junit(res: GateResult) -> str:
    """JUnit XML: one ``testcase`` per check; failed checks carry a ``failure`` element."""
    suites = ET.Element("testsuites", name="advguard gate")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"advguard gate: {res.policy}",
        tests=str(len(res.checks)),
        failures=str(len(res.failures)),
        errors="0",
        skipped=str(sum(c.status == "skip" for c in res.checks)),
        time="0",
    )
    suites.set("tests", suite.get("tests", "0"))
    suites.set("failures", suite.get("failures", "0"))
    suites.set("errors", "0")
    for c in res.checks:
        case = ET.SubElement(
            suite, "testcase", classname=f"advguard.gate.{res.report}", name=c.name, time="0"
        )
        if c.status == "fail":
            f = ET.SubElement(case, "failure", message=c.message or "check failed", type="gate")
            f.text = f"expected: {c.expected}\nactual: {c.actual}\n{c.message}".strip()
        elif c.status == "skip":
            ET.SubElement(case, "skipped", message=c.message or "not applicable")
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"expected: {c.expected}\nactual: {c.actual}"
    if res.warnings:
        err = ET.SubElement(suite, "system-err")
        err.text = "\n".join(res.warnings)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode")
