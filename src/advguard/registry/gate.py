"""The CI release gate: judge a robustness report against a policy (and a baseline).

Each rule of the policy becomes a *check* with an expected and an actual value and a status
(``pass``/``fail``/``skip``). The gate passes only when no check fails; an untrustworthy
evaluation never passes. Views: a table (CLI), Markdown (PR comments), JUnit XML (CI test
reports) and JSON. See ``docs/gate.md``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advguard import _safejson
from advguard.errors import InputError
from advguard.evaluate.compare import compare_reports
from advguard.evaluate.formatting import attack_suite as _attacks
from advguard.evaluate.formatting import md as _md
from advguard.evaluate.formatting import pct
from advguard.evaluate.formatting import report_label as _label
from advguard.evaluate.goals import GOAL_PATH_PARAMS, goal_specs, judge_goal_slo
from advguard.evaluate.report import Report, parse_report
from advguard.evaluate.threat_model import SLO
from advguard.evaluate.verdict import judge_slo
from advguard.registry.objects import sha256_file
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


# ----------------------------------------------------------------------------- attestation
def default_attestation_path(report_path: str | Path) -> Path:
    """``reports/01-x.json`` -> ``reports/01-x.intoto.json`` (the layout of registry pull)."""
    p = Path(report_path)
    return p.with_name(p.name.removesuffix(".json") + ".intoto.json")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def model_digest(model: str | Path) -> str:
    """SHA-256 (hex) of the model artifact being released."""
    p = Path(model)
    if not p.is_file():
        raise InputError(f"model {str(p)!r} (--model) does not exist or is not a file")
    return sha256_file(p)[0]


def model_binding_problem(report: Report, digest: str) -> str | None:
    """Why ``report`` is not about the model with sha256 ``digest`` (None: it is)."""
    claimed = report.model.get("sha256")
    if not isinstance(claimed, str) or not claimed:
        return "the report names no model digest (model.sha256)"
    if claimed.lower().removeprefix("sha256:") != digest:
        return f"the report was made for model sha256 {claimed[:64]}, not {digest}"
    return None


def verify_attested_report(
    report_path: str | Path,
    public_key: str | Path,
    model: str | Path,
    attestation: str | Path | None = None,
) -> Report:
    """Load ``report_path`` and prove it: its signed attestation (a DSSE envelope from
    :func:`advguard.registry.signing.attest_report`; default next to the report, see
    :func:`default_attestation_path`) must verify with ``public_key``, be about the model
    file ``model`` (its sha256), and contain exactly the report's content, whose own
    ``model.sha256`` must be that digest too.

    Returns the verified report (also checked for schema and consistency). Raises
    :class:`~advguard.registry.signing.SignatureError` when verification fails and
    :class:`InputError` for missing or malformed files.
    """
    from advguard.registry import signing

    att = Path(attestation) if attestation is not None else default_attestation_path(report_path)
    digest = model_digest(model)
    on_disk = _safejson.load_file(report_path, what="report")
    if not att.is_file():
        raise signing.SignatureError(
            f"no attestation for {report_path} ({att} does not exist): the report is not signed"
        )
    envelope = _safejson.read_bytes(att, what="attestation")
    _safejson.loads(envelope, source=str(att))  # bounded parse before the verifier's own
    predicate = signing.verify_report_attestation(envelope, Path(public_key), digest)
    if canonical(on_disk) != canonical(predicate):
        raise signing.SignatureError(
            f"{report_path} differs from the report signed in {att}: it was edited after signing"
        )
    report = parse_report(predicate, str(report_path))
    problem = model_binding_problem(report, digest)
    if problem:
        raise signing.SignatureError(f"{report_path}: {problem}")
    return report


def provenance_checks(
    report_path: str | Path,
    report: Report,
    *,
    model: str | Path | None = None,
    public_key: str | Path | None = None,
    attestation: str | Path | None = None,
    require_attestation: bool = False,
) -> tuple[list[Check], list[str]]:
    """Checks that tie the report to a signer and to the released model.

    With ``public_key`` (needs ``model``): the ``report attestation`` check (see
    :func:`verify_attested_report`). Without it, with ``model``: only the report's own
    ``model.sha256`` is compared (a hand edit can change it too). ``require_attestation``
    without a key is a usage error. Returns ``(checks, warnings)``.
    """
    from advguard.registry import signing

    if public_key is None:
        if require_attestation:
            raise InputError(
                "this gate requires a signed report attestation: pass --public-key PEM and "
                "--model FILE (the policy's require_attestation or --require-attestation)"
            )
        checks = []
        if model is not None:
            digest = model_digest(model)
            problem = model_binding_problem(report, digest)
            checks.append(
                Check(
                    name="report is about the released model",
                    expected=f"model sha256 {digest}",
                    actual=str(report.model.get("sha256") or "none")[:80],
                    status="fail" if problem else "pass",
                    message=problem or "",
                )
            )
        warnings = [
            "the report is not verified against a signed attestation: the gate checked its "
            "schema and internal consistency only, which a hand edit that recomputes every "
            "number passes; use --public-key (docs/gate.md)"
        ]
        return checks, warnings
    if model is None:
        raise InputError(
            "--public-key needs --model FILE: the released model, whose sha256 the report's "
            "attestation must name"
        )
    digest = model_digest(model)
    try:
        verify_attested_report(report_path, public_key, model, attestation)
    except signing.SignatureError as e:
        status: CheckStatus = "fail"
        actual, message = "not verified", str(e)
    else:
        status, actual, message = "pass", "verified", ""
    return [
        Check(
            name="report attestation",
            expected=f"signed by {Path(public_key).name}, about model sha256 {digest}, unedited",
            actual=actual,
            status=status,
            message=message,
        )
    ], []


# ----------------------------------------------------------------------------- checks


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


def _goal_checks(report: Report, policy: Policy) -> list[Check]:
    """One check per SLO of the report's threat-model goals (poisoning, backdoor, membership
    inference, extraction), judged on the report's goal results like the evasion SLOs."""
    try:
        specs = goal_specs(report.threat_model)
    except ValueError as e:
        raise InputError(f"the report's threat model has an unreadable goal: {e}") from None
    ok = {"with-confidence"} | (
        {"point-estimate-only"} if policy.slo_mode == "point-estimate" else set()
    )
    mode = "95% interval" if policy.slo_mode == "confidence" else "point estimate"
    by_name = {g.name: g for g in report.goals}
    checks = []
    for spec in specs:
        for slo in spec.slos:
            r = judge_goal_slo(spec, slo, by_name.get(spec.name))
            ci = f" [{r.ci_low:.4f}, {r.ci_high:.4f}]" if r.ci_low is not None else ""
            actual = "not evaluable" if r.value is None else f"{r.value:.4f}{ci}"
            status: CheckStatus = "pass" if r.holds in ok else "fail"
            msg = {
                "no": "SLO not met",
                "not-evaluable": r.note or "not evaluable",
                "point-estimate-only": "holds on the point estimate only: the 95% interval "
                "crosses the threshold; measure more samples (or use slo_mode: point-estimate)",
            }.get(r.holds, r.holds.replace("-", " "))
            checks.append(
                Check(
                    name=f"report goal SLO: {r.slo}",
                    expected=f"{slo.op} {slo.threshold:g} ({mode})",
                    actual=actual,
                    status=status,
                    message=msg,
                )
            )
    return checks


