"""The parts of a feature schema (features, one-hot groups, linear relations), their
cross-field checks, and the helpers that read a schema from YAML or from a dataset.

:class:`~advguard.attacks.tabular.schema.FeatureSchema` ties these parts together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from advguard.errors import InputError

FeatureKind = Literal["numeric", "integer", "binary", "categorical"]
Monotone = Literal["increase", "decrease"]

MONOTONE_ALIASES = {
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
            return MONOTONE_ALIASES.get(key, v)
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


def features_from_mapping(v: Any) -> Any:
    """Also accept ``{name: {spec...}}`` for the features (YAML mapping in column order)."""
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


# ----------------------------------------------------------------------- cross checks
Problems = list[tuple[str, str]]


def schema_problems(
    features: Sequence[FeatureSpec],
    one_hot_groups: Sequence[OneHotGroup],
    relations: Sequence[LinearRelation],
) -> Problems:
    """Cross-field inconsistencies as ``(field path, message)`` pairs (empty: fine)."""
    out: Problems = []
    index = _name_problems(features, out)
    member_of = _group_problems(one_hot_groups, index, out)
    for i, f in enumerate(features):
        _feature_problems(i, f, one_hot_groups, member_of, out)
    _relation_problems(relations, index, out)
    return out


def _name_problems(features: Sequence[FeatureSpec], out: Problems) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, f in enumerate(features):
        if f.name in index:
            out.append(
                (
                    f"features.{i}.name",
                    f"duplicate feature name {f.name!r} (also features.{index[f.name]})",
                )
            )
        else:
            index[f.name] = i
    return index


def _group_problems(
    one_hot_groups: Sequence[OneHotGroup], index: Mapping[str, int], out: Problems
) -> dict[str, int]:
    member_of: dict[str, int] = {}
    for g, grp in enumerate(one_hot_groups):
        seen: set[str] = set()
        for k, fname in enumerate(grp.features):
            loc = f"one_hot_groups.{g}.features.{k}"
            if fname not in index:
                out.append((loc, f"unknown feature {fname!r}{close_match(fname, index)}"))
                continue
            if fname in seen:
                out.append((loc, f"feature {fname!r} is listed twice"))
                continue
            seen.add(fname)
            if fname in member_of:
                other = one_hot_groups[member_of[fname]].name
                out.append((loc, f"feature {fname!r} is already in one-hot group {other!r}"))
                continue
            member_of[fname] = g
    return member_of


def _feature_problems(
    i: int,
    f: FeatureSpec,
    one_hot_groups: Sequence[OneHotGroup],
    member_of: Mapping[str, int],
    out: Problems,
) -> None:
    loc = f"features.{i}"
    if f.low is not None and f.high is not None and f.low > f.high:
        out.append((f"{loc}.low", f"low {f.low:g} is above high {f.high:g}"))
    if f.name in member_of:
        gname = one_hot_groups[member_of[f.name]].name
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


def _relation_problems(
    relations: Sequence[LinearRelation], index: Mapping[str, int], out: Problems
) -> None:
    for r, rel in enumerate(relations):
        for fname in rel.coef:
            if fname not in index:
                out.append(
                    (
                        f"relations.{r}.coef",
                        f"unknown feature {fname!r}{close_match(fname, index)}",
                    )
                )
        if all(c == 0 for c in rel.coef.values()):
            out.append((f"relations.{r}.coef", "all coefficients are 0"))


# ------------------------------------------------------------------------ YAML and errors
def parse_yaml(text: str, source: str) -> tuple[Mapping[str, Any], yaml.Node | None]:
    """The mapping in YAML ``text`` and its node tree (for line numbers in errors)."""
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
    return data, node


def format_problem(node: yaml.Node | None, loc: list[Any], where: str, msg: str) -> str:
    """One line of an invalid-schema error, with the YAML line when known."""
    line = line_of(node, loc)
    at = f"line {line}, " if line else ""
    return f"  {at}field '{where}': {msg}"


def line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """The YAML line of the field at path ``loc`` (or of its closest parent)."""
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


def close_match(name: str, known: Mapping[str, int] | Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, else ``""``."""
    import difflib

    m = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {m[0]!r}?" if m else ""


def resolve_feature(item: str | int, names: list[str], what: str) -> int:
    """The column index of a feature given by name or index."""
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        j = int(item)
        if not 0 <= j < len(names):
            raise InputError(f"{what}: feature index {j} is out of range (0..{len(names) - 1})")
        return j
    s = str(item)
    if s not in names:
        raise InputError(f"{what}: unknown feature {s!r}{close_match(s, names)}")
    return names.index(s)


# ---------------------------------------------------------------------------- datasets
def dataset_schema_data(
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
) -> dict[str, Any]:
    """The schema mapping that ``FeatureSchema.from_dataset`` validates (see there)."""
    names, types, lows, highs = _dataset_columns(ds)

    def resolve(items: Iterable[str | int], what: str) -> list[int]:
        out = []
        for it in items:
            out.append(resolve_feature(it, names, what))
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
        j = resolve_feature(key, names, "bounds")
        lows[j], highs[j] = lo, hi
    step_of = {resolve_feature(k, names, "steps"): v for k, v in (steps or {}).items()}
    cost_of = {resolve_feature(k, names, "costs"): v for k, v in (costs or {}).items()}

    if one_hot_groups is None:
        groups = _dataset_groups(ds, names, types)
    else:
        groups = [dict(g) for g in one_hot_groups]
    in_group = {f for g in groups for f in g.get("features", [])}

    feats = []
    for j, n in enumerate(names):
        t = "integer" if j in ints else types[j]
        spec = _dataset_feature(n, t, n in in_group, lows[j], highs[j], j in imm)
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
    return {
        "name": name or f"{getattr(ds, 'name', 'dataset')}-schema",
        "features": feats,
        "one_hot_groups": groups,
        "relations": rels,
    }


def _dataset_columns(ds: Any) -> tuple[list[str], list[str], list[Any], list[Any]]:
    """Names, types, lows and highs of a tabular dataset's columns."""
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
    return names, types, lows, highs


def _dataset_groups(ds: Any, names: list[str], types: list[str]) -> list[dict[str, Any]]:
    """One-hot groups from the dataset's encoding metadata, else by ``col=value`` prefix."""
    enc = (getattr(ds, "metadata", None) or {}).get("encoding") or {}
    groups: list[dict[str, Any]] = [
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
    return groups


def _dataset_feature(
    n: str, t: str, in_group: bool, low: Any, high: Any, immutable: bool
) -> dict[str, Any]:
    return {
        "name": n,
        "type": None if (in_group and t == "categorical") else t,
        "low": None if low is None or not math.isfinite(low) else low,
        "high": None if high is None or not math.isfinite(high) else high,
        "immutable": immutable,
    }
