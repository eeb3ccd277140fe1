"""A feature schema compiled into per-column arrays, index sets and a relation matrix,
and the array computations shared by validation and repair (bounds, relation residuals)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advguard.attacks.tabular.spec import FeatureSpec, LinearRelation, OneHotGroup


@dataclass(frozen=True)
class CompiledSchema:
    names: list[str]
    index: dict[str, int]
    low: np.ndarray  # (D,) -inf where unbounded
    high: np.ndarray
    immutable: np.ndarray  # bool (D,), group immutability included
    mono: np.ndarray  # int8 (D,): +1 increase, -1 decrease, 0 free
    integer: np.ndarray
    binary: np.ndarray
    categorical: np.ndarray
    step: np.ndarray  # nan where none
    cost: np.ndarray
    groups: list[np.ndarray]
    group_names: list[str]
    group_immutable: np.ndarray
    group_of: np.ndarray  # int (D,): group index or -1
    unit: np.ndarray  # discrete move unit of scalar discrete features (nan for continuous)
    discrete: np.ndarray  # integer | binary | categorical | stepped
    continuous: np.ndarray  # ~discrete & ~immutable
    A: np.ndarray  # (R, D)
    ops: list[str]
    rhs: np.ndarray
    rel_tol: np.ndarray
    rel_names: list[str]


def compile_schema(
    features: Sequence[FeatureSpec],
    one_hot_groups: Sequence[OneHotGroup],
    relations: Sequence[LinearRelation],
) -> CompiledSchema:
    """The arrays of a (cross-checked) schema."""
    names = [f.name for f in features]
    index = {n: i for i, n in enumerate(names)}
    d = len(names)
    groups = [np.array([index[f] for f in g.features], dtype=np.int64) for g in one_hot_groups]
    group_of = np.full(d, -1, dtype=np.int64)
    for g, cols in enumerate(groups):
        group_of[cols] = g
    kind = [
        f.type or ("categorical" if group_of[i] >= 0 else "numeric") for i, f in enumerate(features)
    ]
    immutable = np.array([f.immutable for f in features], dtype=bool)
    g_imm = np.array(
        [
            g.immutable or bool(immutable[cols].any())
            for g, cols in zip(one_hot_groups, groups, strict=True)
        ],
        dtype=bool,
    )
    for g, cols in enumerate(groups):
        if g_imm[g]:
            immutable[cols] = True
    integer = np.array([k == "integer" for k in kind], dtype=bool)
    binary = np.array([k == "binary" for k in kind], dtype=bool)
    categorical = group_of >= 0
    step = np.array([np.nan if f.step is None else f.step for f in features])
    unit = np.where(~np.isnan(step), step, np.where(integer | binary, 1.0, np.nan))
    discrete = integer | binary | categorical | ~np.isnan(step)
    A = np.zeros((len(relations), d))
    for r, rel in enumerate(relations):
        for fname, c in rel.coef.items():
            A[r, index[fname]] += c
    return CompiledSchema(
        names=names,
        index=index,
        low=np.array([-np.inf if f.low is None else f.low for f in features]),
        high=np.array([np.inf if f.high is None else f.high for f in features]),
        immutable=immutable,
        mono=np.array(
            [{"increase": 1, "decrease": -1, None: 0}[f.monotone] for f in features],
            dtype=np.int8,
        ),
        integer=integer,
        binary=binary,
        categorical=categorical,
        step=step,
        cost=np.array([f.cost for f in features]),
        groups=groups,
        group_names=[g.name for g in one_hot_groups],
        group_immutable=g_imm,
        group_of=group_of,
        unit=unit,
        discrete=discrete,
        continuous=~discrete & ~immutable,
        A=A,
        ops=[r.op for r in relations],
        rhs=np.array([r.rhs for r in relations], dtype=np.float64),
        rel_tol=np.array([r.tol for r in relations], dtype=np.float64),
        rel_names=[r.name or f"relation {i}" for i, r in enumerate(relations)],
    )


def effective_bounds(
    c: CompiledSchema, x0: np.ndarray, clip: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row bounds: the schema's (within ``clip``), widened to include the original."""
    low, high = c.low, c.high
    if clip is not None:
        low = np.maximum(low, float(clip[0]))
        high = np.minimum(high, float(clip[1]))
    return np.minimum(low, x0), np.maximum(high, x0)


def residuals(c: CompiledSchema, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``lhs - rhs`` of every relation per row, and its tolerance."""
    with np.errstate(invalid="ignore", over="ignore"):
        xz = np.where(np.isfinite(x), x, np.nan)
        lhs = xz @ c.A.T
        scale = np.abs(xz) @ np.abs(c.A).T
    res = lhs - c.rhs
    tol = c.rel_tol * (1.0 + np.abs(c.rhs) + scale)
    return res, tol


def relation_violations(
    c: CompiledSchema, x0: np.ndarray, x: np.ndarray, changed: np.ndarray | None = None
) -> np.ndarray:
    """Bool (rows, relations): a relation involving a changed feature does not hold."""
    if not len(c.ops):
        return np.zeros((len(x), 0), dtype=bool)
    if changed is None:
        changed = x != x0
    involved = (changed.astype(np.float64) @ (c.A != 0).T.astype(np.float64)) > 0
    res, tol = residuals(c, x)
    out = np.zeros_like(involved)
    for r, op in enumerate(c.ops):
        if op == "<=":
            bad = res[:, r] > tol[:, r]
        elif op == ">=":
            bad = res[:, r] < -tol[:, r]
        else:
            bad = np.abs(res[:, r]) > tol[:, r]
        out[:, r] = involved[:, r] & (bad | ~np.isfinite(res[:, r]))
    return out
