"""Feature constraints for tabular attacks: what an attacker may change, and how.

A :class:`FeatureSchema` lists every column of the model's input, in order, with

- its ``type``: ``numeric``, ``integer``, ``binary`` or ``categorical`` (a member of a
  one-hot group; members get this type automatically),
- its realistic ``low`` / ``high`` bounds (``None``: unbounded),
- ``immutable: true`` (the attacker cannot change it: age, country of birth...),
- ``monotone: increase | decrease`` (it can only move one way: account age, a payment
  already made...),
- an optional ``step`` (changes must be whole multiples of it) and a ``cost`` weight
  (used by :func:`~advguard.attacks.tabular.metrics.tabular_metrics`),

plus ``one_hot_groups`` (exactly one member is 1) and linear ``relations``
``sum_j coef_j * x_j  (<= | >= | ==)  rhs``. In YAML::

    name: credit
    features:
      - {name: age, type: integer, low: 18, high: 100, immutable: true}
      - {name: income, low: 0, high: 500000, monotone: decrease, cost: 2}
      - {name: n_cards, type: integer, low: 0, high: 10}
      - {name: job=clerk}
      - {name: job=manager}
      - {name: debt, low: 0}
    one_hot_groups:
      - {name: job, features: [job=clerk, job=manager]}
    relations:
      - {name: debt_below_income, coef: {debt: 1, income: -0.5}, op: "<=", rhs: 0}

How validity is judged (:meth:`FeatureSchema.validate_rows`): constraints concern what the
attacker *changed*. Per-feature rules (type, step, immutability) apply to the features whose
value differs from the original; a feature's bounds are widened to include its original
value (an outlier stays attackable through its other features); a one-hot group is checked
when one of its members changed and a relation when one of its features changed. A row
identical to its original is therefore always valid. Use :meth:`FeatureSchema.check_data`
to see whether the data itself fits the schema.

Comparisons are exact for immutability and monotonicity and use small tolerances (about
1e-6 relative) for bounds, integrality, steps and relations, so float32 round-off of a
repaired row does not make it invalid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from advguard.errors import InputError

FeatureKind = Literal["numeric", "integer", "binary", "categorical"]
Monotone = Literal["increase", "decrease"]
BallNorm = Literal["linf", "l2", "l1"]

_MONOTONE_ALIASES = {
    "increase": "increase",
    "increasing": "increase",
    "inc": "increase",
    "up": "increase",
    "+": "increase",
    "decrease": "decrease",
    "decreasing": "decrease",
    "dec": "decrease",
    "down": "decrease",
    "-": "decrease",
}
_BOUND_RTOL = 1e-6
_INT_RTOL = 1e-6
_BALL_RTOL = 1e-6


# ----------------------------------------------------------------------------- models
class FeatureSpec(BaseModel):
    """One input column and what an attacker may do to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: FeatureKind | None = None
    """``None``: ``categorical`` for one-hot group members, else ``numeric``."""
    low: float | None = None
    high: float | None = None
    immutable: bool = False
    monotone: Monotone | None = None
    step: float | None = Field(default=None, gt=0)
    """Changes must be whole multiples of ``step`` (e.g. 100 for an amount in hundreds)."""
    cost: float = Field(default=1.0, ge=0)
    """Weight of a unit change of this feature in the cost-of-change metric."""

    @field_validator("monotone", mode="before")
    @classmethod
    def _monotone_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            key = v.strip().lower()
            if key in ("", "none", "no"):
                return None
            return _MONOTONE_ALIASES.get(key, v)
        return v

    @field_validator("low", "high", "step", "cost")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number (leave it out for no bound)")
        return v


