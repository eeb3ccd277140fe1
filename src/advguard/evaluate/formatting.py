"""Small text helpers shared by the report views (comparison, release gate)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advguard.stats import Proportion

if TYPE_CHECKING:
    from advguard.evaluate.report import Report


def md(s: str) -> str:
    """Escape text for a Markdown table cell (backslashes, pipes, newlines)."""
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def pct(p: Proportion | float | None, *, missing: str = "—", no_samples: str = "n/a") -> str:
    """``97.0% [94.1%, 98.8%]`` for a proportion, ``97.0%`` for a float."""
    if p is None:
        return missing
    if isinstance(p, Proportion):
        if p.value is None:
            return no_samples
        return f"{p.value:.1%} [{p.ci_low:.1%}, {p.ci_high:.1%}]"
    return f"{p:.1%}"


def report_label(r: Report) -> str:
    """A short name for the model of a report (name, path, source or adapter)."""
    for key in ("name", "path", "source", "adapter"):
        if r.model.get(key):
            return str(r.model[key])
    return "model"


def attack_suite(r: Report) -> list[Any]:
    """The attack suite with parameters, to compare two reports' suites."""
    if r.suite:
        return [(s.attack, s.params) for s in r.suite]
    return list(r.threat_model.get("attacks") or [])
