"""Projection of candidate rows onto a compiled schema's constraints (numpy, float64).

:func:`repair_rows` is the pipeline that ``FeatureSchema.repair`` documents: non-finite
values back to the original, clip to the widened bounds, restore immutables, clamp
monotone features, snap discrete features, one-hot groups to their argmax, fit the
epsilon ball, then repair violated linear relations.
"""

from __future__ import annotations

import numpy as np

from advguard.attacks.tabular.ball import BALL_RTOL, BallNorm, project_rows
from advguard.attacks.tabular.compiled import (
    CompiledSchema,
    effective_bounds,
    relation_violations,
    residuals,
)


def repair_rows(
    c: CompiledSchema,
    x0: np.ndarray,
    x: np.ndarray,
    eps: float | None,
    nrm: BallNorm | None,
    clip: tuple[float, float] | None,
    relation_iters: int,
) -> np.ndarray:
    """Rows ``x`` moved onto the constraints (not yet checked) given originals ``x0``."""
    x = np.where(np.isfinite(x), x, x0)
    lo, hi = effective_bounds(c, x0, clip)
    x = np.clip(x, lo, hi)
    x = np.where(c.immutable, x0, x)
    x = clamp_monotone(c, x0, x)
    x = snap_discrete(c, x0, x, lo, hi)
    x = clamp_monotone(c, x0, x)
    x = snap_one_hot(c, x0, x, lo, hi)
    x = np.where(c.immutable, x0, x)
    if eps is not None and nrm is not None:
        x = fit_ball(c, x0, x, eps, nrm)
    if len(c.ops):
        x = fix_relations(c, x0, x, lo, hi, eps, nrm, relation_iters)
    return x


