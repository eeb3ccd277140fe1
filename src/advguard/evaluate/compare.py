"""Compare two robustness reports (A = baseline, B = candidate) side by side.

A row is a *regression* when B is worse than A by more than the tolerance: a clean-accuracy
drop larger than ``clean_tolerance`` or a robust-accuracy drop larger than ``robust_tolerance``
(both as fractions, 0.01 = 1 percentage point). Warnings say when the two runs are not
like-for-like (different norm, attacks, sample count, data...), in which case deltas mix model
changes with evaluation changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from advguard.errors import InputError
from advguard.evaluate.formatting import attack_suite as _attacks
from advguard.evaluate.formatting import md as _md
from advguard.evaluate.formatting import pct as _pct
from advguard.evaluate.formatting import report_label as _label
from advguard.evaluate.report import Report
from advguard.stats import Proportion

_SLACK = 1e-9  # float noise: a drop of exactly the tolerance is not a regression


class ComparisonRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["clean_accuracy", "robust_accuracy"]
    epsilon: float | None = None
    a: Proportion | None = Field(default=None, description="value in report A (None: not measured)")
    b: Proportion | None = Field(default=None, description="value in report B (None: not measured)")
    delta: float | None = Field(
        default=None, description="B - A as a fraction (negative: B is worse)"
    )
    regression: bool = False
    improvement: bool = False
    only_in: Literal["a", "b"] | None = Field(
        default=None, description="epsilon evaluated in one only"
    )


class Side(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    created: str
    verdict: str
    verdict_summary: str
    trustworthy: bool


class Comparison(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: Side
    b: Side
    rows: list[ComparisonRow]
    warnings: list[str] = Field(default_factory=list)
    like_for_like: bool = Field(
        default=True, description="same norm/goal/knowledge/suite/samples/data"
    )
    robust_tolerance: float
    clean_tolerance: float

    @property
    def regressions(self) -> list[ComparisonRow]:
        return [r for r in self.rows if r.regression]

    @property
    def has_regression(self) -> bool:
        return any(r.regression for r in self.rows)


def _same_eps(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y))


def _row(
    metric: Any, eps: float | None, a: Proportion | None, b: Proportion | None, tol: float
) -> ComparisonRow:
    if a is None or b is None or a.value is None or b.value is None:
        only: Literal["a", "b"] | None = "b" if a is None else "a" if b is None else None
        return ComparisonRow(metric=metric, epsilon=eps, a=a, b=b, only_in=only)
    delta = b.value - a.value
    return ComparisonRow(
        metric=metric,
        epsilon=eps,
        a=a,
        b=b,
        delta=delta,
        regression=-delta > tol + _SLACK,
        improvement=delta > tol + _SLACK,
    )


def compare_reports(
    a: Report, b: Report, *, robust_tolerance: float = 0.01, clean_tolerance: float = 0.005
) -> Comparison:
    """Side-by-side clean and robust accuracy of ``a`` (baseline) and ``b`` (candidate)."""
    for name, tol in (("robust_tolerance", robust_tolerance), ("clean_tolerance", clean_tolerance)):
        if not 0 <= tol < 1:
            raise InputError(f"{name} is a fraction in [0, 1) (0.01 = 1 point), got {tol}")
    rows = [_row("clean_accuracy", None, a.clean_accuracy, b.clean_accuracy, clean_tolerance)]
    eps = sorted({r.epsilon for r in a.results} | {r.epsilon for r in b.results})
    seen: list[float] = []
    for e in eps:
        if any(_same_eps(e, s) for s in seen):
            continue
        seen.append(e)
        ra = next((r for r in a.results if _same_eps(r.epsilon, e)), None)
        rb = next((r for r in b.results if _same_eps(r.epsilon, e)), None)
        rows.append(
            _row(
                "robust_accuracy",
                e,
                ra.robust_accuracy if ra else None,
                rb.robust_accuracy if rb else None,
                robust_tolerance,
            )
        )

    warnings = _mismatch_warnings(a, b)
    like_for_like = not warnings
    only = [r for r in rows if r.only_in]
    if only:
        eps_txt = ", ".join(
            f"{r.epsilon:g} (only {r.only_in.upper()})"
            for r in only
            if r.epsilon is not None and r.only_in
        )
        warnings.append(f"epsilons evaluated in one report only: {eps_txt}")
    for which, r in (("A", a), ("B", b)):
        if not r.trustworthy:
            warnings.append(
                f"report {which} is untrustworthy (failed sanity checks): its robust "
                "accuracy may be overestimated"
            )

    def side(r: Report) -> Side:
        return Side(
            label=_label(r),
            created=r.created,
            verdict=r.verdict.status,
            verdict_summary=r.verdict.summary,
            trustworthy=r.trustworthy,
        )

    return Comparison(
        a=side(a),
        b=side(b),
        rows=rows,
        warnings=warnings,
        like_for_like=like_for_like,
        robust_tolerance=robust_tolerance,
        clean_tolerance=clean_tolerance,
    )


def _mismatch_warnings(a: Report, b: Report) -> list[str]:
    """Why the two reports are not like for like: threat, suite, samples or data differ."""
    warnings: list[str] = []
    ta, tb = a.threat_model, b.threat_model
    for key, what in (("norm", "norm"), ("knowledge", "attacker knowledge"), ("goal", "goal")):
        if ta.get(key) != tb.get(key):
            warnings.append(
                f"{what} differs: A uses {ta.get(key)!r}, B uses {tb.get(key)!r}; "
                "the robust accuracies measure different threats"
            )
    if _attacks(a) != _attacks(b):
        na, nb = (", ".join(s.attack for s in r.suite) or "?" for r in (a, b))
        warnings.append(
            f"attack suites differ (A: {na}; B: {nb}, or their "
            "parameters); a weaker suite overestimates robust accuracy"
        )
    if a.clean_accuracy.n != b.clean_accuracy.n or ta.get("samples") != tb.get("samples"):
        warnings.append(
            f"sample counts differ (A: n={a.clean_accuracy.n}, "
            f"B: n={b.clean_accuracy.n}); confidence intervals are not comparable"
        )
    if a.data.get("sha256") and b.data.get("sha256") and a.data["sha256"] != b.data["sha256"]:
        warnings.append("the data sets differ (data sha256); deltas mix model and data changes")
    elif a.sample_indices_sha256 != b.sample_indices_sha256:
        warnings.append(
            "the evaluated samples differ (sample_indices_sha256); deltas include sampling noise"
        )
    return warnings


# ----------------------------------------------------------------------------- views


def _delta(r: ComparisonRow) -> str:
    if r.only_in:
        return f"only in {r.only_in.upper()}"
    if r.delta is None:
        return "—"
    pts = f"{r.delta * 100:+.1f} pts"
    if r.regression:
        return f"▼ {pts}"
    if r.improvement:
        return f"▲ {pts}"
    return pts


@dataclass
class ComparisonTable:
    """Plain strings for a CLI table; ``styles[i]`` is regression/improvement/only-one/''."""

    columns: list[str]
    rows: list[list[str]]
    styles: list[str] = field(default_factory=list)


def comparison_table(cmp: Comparison) -> ComparisonTable:
    cols = ["metric", "epsilon", f"A: {cmp.a.label}", f"B: {cmp.b.label}", "Δ (B − A)", "status"]
    rows, styles = [], []
    for r in cmp.rows:
        status = (
            "regression"
            if r.regression
            else "improvement"
            if r.improvement
            else "only-one"
            if r.only_in
            else ""
        )
        text = {"regression": "REGRESSION", "improvement": "better", "only-one": "not compared"}
        rows.append(
            [
                r.metric.replace("_", " "),
                "—" if r.epsilon is None else f"{r.epsilon:g}",
                _pct(r.a),
                _pct(r.b),
                _delta(r),
                text.get(status, "ok"),
            ]
        )
        styles.append(status)
    return ComparisonTable(columns=cols, rows=rows, styles=styles)


def comparison_markdown(cmp: Comparison) -> str:
    """A Markdown summary: verdicts, a table with regressions marked (▼), and warnings."""
    t = comparison_table(cmp)
    out = ["## advguard robustness comparison", ""]
    for key, s in (("A", cmp.a), ("B", cmp.b)):
        trust = "" if s.trustworthy or s.verdict == "untrustworthy" else " — ⚠ **untrustworthy**"
        out.append(
            f"- **{key}** `{_md(s.label)}` ({_md(s.created)}): verdict **{s.verdict}**{trust}"
        )
    n = len(cmp.regressions)
    out += [
        "",
        (f"**{n} regression{'s' if n != 1 else ''}** " if n else "No regressions ")
        + f"(tolerance: robust {cmp.robust_tolerance * 100:g} pts, clean "
        f"{cmp.clean_tolerance * 100:g} pts).",
        "",
    ]
    out.append("| " + " | ".join(_md(c) for c in t.columns) + " |")
    out.append("|" + "---|" * len(t.columns))
    for row, style in zip(t.rows, t.styles, strict=True):
        cells = [_md(c) for c in row]
        if style == "regression":
            cells[4], cells[5] = f"**{cells[4]}**", f"**{cells[5]}**"
        out.append("| " + " | ".join(cells) + " |")
    if cmp.warnings:
        why = "" if cmp.like_for_like else " (the comparison is not like-for-like)"
        out += ["", f"**Warnings**{why}:", ""]
        out += [f"- ⚠ {_md(w)}" for w in cmp.warnings]
    return "\n".join(out) + "\n"