class OneHotGroup(BaseModel):
    """Columns that one-hot encode one categorical variable: exactly one of them is 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    features: list[str] = Field(min_length=2)
    immutable: bool = False


class LinearRelation(BaseModel):
    """``sum_j coef[j] * x_j  op  rhs`` with ``op`` in ``<=``, ``>=``, ``==``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    coef: dict[str, float] = Field(min_length=1)
    op: Literal["<=", ">=", "=="] = "<="
    rhs: float = 0.0
    tol: float = Field(default=1e-6, ge=0)
    """Relative tolerance: violated when off by more than ``tol * (1 + |rhs| + sum|coef*x|)``."""

    @field_validator("op", mode="before")
    @classmethod
    def _op_alias(cls, v: Any) -> Any:
        return {"=": "==", "=<": "<=", "=>": ">="}.get(v, v) if isinstance(v, str) else v

    @field_validator("rhs")
    @classmethod
    def _finite_rhs(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("coef")
    @classmethod
    def _finite_coef(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, c in v.items() if not math.isfinite(c)]
        if bad:
            raise ValueError(f"coefficient of {bad[0]!r} must be a finite number")
        return v

    def describe(self) -> str:
        terms = " + ".join(f"{c:g}*{k}" for k, c in self.coef.items())
        label = f"{self.name}: " if self.name else ""
        return f"{label}{terms} {self.op} {self.rhs:g}"


@dataclass(frozen=True)
class _Compiled:
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


class FeatureSchema(BaseModel):
    """Constraints on the columns of a tabular model's input (see the module docstring).

    Build it with :meth:`from_dataset`, :meth:`load` (YAML file), :meth:`from_yaml` (YAML
    text) or :meth:`from_dict`; those raise :class:`~advguard.errors.InputError` naming the
    offending field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "schema"
    description: str = ""
    features: list[FeatureSpec] = Field(min_length=1)
    one_hot_groups: list[OneHotGroup] = Field(default_factory=list)
    relations: list[LinearRelation] = Field(default_factory=list)

    _compiled: _Compiled | None = PrivateAttr(default=None)

    @field_validator("features", mode="before")
    @classmethod
    def _features_mapping(cls, v: Any) -> Any:
        # also accept {name: {spec...}} (YAML mapping in column order)
        if isinstance(v, Mapping):
            out = []
            for k, spec in v.items():
                spec = {} if spec is None else spec
                if isinstance(spec, Mapping):
                    out.append({"name": str(k), **spec})
                else:
                    out.append(spec)
            return out
        return v

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> FeatureSchema:
        if info.context and info.context.get("defer_cross_checks"):
            return self
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"field '{loc}': {msg}" for loc, msg in problems))
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureSchema):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "feature schema") -> FeatureSchema:
        """Validate a mapping (as read from YAML); errors become :class:`InputError`."""
        return _validate(data, source, None)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> FeatureSchema:
        """Parse YAML text; errors name the field and its line."""
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(data, Mapping):
            raise InputError(
                f"{source}: a feature schema is a YAML mapping with a 'features' list "
                "(and optional 'one_hot_groups' and 'relations')"
            )
        return _validate(data, source, node)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSchema:
        """Read a YAML schema file."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"feature schema file '{p}' does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read feature schema '{p}': {e}") from None
        return cls.from_yaml(text, str(p))

    @classmethod
    def from_dataset(
        cls,
        ds: Any,
        *,
        immutable: Iterable[str | int] = (),
        monotone_increasing: Iterable[str | int] = (),
        monotone_decreasing: Iterable[str | int] = (),
        integer: Iterable[str | int] = (),
        bounds: Mapping[str | int, tuple[float | None, float | None]] | None = None,
        steps: Mapping[str | int, float] | None = None,
        costs: Mapping[str | int, float] | None = None,
        one_hot_groups: Sequence[Mapping[str, Any]] | None = None,
        relations: Sequence[Mapping[str, Any] | LinearRelation] = (),
        name: str | None = None,
    ) -> FeatureSchema:
        """A schema for a tabular :class:`~advguard.data.Dataset`.

        Names, types and bounds come from ``ds.feature_names`` (``f0``, ``f1``... when
        absent), ``ds.feature_types`` and ``ds.feature_bounds`` (else the global
        ``ds.bounds``); one-hot groups from ``ds.metadata["encoding"]`` (as written by
        ``load_tabular``) unless ``one_hot_groups`` is given. Features are named or
        given by column index in the other arguments.
        """
        x = np.asarray(getattr(ds, "x", None))
        if x.ndim != 2:
            raise InputError(
                f"FeatureSchema.from_dataset needs a tabular dataset with x of shape (N, D), "
                f"got shape {x.shape}"
            )
        d = int(x.shape[1])
        names = list(ds.feature_names) if ds.feature_names is not None else None
        names = names or [f"f{i}" for i in range(d)]
        if len(names) != d:
            raise InputError(f"dataset has {len(names)} feature_names for {d} columns")
        types = list(ds.feature_types) if ds.feature_types is not None else ["numeric"] * d
        if ds.feature_bounds is not None:
            fb = np.asarray(ds.feature_bounds, dtype=np.float64)
            lows, highs = fb[0].tolist(), fb[1].tolist()
        else:
            lows, highs = [float(ds.bounds[0])] * d, [float(ds.bounds[1])] * d

        def resolve(items: Iterable[str | int], what: str) -> list[int]:
            out = []
            for it in items:
                out.append(_resolve_feature(it, names, what))
            return out

        imm = set(resolve(immutable, "immutable"))
        inc = set(resolve(monotone_increasing, "monotone_increasing"))
        dec = set(resolve(monotone_decreasing, "monotone_decreasing"))
        ints = set(resolve(integer, "integer"))
        both = inc & dec
        if both:
            raise InputError(
                f"feature {names[min(both)]!r} is both monotone_increasing and monotone_decreasing"
            )
        for key, (lo, hi) in (bounds or {}).items():
            j = _resolve_feature(key, names, "bounds")
            lows[j], highs[j] = lo, hi
        step_of = {_resolve_feature(k, names, "steps"): v for k, v in (steps or {}).items()}
        cost_of = {_resolve_feature(k, names, "costs"): v for k, v in (costs or {}).items()}

        if one_hot_groups is None:
            enc = (getattr(ds, "metadata", None) or {}).get("encoding") or {}
            groups = [
                {"name": str(col), "features": list(info["columns"])}
                for col, info in enc.items()
                if isinstance(info, Mapping) and info.get("columns")
            ]
            grouped = {f for g in groups for f in g["features"]}
            loose = [n for n, t in zip(names, types, strict=True) if t == "categorical"]
            loose = [n for n in loose if n not in grouped]
            if loose:  # no encoding metadata: group "col=value" columns by prefix
                by_prefix: dict[str, list[str]] = {}
                for n in loose:
                    by_prefix.setdefault(n.split("=", 1)[0], []).append(n)
                groups += [{"name": k, "features": v} for k, v in by_prefix.items()]
        else:
            groups = [dict(g) for g in one_hot_groups]
        in_group = {f for g in groups for f in g.get("features", [])}

        feats = []
        for j, n in enumerate(names):
            t = types[j]
            if j in ints:
                t = "integer"
            spec: dict[str, Any] = {
                "name": n,
                "type": None if (n in in_group and t == "categorical") else t,
                "low": None if lows[j] is None or not math.isfinite(lows[j]) else lows[j],
                "high": None if highs[j] is None or not math.isfinite(highs[j]) else highs[j],
                "immutable": j in imm,
            }
            if j in inc:
                spec["monotone"] = "increase"
            if j in dec:
                spec["monotone"] = "decrease"
            if j in step_of:
                spec["step"] = step_of[j]
            if j in cost_of:
                spec["cost"] = cost_of[j]
            feats.append(spec)
        rels = [r.model_dump() if isinstance(r, LinearRelation) else dict(r) for r in relations]
        data = {
            "name": name or f"{getattr(ds, 'name', 'dataset')}-schema",
            "features": feats,
            "one_hot_groups": groups,
            "relations": rels,
        }
        return cls.from_dict(data, f"schema for dataset {getattr(ds, 'name', '')!r}")

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal schema."""
        data = self.model_dump(exclude_defaults=True)
        data.setdefault("features", [])
        return yaml.safe_dump(data, sort_keys=False)

    # --------------------------------------------------------------- checks
    def problems(self) -> list[tuple[str, str]]:
        """Cross-field inconsistencies as ``(field path, message)`` pairs (empty: fine)."""
        out: list[tuple[str, str]] = []
        index: dict[str, int] = {}
        for i, f in enumerate(self.features):
            if f.name in index:
                out.append(
                    (
                        f"features.{i}.name",
                        f"duplicate feature name {f.name!r} (also features.{index[f.name]})",
                    )
                )
            else:
                index[f.name] = i
        member_of: dict[str, int] = {}
        for g, grp in enumerate(self.one_hot_groups):
            seen: set[str] = set()
            for k, fname in enumerate(grp.features):
                loc = f"one_hot_groups.{g}.features.{k}"
                if fname not in index:
                    out.append((loc, f"unknown feature {fname!r}{_close(fname, index)}"))
                    continue
                if fname in seen:
                    out.append((loc, f"feature {fname!r} is listed twice"))
                    continue
                seen.add(fname)
                if fname in member_of:
                    other = self.one_hot_groups[member_of[fname]].name
                    out.append((loc, f"feature {fname!r} is already in one-hot group {other!r}"))
                    continue
                member_of[fname] = g
        for i, f in enumerate(self.features):
            loc = f"features.{i}"
            if f.low is not None and f.high is not None and f.low > f.high:
                out.append((f"{loc}.low", f"low {f.low:g} is above high {f.high:g}"))
            if f.name in member_of:
                gname = self.one_hot_groups[member_of[f.name]].name
                if f.type not in (None, "categorical"):
                    out.append(
                        (
                            f"{loc}.type",
                            f"feature {f.name!r} is in one-hot group {gname!r}, so its type "
                            f"is categorical, not {f.type}",
                        )
                    )
                if f.monotone is not None:
                    out.append((f"{loc}.monotone", f"one-hot member {f.name!r} cannot be monotone"))
                if f.step is not None:
                    out.append((f"{loc}.step", f"one-hot member {f.name!r} cannot have a step"))
            elif f.type == "categorical":
                out.append(
                    (
                        f"{loc}.type",
                        f"categorical feature {f.name!r} is in no one_hot_groups entry; "
                        "declare its group (or make it binary)",
                    )
                )
            if f.immutable and f.monotone is not None:
                out.append(
                    (
                        f"{loc}.monotone",
                        f"feature {f.name!r} is immutable, so it cannot be monotone",
                    )
                )
            if f.step is not None and f.type == "binary":
                out.append((f"{loc}.step", f"binary feature {f.name!r} cannot have a step"))
            if f.step is not None and f.type == "integer" and float(f.step) != round(f.step):
                out.append((f"{loc}.step", f"integer feature {f.name!r} needs a whole step"))
        for r, rel in enumerate(self.relations):
            for fname in rel.coef:
                if fname not in index:
                    out.append(
                        (f"relations.{r}.coef", f"unknown feature {fname!r}{_close(fname, index)}")
                    )
            if all(c == 0 for c in rel.coef.values()):
                out.append((f"relations.{r}.coef", "all coefficients are 0"))
        return out

    # ------------------------------------------------------------ compiled form
    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def compiled(self) -> _Compiled:
        if self._compiled is None:
            self._compiled = self._compile()
        return self._compiled

    def _compile(self) -> _Compiled:
        names = self.feature_names
        index = {n: i for i, n in enumerate(names)}
        d = len(names)
        groups = [
            np.array([index[f] for f in g.features], dtype=np.int64) for g in self.one_hot_groups
        ]
        group_of = np.full(d, -1, dtype=np.int64)
        for g, cols in enumerate(groups):
            group_of[cols] = g
        kind = [
            f.type or ("categorical" if group_of[i] >= 0 else "numeric")
            for i, f in enumerate(self.features)
        ]
        immutable = np.array([f.immutable for f in self.features], dtype=bool)
        g_imm = np.array(
            [
                g.immutable or bool(immutable[cols].any())
                for g, cols in zip(self.one_hot_groups, groups, strict=True)
            ],
            dtype=bool,
        )
        for g, cols in enumerate(groups):
            if g_imm[g]:
                immutable[cols] = True
        integer = np.array([k == "integer" for k in kind], dtype=bool)
        binary = np.array([k == "binary" for k in kind], dtype=bool)
        categorical = group_of >= 0
        step = np.array([np.nan if f.step is None else f.step for f in self.features])
        unit = np.where(~np.isnan(step), step, np.where(integer | binary, 1.0, np.nan))
        discrete = integer | binary | categorical | ~np.isnan(step)
        A = np.zeros((len(self.relations), d))
        for r, rel in enumerate(self.relations):
            for fname, c in rel.coef.items():
                A[r, index[fname]] += c
        return _Compiled(
            names=names,
            index=index,
            low=np.array([-np.inf if f.low is None else f.low for f in self.features]),
            high=np.array([np.inf if f.high is None else f.high for f in self.features]),
            immutable=immutable,
            mono=np.array(
                [{"increase": 1, "decrease": -1, None: 0}[f.monotone] for f in self.features],
                dtype=np.int8,
            ),
            integer=integer,
            binary=binary,
            categorical=categorical,
            step=step,
            cost=np.array([f.cost for f in self.features]),
            groups=groups,
            group_names=[g.name for g in self.one_hot_groups],
            group_immutable=g_imm,
            group_of=group_of,
            unit=unit,
            discrete=discrete,
            continuous=~discrete & ~immutable,
            A=A,
            ops=[r.op for r in self.relations],
            rhs=np.array([r.rhs for r in self.relations], dtype=np.float64),
            rel_tol=np.array([r.tol for r in self.relations], dtype=np.float64),
            rel_names=[r.name or f"relation {i}" for i, r in enumerate(self.relations)],
        )

    # -------------------------------------------------------------- validation
    def check_shape(self, n_features: int, what: str = "input") -> None:
        if int(n_features) != self.n_features:
            raise InputError(
                f"feature schema {self.name!r} describes {self.n_features} features but the "
                f"{what} has {int(n_features)}; the schema lists every column, in order"
            )

    def _pair(self, x_orig: Any, x_adv: Any) -> tuple[np.ndarray, np.ndarray]:
        xa = _as_2d(x_adv, "x_adv")
        x0 = _as_2d(x_orig, "x_orig")
        if x0.shape != xa.shape:
            raise InputError(
                f"x_orig and x_adv must have the same shape, got {x0.shape} and {xa.shape}"
            )
        self.check_shape(x0.shape[1])
        # compare at the precision of x_adv (attacks return float32)
        if xa.dtype == np.float32:
            x0 = x0.astype(np.float32)
        return x0.astype(np.float64), xa.astype(np.float64)

    def _effective_bounds(
        self, x0: np.ndarray, clip: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        c = self.compiled
        low, high = c.low, c.high
        if clip is not None:
            low = np.maximum(low, float(clip[0]))
            high = np.minimum(high, float(clip[1]))
        return np.minimum(low, x0), np.maximum(high, x0)

    def _masks(self, x0: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
        c = self.compiled
        changed = x != x0
        finite = np.isfinite(x)
        lo, hi = self._effective_bounds(x0)
        tb_lo = _BOUND_RTOL * np.maximum(1.0, np.abs(lo))
        tb_hi = _BOUND_RTOL * np.maximum(1.0, np.abs(hi))
        with np.errstate(invalid="ignore"):
            bounds = changed & finite & ((x < lo - tb_lo) | (x > hi + tb_hi))
            immutable = changed & c.immutable
            monotone = ((c.mono > 0) & (x < x0)) | ((c.mono < 0) & (x > x0))
            tol_i = _INT_RTOL * np.maximum(1.0, np.abs(x))
            integer = changed & c.integer & finite & (np.abs(x - np.round(x)) > tol_i)
            binary = changed & c.binary & finite & (np.minimum(np.abs(x), np.abs(x - 1)) > 1e-6)
            has_step = ~np.isnan(c.step)
            step = np.zeros_like(changed)
            if has_step.any():
                s = np.where(has_step, c.step, 1.0)
                k = np.round((x - x0) / s)
                off = np.abs((x - x0) - k * s)
                tol_s = _INT_RTOL * np.maximum(np.maximum(1.0, np.abs(x)), np.abs(x0))
                step = changed & has_step & finite & (off > tol_s)
            one_hot = np.zeros((len(x), len(c.groups)), dtype=bool)
            for g, cols in enumerate(c.groups):
                xs = x[:, cols]
                g_changed = changed[:, cols].any(1)
                not01 = (np.minimum(np.abs(xs), np.abs(xs - 1)) > 1e-6).any(1)
                not_one = np.abs(xs.sum(1) - 1) > 1e-6
                one_hot[:, g] = g_changed & (not01 | not_one | ~np.isfinite(xs).all(1))
            relation = self._relation_violations(x0, x, changed)
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

    def _relation_violations(
        self, x0: np.ndarray, x: np.ndarray, changed: np.ndarray | None = None
    ) -> np.ndarray:
        c = self.compiled
        if not len(c.ops):
            return np.zeros((len(x), 0), dtype=bool)
        if changed is None:
            changed = x != x0
        involved = (changed.astype(np.float64) @ (c.A != 0).T.astype(np.float64)) > 0
        res, tol = self._residuals(x)
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

    def _residuals(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.compiled
        with np.errstate(invalid="ignore", over="ignore"):
            xz = np.where(np.isfinite(x), x, np.nan)
            lhs = xz @ c.A.T
            scale = np.abs(xz) @ np.abs(c.A).T
        res = lhs - c.rhs
        tol = c.rel_tol * (1.0 + np.abs(c.rhs) + scale)
        return res, tol

    def validate_rows(
        self,
        x_orig: Any,
        x_adv: Any,
        *,
        epsilon: float | None = None,
        norm: str = "linf",
    ) -> np.ndarray:
        """Bool per row: does ``x_adv`` respect every constraint given ``x_orig``?

        With ``epsilon`` the perturbation must also lie in the ``norm`` ball.
        """
        x0, x = self._pair(x_orig, x_adv)
        ok = np.ones(len(x), dtype=bool)
        for m in self._masks(x0, x).values():
            ok &= ~m.any(axis=1)
        if epsilon is not None:
            ok &= _in_ball(x0, x, float(epsilon), _ball_norm(norm))
        return ok

    def violations(
        self,
        x_orig: Any,
        x_adv: Any,
        *,
        epsilon: float | None = None,
        norm: str = "linf",
        max_per_row: int | None = None,
    ) -> list[list[str]]:
        """Human-readable reasons, one list per row (empty: the row is valid)."""
        x0, x = self._pair(x_orig, x_adv)
        c = self.compiled
        m = self._masks(x0, x)
        lo, hi = self._effective_bounds(x0)
        # no relations: an empty (rows, 0) residual table
        res = self._residuals(x)[0] if len(c.ops) else np.zeros((len(x), 0))
        out: list[list[str]] = []
        ball = None
        if epsilon is not None:
            nrm = _ball_norm(norm)
            ball = _ball_size(x0, x, nrm)
            ball_ok = _in_ball(x0, x, float(epsilon), nrm)
        for i in range(len(x)):
            msgs: list[str] = []

            def f(j: int | np.integer[Any]) -> str:
                return c.names[int(j)]

            for j in np.flatnonzero(m["finite"][i]):
                msgs.append(f"feature {f(j)!r} is not a finite number ({x[i, j]})")
            for j in np.flatnonzero(m["immutable"][i]):
                msgs.append(
                    f"feature {f(j)!r} is immutable but changed from {x0[i, j]:.6g} to "
                    f"{x[i, j]:.6g}"
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
            for g in np.flatnonzero(m["one_hot"][i]):
                vals = ", ".join(f"{c.names[k]}={x[i, k]:.3g}" for k in c.groups[g])
                msgs.append(f"one-hot group {c.group_names[g]!r} is not one-hot ({vals})")
            for r in np.flatnonzero(m["relation"][i]):
                rel = self.relations[r]
                msgs.append(
                    f"relation {rel.describe()} violated: left side is {res[i, r] + rel.rhs:.6g}"
                )
            if ball is not None and epsilon is not None and not ball_ok[i]:
                msgs.append(
                    f"perturbation {norm} size {ball[i]:.6g} exceeds epsilon {float(epsilon):g}"
                )
            out.append(msgs[:max_per_row] if max_per_row is not None else msgs)
        return out

    def check_data(self, x: Any) -> list[list[str]]:
        """Where the data itself breaks the schema (absolute check, one list per row)."""
        xa = _as_2d(x, "x").astype(np.float64)
        self.check_shape(xa.shape[1])
        c = self.compiled
        # compare against a reference that differs everywhere, then keep absolute checks
        out: list[list[str]] = []
        # no relations: empty (rows, 0) residual and tolerance tables
        empty = np.zeros((len(xa), 0))
        res, tol = self._residuals(xa) if len(c.ops) else (empty, empty)
        for i in range(len(xa)):
            row = xa[i]
            msgs = []
            for j in range(len(row)):
                v = row[j]
                if not math.isfinite(v):
                    msgs.append(f"feature {c.names[j]!r} is not finite")
                    continue
                if v < c.low[j] - _BOUND_RTOL * max(1, abs(c.low[j])) or v > c.high[j] + (
                    _BOUND_RTOL * max(1, abs(c.high[j]))
                ):
                    msgs.append(
                        f"feature {c.names[j]!r} = {v:.6g} is outside [{c.low[j]:g}, {c.high[j]:g}]"
                    )
                if c.integer[j] and abs(v - round(v)) > _INT_RTOL * max(1, abs(v)):
                    msgs.append(f"feature {c.names[j]!r} = {v:.6g} is not a whole number")
                if (c.binary[j] or c.categorical[j]) and min(abs(v), abs(v - 1)) > 1e-6:
                    msgs.append(f"feature {c.names[j]!r} = {v:.6g} is not 0/1")
            for g, cols in enumerate(c.groups):
                if abs(row[cols].sum() - 1) > 1e-6:
                    msgs.append(f"one-hot group {c.group_names[g]!r} does not sum to 1")
            for r, op in enumerate(c.ops):
                e, t = res[i, r], tol[i, r]
                bad = e > t if op == "<=" else e < -t if op == ">=" else abs(e) > t
                if bad:
                    msgs.append(f"relation {self.relations[r].describe()} does not hold")
            out.append(msgs)
        return out

    # ------------------------------------------------------------------ repair
    def repair(
        self,
        x_orig: Any,
        x_adv: Any,
        *,
        epsilon: float | None = None,
        norm: str = "linf",
        clip: tuple[float, float] | None = None,
        relation_iters: int = 20,
    ) -> tuple[Any, np.ndarray]:
        """Project candidates onto the constraints as well as possible.

        In order: non-finite values back to the original, clip to the (widened) bounds
        and ``clip`` (the model's global bounds), restore immutables, clamp monotone
        features, snap steps/integers/binaries, one-hot groups to their argmax, fit
        the ``epsilon`` ball in ``norm`` if given (discrete changes shrink by whole
        units toward the original, continuous ones are projected), then repair violated
        relations by moving the continuous mutable features they involve (least-squares,
        within their room), falling back to restoring the relation's features.

        Returns ``(x_repaired, ok)``: ``x_repaired`` has the type, dtype and device of
        ``x_adv``; rows where ``ok`` is False could not be repaired and are the original.
        Every returned row passes :meth:`validate_rows` (and the ball check).
        """
        like = x_adv
        x0_in, x_in = self._pair(x_orig, x_adv)
        nrm = _ball_norm(norm) if epsilon is not None else None
        eps = None if epsilon is None else float(epsilon)
        if eps is not None and (not math.isfinite(eps) or eps < 0):
            raise InputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        x0 = x0_in
        x = self._repair_np(x0, x_in, eps, nrm, clip, relation_iters)
        out_dtype = _dtype_of(like)
        xo = x.astype(out_dtype) if out_dtype is not None else x
        ok = self.validate_rows(x0, xo, epsilon=eps, norm=nrm or "linf")
        if clip is not None:
            ok &= (xo >= clip[0] - 1e-6).all(1) & (xo <= clip[1] + 1e-6).all(1)
        xo = np.where(ok[:, None], xo, x0.astype(xo.dtype))
        return _like(xo, like), ok

    def _repair_np(
        self,
        x0: np.ndarray,
        x: np.ndarray,
        eps: float | None,
        nrm: BallNorm | None,
        clip: tuple[float, float] | None,
        relation_iters: int,
    ) -> np.ndarray:
        c = self.compiled
        x = np.where(np.isfinite(x), x, x0)
        lo, hi = self._effective_bounds(x0, clip)
        x = np.clip(x, lo, hi)
        x = np.where(c.immutable, x0, x)
        x = self._monotone(x0, x)
        x = self._snap(x0, x, lo, hi)
        x = self._monotone(x0, x)
        x = self._one_hot(x0, x, lo, hi)
        x = np.where(c.immutable, x0, x)
        if eps is not None and nrm is not None:
            x = self._fit_ball(x0, x, eps, nrm)
        if len(c.ops):
            x = self._fix_relations(x0, x, lo, hi, eps, nrm, relation_iters)
        return x

    def _monotone(self, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
        mono = self.compiled.mono
        x = np.where(mono > 0, np.maximum(x, x0), x)
        return np.where(mono < 0, np.minimum(x, x0), x)

    def _snap(self, x0: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        c = self.compiled
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

    def _one_hot(self, x0: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        c = self.compiled
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

    def _units_cost(self, d: np.ndarray, nrm: BallNorm) -> np.ndarray:
        """Per-row cost of the discrete part of ``d`` (squared for l2)."""
        disc = self.compiled.discrete
        dd = np.where(disc, d, 0.0)
        if nrm == "l2":
            return (dd**2).sum(1)
        if nrm == "l1":
            return np.abs(dd).sum(1)
        return np.abs(dd).max(1, initial=0.0)

    def _fit_ball(self, x0: np.ndarray, x: np.ndarray, eps: float, nrm: BallNorm) -> np.ndarray:
        c = self.compiled
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
            over = np.flatnonzero(self._units_cost(d, nrm) > budget * (1 + 1e-12))
            for i in over:
                d[i] = self._shrink_discrete_row(d[i], budget, nrm)
        # -- continuous part within what is left
        cont = ~c.discrete
        dc = np.where(cont, d, 0.0)
        if nrm == "linf":
            r = eps * (1 - _BALL_RTOL)
            dc = np.clip(dc, -r, r)
        else:
            used = self._units_cost(d, nrm)
            if nrm == "l2":
                left = np.sqrt(np.maximum(eps**2 - used, 0.0))
            else:
                left = np.maximum(eps - used, 0.0)
            left = left * (1 - 10 * _BALL_RTOL)
            dc = _project_rows(dc, nrm, left)
        d = np.where(cont, dc, d)
        return x0 + d

    def _shrink_discrete_row(self, d: np.ndarray, budget: float, nrm: BallNorm) -> np.ndarray:
        c = self.compiled
        d = d.copy()
        power = 2 if nrm == "l2" else 1
        scalar = np.flatnonzero(c.discrete & ~c.categorical)

        def cost() -> float:
            return float((np.abs(np.where(c.discrete, d, 0.0)) ** power).sum())

        for _ in range(10_000):
            if cost() <= budget * (1 + 1e-12):
                break
            best, best_val, is_group = -1, 0.0, False
            for j in scalar.tolist():
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

    def _fix_relations(
        self,
        x0: np.ndarray,
        x: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        eps: float | None,
        nrm: BallNorm | None,
        iters: int,
    ) -> np.ndarray:
        c = self.compiled
        A = c.A
        movable = c.continuous
        for _ in range(max(1, iters)):
            viol = self._relation_violations(x0, x)
            if not viol.any():
                return x
            res, tol = self._residuals(x)
            for r, op in enumerate(c.ops):
                rows = np.flatnonzero(viol[:, r])
                if not len(rows):
                    continue
                a = A[r]
                target = {"<=": -0.5, ">=": 0.5, "==": 0.0}[op] * tol[rows, r]
                need = res[rows, r] - target  # lhs must change by -need
                x[rows] = self._shift_lhs(
                    x0[rows], x[rows], lo[rows], hi[rows], a, need, eps, nrm, movable
                )
            if eps is not None and nrm in ("l2", "l1"):
                x = self._fit_ball(x0, x, eps, nrm)
        # fallback: restore the features of relations that still fail
        for _ in range(len(c.ops) + 1):
            viol = self._relation_violations(x0, x)
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

    def _shift_lhs(
        self,
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
        c = self.compiled
        x = x.copy()
        up_lim = hi.copy()
        down_lim = lo.copy()
        if eps is not None and nrm == "linf":
            r = eps * (1 - _BALL_RTOL)
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


# ----------------------------------------------------------------------------- helpers
def _validate(data: Mapping[str, Any], source: str, node: yaml.Node | None) -> FeatureSchema:
    try:
        schema = FeatureSchema.model_validate(dict(data), context={"defer_cross_checks": True})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            where = ".".join(str(p) for p in loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(_format_problem(node, loc, where, msg))
        raise InputError(f"{source}: invalid feature schema\n" + "\n".join(lines)) from None
    problems = schema.problems()
    if problems:
        lines = [
            _format_problem(node, [int(p) if p.isdigit() else p for p in loc.split(".")], loc, msg)
            for loc, msg in problems
        ]
        raise InputError(f"{source}: invalid feature schema\n" + "\n".join(lines))
    return schema


def _format_problem(node: yaml.Node | None, loc: list[Any], where: str, msg: str) -> str:
    line = _line_of(node, loc)
    at = f"line {line}, " if line else ""
    return f"  {at}field '{where}': {msg}"


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    if node is None:
        return None
    best = node.start_mark.line + 1
    for key in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        if nxt is None:
            break
        node = nxt
        best = node.start_mark.line + 1
    return best


def _close(name: str, known: Mapping[str, int] | Sequence[str]) -> str:
    import difflib

    m = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {m[0]!r}?" if m else ""


def _resolve_feature(item: str | int, names: list[str], what: str) -> int:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        j = int(item)
        if not 0 <= j < len(names):
            raise InputError(f"{what}: feature index {j} is out of range (0..{len(names) - 1})")
        return j
    s = str(item)
    if s not in names:
        raise InputError(f"{what}: unknown feature {s!r}{_close(s, names)}")
    return names.index(s)


def _as_2d(a: Any, what: str) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (rows, features), got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{what} must be numeric, got dtype {arr.dtype}")
    return arr


def _dtype_of(a: Any) -> np.dtype | None:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return np.dtype(str(a.dtype).removeprefix("torch.")) if a.is_floating_point() else None
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    return arr.dtype if arr.dtype.kind == "f" else None


def _like(x: np.ndarray, like: Any) -> Any:
    try:
        import torch

        if isinstance(like, torch.Tensor):
            dt = like.dtype if like.is_floating_point() else torch.float32
            return (
                torch.from_numpy(np.ascontiguousarray(x))
                .to(device=like.device, dtype=dt)
                .reshape(like.shape)
            )
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(like)
    return x.reshape(arr.shape) if arr.ndim == 1 else x


def _ball_norm(norm: str | None) -> BallNorm:
    from advguard.attacks.norms import parse_norm

    return parse_norm(norm or "linf", ("linf", "l2", "l1"))  # type: ignore[return-value]


def _ball_size(x0: np.ndarray, x: np.ndarray, nrm: BallNorm) -> np.ndarray:
    d = x - x0
    if nrm == "linf":
        return np.abs(d).max(1, initial=0.0)
    if nrm == "l2":
        return np.sqrt((d**2).sum(1))
    return np.abs(d).sum(1)


def _in_ball(x0: np.ndarray, x: np.ndarray, eps: float, nrm: BallNorm) -> np.ndarray:
    return _ball_size(x0, x, nrm) <= eps * (1 + 1e-5) + 1e-7


def _project_rows(d: np.ndarray, nrm: BallNorm, radius: np.ndarray) -> np.ndarray:
    """Project each row of ``d`` onto the ``nrm`` ball of its own radius."""
    if nrm == "l2":
        n = np.sqrt((d**2).sum(1))
        f = np.where(n > radius, radius / np.maximum(n, 1e-300), 1.0)
        return d * f[:, None]
    import torch

    from advguard.attacks.norms import project

    return project(torch.from_numpy(d), "l1", torch.from_numpy(radius)).numpy()


def load_schema(spec: FeatureSchema | str | os.PathLike | Mapping[str, Any]) -> FeatureSchema:
    """A schema from a :class:`FeatureSchema`, a YAML file path, or a mapping (inline YAML)."""
    if isinstance(spec, FeatureSchema):
        return spec
    if isinstance(spec, Mapping):
        return FeatureSchema.from_dict(spec, "inline feature schema")
    if isinstance(spec, (str, os.PathLike)):
        return FeatureSchema.load(spec)
    raise InputError(
        f"schema must be a FeatureSchema, a YAML file path or a mapping, got {type(spec).__name__}"
    )
