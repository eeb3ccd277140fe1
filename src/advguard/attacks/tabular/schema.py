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
from pathlib import Path
from typing import Any

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

from advguard.attacks.tabular.arrays import as_2d, float_dtype_of, like_input
from advguard.attacks.tabular.ball import BallNorm, ball_norm
from advguard.attacks.tabular.compiled import CompiledSchema, compile_schema, effective_bounds
from advguard.attacks.tabular.repair import repair_rows
from advguard.attacks.tabular.spec import (
    FeatureKind,
    FeatureSpec,
    LinearRelation,
    Monotone,
    OneHotGroup,
    dataset_schema_data,
    features_from_mapping,
    format_problem,
    parse_yaml,
    schema_problems,
)
from advguard.attacks.tabular.validate import data_problems, row_violations, valid_rows
from advguard.errors import InputError

__all__ = [
    "BallNorm",
    "CompiledSchema",
    "FeatureKind",
    "FeatureSchema",
    "FeatureSpec",
    "LinearRelation",
    "Monotone",
    "OneHotGroup",
    "as_2d",
    "load_schema",
]


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

    _compiled: CompiledSchema | None = PrivateAttr(default=None)

    @field_validator("features", mode="before")
    @classmethod
    def _features_mapping(cls, v: Any) -> Any:
        return features_from_mapping(v)

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
        data, node = parse_yaml(text, source)
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
        data = dataset_schema_data(
            ds,
            immutable=immutable,
            monotone_increasing=monotone_increasing,
            monotone_decreasing=monotone_decreasing,
            integer=integer,
            bounds=bounds,
            steps=steps,
            costs=costs,
            one_hot_groups=one_hot_groups,
            relations=relations,
            name=name,
        )
        return cls.from_dict(data, f"schema for dataset {getattr(ds, 'name', '')!r}")

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal schema."""
        data = self.model_dump(exclude_defaults=True)
        data.setdefault("features", [])
        return yaml.safe_dump(data, sort_keys=False)

    # --------------------------------------------------------------- checks
    def problems(self) -> list[tuple[str, str]]:
        """Cross-field inconsistencies as ``(field path, message)`` pairs (empty: fine)."""
        return schema_problems(self.features, self.one_hot_groups, self.relations)

    # ------------------------------------------------------------ compiled form
    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def compiled(self) -> CompiledSchema:
        if self._compiled is None:
            self._compiled = compile_schema(self.features, self.one_hot_groups, self.relations)
        return self._compiled

    def effective_bounds(
        self, x0: np.ndarray, clip: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row bounds for originals ``x0``: the schema's bounds (within ``clip``),
        widened to include the original value."""
        return effective_bounds(self.compiled, x0, clip)

    # -------------------------------------------------------------- validation
    def check_shape(self, n_features: int, what: str = "input") -> None:
        if int(n_features) != self.n_features:
            raise InputError(
                f"feature schema {self.name!r} describes {self.n_features} features but the "
                f"{what} has {int(n_features)}; the schema lists every column, in order"
            )

    def _pair(self, x_orig: Any, x_adv: Any) -> tuple[np.ndarray, np.ndarray]:
        xa = as_2d(x_adv, "x_adv")
        x0 = as_2d(x_orig, "x_orig")
        if x0.shape != xa.shape:
            raise InputError(
                f"x_orig and x_adv must have the same shape, got {x0.shape} and {xa.shape}"
            )
        self.check_shape(x0.shape[1])
        # compare at the precision of x_adv (attacks return float32)
        if xa.dtype == np.float32:
            x0 = x0.astype(np.float32)
        return x0.astype(np.float64), xa.astype(np.float64)

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
        return valid_rows(self.compiled, x0, x, epsilon, norm)

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
        return row_violations(
            self.compiled,
            self.relations,
            x0,
            x,
            epsilon=epsilon,
            norm=norm,
            max_per_row=max_per_row,
        )

    def check_data(self, x: Any) -> list[list[str]]:
        """Where the data itself breaks the schema (absolute check, one list per row)."""
        xa = as_2d(x, "x").astype(np.float64)
        self.check_shape(xa.shape[1])
        return data_problems(self.compiled, self.relations, xa)

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
        nrm = ball_norm(norm) if epsilon is not None else None
        eps = None if epsilon is None else float(epsilon)
        if eps is not None and (not math.isfinite(eps) or eps < 0):
            raise InputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        x0 = x0_in
        x = repair_rows(self.compiled, x0, x_in, eps, nrm, clip, relation_iters)
        out_dtype = float_dtype_of(like)
        xo = x.astype(out_dtype) if out_dtype is not None else x
        ok = self.validate_rows(x0, xo, epsilon=eps, norm=nrm or "linf")
        if clip is not None:
            ok &= (xo >= clip[0] - 1e-6).all(1) & (xo <= clip[1] + 1e-6).all(1)
        xo = np.where(ok[:, None], xo, x0.astype(xo.dtype))
        return like_input(xo, like), ok


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
            lines.append(format_problem(node, loc, where, msg))
        raise InputError(f"{source}: invalid feature schema\n" + "\n".join(lines)) from None
    problems = schema.problems()
    if problems:
        lines = [
            format_problem(node, [int(p) if p.isdigit() else p for p in loc.split(".")], loc, msg)
            for loc, msg in problems
        ]
        raise InputError(f"{source}: invalid feature schema\n" + "\n".join(lines))
    return schema


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
