"""The result of judging one SLO, and the rule that decides whether it holds: kept apart from
:mod:`.verdict` so that goal judging (:mod:`.goals`) and the threat model do not import each
other through it."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from advguard.evaluate.threat_model import SLO

__all__ = ["HoldsT", "SLOResult", "slo_holds"]


class SLOResult(BaseModel):
    model_config = ConfigDict(extra="forbid")  # as report.py's models

    slo: str
    metric: str
    epsilon: float | None
    value: float | None
    ci_low: float | None
    ci_high: float | None
    holds: Literal["with-confidence", "point-estimate-only", "no", "not-evaluable"]
    note: str = ""


HoldsT = Literal["with-confidence", "point-estimate-only", "no"]


_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def slo_holds(slo: SLO, value: float, lo: float, hi: float) -> HoldsT:
    """Whether ``slo`` holds for a measured ``value`` with 95% interval ``[lo, hi]``."""
    op = _OPS[slo.op]
    conservative = lo if slo.op in (">=", ">") else hi
    if op(conservative, slo.threshold):
        return "with-confidence"
    if op(value, slo.threshold):
        return "point-estimate-only"
    return "no"