def clamp_monotone(c: CompiledSchema, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Monotone features may not move against their direction."""
    mono = c.mono
    x = np.where(mono > 0, np.maximum(x, x0), x)
    return np.where(mono < 0, np.minimum(x, x0), x)


def snap_discrete(
    c: CompiledSchema, x0: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Stepped features to whole steps, integers to whole numbers, binaries to 0/1."""
    has_step = ~np.isnan(c.step)
    if has_step.any():
        s = np.where(has_step, c.step, 1.0)
        k = np.round((x - x0) / s)
        cand = x0 + k * s
        out = (cand < lo) | (cand > hi)
        cand = np.where(out, x0 + np.trunc((x - x0) / s) * s, cand)
        x = np.where(has_step, cand, x)
    if c.integer.any():
        r = np.round(x)
        r = np.where(r > hi, np.floor(hi), r)
        r = np.where(r < lo, np.ceil(lo), r)
        r = np.where((r < lo) | (r > hi), x0, r)
        x = np.where(c.integer & (x != x0), r, x)
    if c.binary.any():
        b = (x >= 0.5).astype(np.float64)
        b = np.where((b < lo) | (b > hi), x0, b)
        x = np.where(c.binary & (x != x0), b, x)
    return x


def snap_one_hot(
    c: CompiledSchema, x0: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Each changed one-hot group to its (allowed) argmax; immutable groups restored."""
    for g, cols in enumerate(c.groups):
        if c.group_immutable[g]:
            x[:, cols] = x0[:, cols]
            continue
        changed = (x[:, cols] != x0[:, cols]).any(1)
        if not changed.any():
            continue
        xs = x[changed][:, cols]
        allowed = (lo[changed][:, cols] <= 1.0) & (hi[changed][:, cols] >= 1.0)
        score = np.where(allowed, xs, -np.inf)
        # ties keep the original category
        score = score + 1e-9 * x0[changed][:, cols]
        pick = score.argmax(1)
        onehot = np.zeros_like(xs)
        onehot[np.arange(len(xs)), pick] = 1.0
        block = x[:, cols]
        block[changed] = onehot
        x[:, cols] = block
    return x


def discrete_cost(c: CompiledSchema, d: np.ndarray, nrm: BallNorm) -> np.ndarray:
    """Per-row cost of the discrete part of ``d`` (squared for l2)."""
    dd = np.where(c.discrete, d, 0.0)
    if nrm == "l2":
        return (dd**2).sum(1)
    if nrm == "l1":
        return np.abs(dd).sum(1)
    return np.abs(dd).max(1, initial=0.0)


def fit_ball(
    c: CompiledSchema, x0: np.ndarray, x: np.ndarray, eps: float, nrm: BallNorm
) -> np.ndarray:
    """Discrete changes shrink by whole units; continuous ones are projected on what is left."""
    d = x - x0
    scalar_disc = c.discrete & ~c.categorical
    # -- discrete part
    if nrm == "linf":
        u = np.where(scalar_disc, c.unit, 1.0)
        too_big = scalar_disc & (np.abs(d) > eps * (1 + 1e-12))
        shrunk = np.sign(d) * np.floor(eps / u + 1e-9) * u
        d = np.where(too_big, shrunk, d)
        if eps < 1.0:
            for cols in c.groups:
                d[:, cols] = 0.0
    else:
        budget = eps**2 if nrm == "l2" else eps
        over = np.flatnonzero(discrete_cost(c, d, nrm) > budget * (1 + 1e-12))
        for i in over:
            d[i] = shrink_discrete_row(c, d[i], budget, nrm)
    # -- continuous part within what is left
    cont = ~c.discrete
    dc = np.where(cont, d, 0.0)
    if nrm == "linf":
        r = eps * (1 - BALL_RTOL)
        dc = np.clip(dc, -r, r)
    else:
        used = discrete_cost(c, d, nrm)
        if nrm == "l2":
            left = np.sqrt(np.maximum(eps**2 - used, 0.0))
        else:
            left = np.maximum(eps - used, 0.0)
        left = left * (1 - 10 * BALL_RTOL)
        dc = project_rows(dc, nrm, left)
    d = np.where(cont, dc, d)
    return x0 + d


def shrink_discrete_row(
    c: CompiledSchema, d: np.ndarray, budget: float, nrm: BallNorm
) -> np.ndarray:
    """Shrink the largest discrete change of one row, a unit at a time, within ``budget``."""
    d = d.copy()
    power = 2 if nrm == "l2" else 1
    scalar = np.flatnonzero(c.discrete & ~c.categorical)

    def cost() -> float:
        return float((np.abs(np.where(c.discrete, d, 0.0)) ** power).sum())

    for _ in range(10_000):
        if cost() <= budget * (1 + 1e-12):
            break
        best: int | np.integer
        best, best_val, is_group = -1, 0.0, False
        for j in scalar:
            v = abs(d[j]) ** power
            if v > best_val:
                best, best_val, is_group = j, v, False
        for g, cols in enumerate(c.groups):
            v = float((np.abs(d[cols]) ** power).sum())
            if v > best_val:
                best, best_val, is_group = g, v, True
        if best < 0:
            break
        if is_group:
            d[c.groups[best]] = 0.0
        else:
            u = c.unit[best]
            d[best] = 0.0 if abs(d[best]) <= u * (1 + 1e-9) else d[best] - np.sign(d[best]) * u
    return d


def fix_relations(
    c: CompiledSchema,
    x0: np.ndarray,
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    eps: float | None,
    nrm: BallNorm | None,
    iters: int,
) -> np.ndarray:
    """Move continuous mutable features to satisfy violated relations; else restore them."""
    A = c.A
    movable = c.continuous
    for _ in range(max(1, iters)):
        viol = relation_violations(c, x0, x)
        if not viol.any():
            return x
        res, tol = residuals(c, x)
        for r, op in enumerate(c.ops):
            rows = np.flatnonzero(viol[:, r])
            if not len(rows):
                continue
            a = A[r]
            target = {"<=": -0.5, ">=": 0.5, "==": 0.0}[op] * tol[rows, r]
            need = res[rows, r] - target  # lhs must change by -need
            x[rows] = shift_lhs(
                c, x0[rows], x[rows], lo[rows], hi[rows], a, need, eps, nrm, movable
            )
        if eps is not None and nrm in ("l2", "l1"):
            x = fit_ball(c, x0, x, eps, nrm)
    return restore_relation_features(c, x0, x)


def restore_relation_features(c: CompiledSchema, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fallback: restore the features (and their one-hot groups) of relations that fail."""
    A = c.A
    for _ in range(len(c.ops) + 1):
        viol = relation_violations(c, x0, x)
        if not viol.any():
            break
        for r in range(len(c.ops)):
            rows = np.flatnonzero(viol[:, r])
            if not len(rows):
                continue
            cols = np.flatnonzero(A[r] != 0)
            for g in set(c.group_of[cols].tolist()) - {-1}:
                cols = np.union1d(cols, c.groups[g])
            x[np.ix_(rows, cols)] = x0[np.ix_(rows, cols)]
    return x


def shift_lhs(
    c: CompiledSchema,
    x0: np.ndarray,
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    a: np.ndarray,
    need: np.ndarray,
    eps: float | None,
    nrm: BallNorm | None,
    movable: np.ndarray,
) -> np.ndarray:
    """Change ``a @ x`` by ``-need`` per row with a small move of movable features."""
    x = x.copy()
    up_lim = hi.copy()
    down_lim = lo.copy()
    if eps is not None and nrm == "linf":
        r = eps * (1 - BALL_RTOL)
        up_lim = np.minimum(up_lim, x0 + r)
        down_lim = np.maximum(down_lim, x0 - r)
    up_lim = np.where(c.mono < 0, np.minimum(up_lim, x0), up_lim)
    down_lim = np.where(c.mono > 0, np.maximum(down_lim, x0), down_lim)
    J = movable & (a != 0)
    remaining = need.copy()
    for _ in range(4):
        if not J.any() or np.all(np.abs(remaining) <= 0):
            break
        sgn = -np.sign(remaining)[:, None] * np.sign(a)[None, :]  # direction of x_j
        room = np.where(sgn > 0, up_lim - x, x - down_lim)
        room = np.where(J[None, :], np.maximum(room, 0.0), 0.0)
        active = room > 1e-15
        w = np.where(active, a[None, :] ** 2, 0.0)
        s = w.sum(1)
        safe = np.where(s > 0, s, 1.0)
        delta = np.where(active, -remaining[:, None] * a[None, :] / safe[:, None], 0.0)
        delta = np.clip(delta, -room, room)
        x = x + delta
        remaining = remaining + (delta * a[None, :]).sum(1)
    return np.clip(x, lo, hi)