def _goal_setup(tm: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The goals of a dumped threat model, without the data paths (which may differ)."""
    raw = tm.get("goals") or []
    out = []
    for g in raw if isinstance(raw, list) else []:
        if isinstance(g, dict):
            raw_params = g.get("params")
            params = raw_params if isinstance(raw_params, dict) else {}
            kept = {k: v for k, v in params.items() if k not in GOAL_PATH_PARAMS}
            out.append((str(g.get("kind")), str(g.get("name")), canonical(kept)))
    return out


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
    if _goal_setup(tb) != _goal_setup(tc):
        diffs.append("threat-model goals (kinds, names or parameters)")
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
        a, b = (pct(p, missing="n/a", no_samples="n/a (n=0)") for p in (row.a, row.b))
        actual = f"{drop:+.2f} pts ({a} -> {b})"
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


def run_gate(
    report: Report,
    policy: Policy,
    baseline: Report | None = None,
    *,
    provenance: tuple[list[Check], list[str]] | None = None,
) -> GateResult:
    """Judge ``report`` against ``policy`` (and regression limits against ``baseline``).

    ``provenance``: the checks and warnings of :func:`provenance_checks` (they come first).
    """
    checks: list[Check] = list(provenance[0]) if provenance else []
    warnings: list[str] = list(provenance[1]) if provenance else []
    failed_sanity = [c.id for c in report.sanity_checks if c.status == "fail"]
    # every signal must agree: the flag, the sanity checks and the verdict
    trusted = report.trustworthy and not failed_sanity and report.verdict.status != "untrustworthy"
    checks.append(
        Check(
            name="evaluation trustworthy",
            expected="true (all sanity checks pass)",
            actual=str(trusted).lower(),
            status="pass" if trusted else "fail",
            message=""
            if trusted
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
    goal_checks = _goal_checks(report, policy) if policy.report_slos else []
    if not slos and not goal_checks:
        warnings.append("no SLOs in the report's threat model or the policy: nothing is required")
    for src, slo in slos:
        checks.append(_slo_check(slo, report, baseline, policy, src))
    checks += goal_checks
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
    status: Literal["pass", "fail"] = "fail" if any(c.status == "fail" for c in checks) else "pass"
    return GateResult(
        status=status,
        policy=policy.name,
        report=_label(report),
        baseline=None if baseline is None else _label(baseline),
        checks=checks,
        warnings=warnings,
    )


# ----------------------------------------------------------------------------- views

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
