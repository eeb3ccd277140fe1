"""Row validity under a compiled schema: which constraints each adversarial row breaks
given its original (see the ``schema`` module docstring for how validity is judged), and
where the data itself breaks the schema."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from advguard.attacks.tabular.ball import ball_norm, ball_size, in_ball
from advguard.attacks.tabular.compiled import (
    CompiledSchema,
    effective_bounds,
    relation_violations,
    residuals,
)
from advguard.attacks.tabular.spec import LinearRelation

BOUND_RTOL = 1e-6
INT_RTOL = 1e-6


def violation_masks(c: CompiledSchema, x0: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """Bool masks per kind of violation: (rows, features), (rows, groups), (rows, relations)."""
    changed = x != x0
    finite = np.isfinite(x)
    lo, hi = effective_bounds(c, x0)
    tb_lo = BOUND_RTOL * np.maximum(1.0, np.abs(lo))
    tb_hi = BOUND_RTOL * np.maximum(1.0, np.abs(hi))
    with np.errstate(invalid="ignore"):
        bounds = changed & finite & ((x < lo - tb_lo) | (x > hi + tb_hi))
        immutable = changed & c.immutable
        monotone = ((c.mono > 0) & (x < x0)) | ((c.mono < 0) & (x > x0))
        tol_i = INT_RTOL * np.maximum(1.0, np.abs(x))
        integer = changed & c.integer & finite & (np.abs(x - np.round(x)) > tol_i)
        binary = changed & c.binary & finite & (np.minimum(np.abs(x), np.abs(x - 1)) > 1e-6)
        has_step = ~np.isnan(c.step)
        step = np.zeros_like(changed)
        if has_step.any():
            s = np.where(has_step, c.step, 1.0)
            k = np.round((x - x0) / s)
            off = np.abs((x - x0) - k * s)
            tol_s = INT_RTOL * np.maximum(np.maximum(1.0, np.abs(x)), np.abs(x0))
            step = changed & has_step & finite & (off > tol_s)
        one_hot = np.zeros((len(x), len(c.groups)), dtype=bool)
        for g, cols in enumerate(c.groups):
            xs = x[:, cols]
            g_changed = changed[:, cols].any(1)
            not01 = (np.minimum(np.abs(xs), np.abs(xs - 1)) > 1e-6).any(1)
            not_one = np.abs(xs.sum(1) - 1) > 1e-6
            one_hot[:, g] = g_changed & (not01 | not_one | ~np.isfinite(xs).all(1))
        relation = relation_violations(c, x0, x, changed)
    return {
        "finite": changed & ~finite,
        "bounds": bounds,
        "immutable": immutable,
        "monotone": monotone,
        "integer": integer,
        "binary": binary,
        "step": step,
        "one_hot": one_hot,
        "relation": relation,
    }


def valid_rows(
    c: CompiledSchema, x0: np.ndarray, x: np.ndarray, epsilon: float | None, norm: str
) -> np.ndarray:
    """Bool per row: no violation (and inside the ``epsilon`` ball when given)."""
    ok = np.ones(len(x), dtype=bool)
    for m in violation_masks(c, x0, x).values():
        ok &= ~m.any(axis=1)
    if epsilon is not None:
        ok &= in_ball(x0, x, float(epsilon), ball_norm(norm))
    return ok


def row_violations(
    c: CompiledSchema,
    relations: Sequence[LinearRelation],
    x0: np.ndarray,
    x: np.ndarray,
    *,
    epsilon: float | None,
    norm: str,
    max_per_row: int | None,
) -> list[list[str]]:
    """Human-readable reasons, one list per row (empty: the row is valid)."""
    m = violation_masks(c, x0, x)
    lo, hi = effective_bounds(c, x0)
    res, _ = residuals(c, x) if len(c.ops) else (None, None)
    out: list[list[str]] = []
    ball = None
    if epsilon is not None:
        nrm = ball_norm(norm)
        ball = ball_size(x0, x, nrm)
        ball_ok = in_ball(x0, x, float(epsilon), nrm)
    for i in range(len(x)):
        msgs = _feature_messages(c, m, x0, x, lo, hi, i)
        for g in np.flatnonzero(m["one_hot"][i]):
            vals = ", ".join(f"{c.names[k]}={x[i, k]:.3g}" for k in c.groups[g])
            msgs.append(f"one-hot group {c.group_names[g]!r} is not one-hot ({vals})")
        for r in np.flatnonzero(m["relation"][i]):
            rel = relations[int(r)]
            msgs.append(
                f"relation {rel.describe()} violated: left side is {res[i, r] + rel.rhs:.6g}"  # type: ignore[index]
            )
        if ball is not None and not ball_ok[i]:
            msgs.append(
                f"perturbation {norm} size {ball[i]:.6g} exceeds epsilon {float(epsilon):g}"  # type: ignore[arg-type]
            )
        out.append(msgs[:max_per_row] if max_per_row is not None else msgs)
    return out


def _feature_messages(
    c: CompiledSchema,
    m: dict[str, np.ndarray],
    x0: np.ndarray,
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    i: int,
) -> list[str]:
    """The per-feature violations of row ``i``."""
    msgs: list[str] = []

    def f(j: int | np.integer) -> str:
        return c.names[j]

    for j in np.flatnonzero(m["finite"][i]):
        msgs.append(f"feature {f(j)!r} is not a finite number ({x[i, j]})")
    for j in np.flatnonzero(m["immutable"][i]):
        msgs.append(
            f"feature {f(j)!r} is immutable but changed from {x0[i, j]:.6g} to {x[i, j]:.6g}"
        )
    for j in np.flatnonzero(m["monotone"][i]):
        way = "increase" if c.mono[j] > 0 else "decrease"
        msgs.append(
            f"feature {f(j)!r} may only {way} but went from {x0[i, j]:.6g} to {x[i, j]:.6g}"
        )
    for j in np.flatnonzero(m["bounds"][i]):
        msgs.append(
            f"feature {f(j)!r} = {x[i, j]:.6g} is outside its bounds "
            f"[{lo[i, j]:.6g}, {hi[i, j]:.6g}]"
        )
    for j in np.flatnonzero(m["integer"][i]):
        msgs.append(f"feature {f(j)!r} must be a whole number, got {x[i, j]:.6g}")
    for j in np.flatnonzero(m["binary"][i]):
        msgs.append(f"feature {f(j)!r} must be 0 or 1, got {x[i, j]:.6g}")
    for j in np.flatnonzero(m["step"][i]):
        msgs.append(
            f"feature {f(j)!r} must change in steps of {c.step[j]:g}, changed by "
            f"{x[i, j] - x0[i, j]:.6g}"
        )
    return msgs


def data_problems(
    c: CompiledSchema, relations: Sequence[LinearRelation], xa: np.ndarray
) -> list[list[str]]:
    """Where float64 rows ``xa`` themselves break the schema (absolute check, per row)."""
    out: list[list[str]] = []
    res, tol = residuals(c, xa) if len(c.ops) else (None, None)
    for i in range(len(xa)):
        row = xa[i]
        msgs = []
        for j in range(len(row)):
            v = row[j]
            if not math.isfinite(v):
                msgs.append(f"feature {c.names[j]!r} is not finite")
                continue
            if v < c.low[j] - BOUND_RTOL * max(1, abs(c.low[j])) or v > c.high[j] + (
                BOUND_RTOL * max(1, abs(c.high[j]))
            ):
                msgs.append(
                    f"feature {c.names[j]!r} = {v:.6g} is outside [{c.low[j]:g}, {c.high[j]:g}]"
                )
            if c.integer[j] and abs(v - round(v)) > INT_RTOL * max(1, abs(v)):
                msgs.append(f"feature {c.names[j]!r} = {v:.6g} is not a whole number")
            if (c.binary[j] or c.categorical[j]) and min(abs(v), abs(v - 1)) > 1e-6:
                msgs.append(f"feature {c.names[j]!r} = {v:.6g} is not 0/1")
        for g, cols in enumerate(c.groups):
            if abs(row[cols].sum() - 1) > 1e-6:
                msgs.append(f"one-hot group {c.group_names[g]!r} does not sum to 1")
        for r, op in enumerate(c.ops):
            e, t = res[i, r], tol[i, r]  # type: ignore[index]
            bad = e > t if op == "<=" else e < -t if op == ">=" else abs(e) > t
            if bad:
                msgs.append(f"relation {relations[r].describe()} does not hold")
        out.append(msgs)
    return out
