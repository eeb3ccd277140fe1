"""The three kinds of input a guard serves, and how a request's ``inputs`` become a batch.

* **tensor** (images, any fixed shape): nested lists of numbers, a flat row per input, or a
  ``.npy`` body; checked against the model's shape and bounds (:func:`check_batch`).
* **text** (a ``*.textmodel.json`` model): a list of strings, each at most
  ``edge.max_text_chars`` characters; sanitized with :class:`TextNormalizer` (Unicode NFKC,
  confusable characters, invisible characters; ``sanitize.text_normalize``). The batch is a 1-D
  object array of ``str``.
* **tabular** (a model with a feature schema, ``model.schema``): records keyed by feature name
  (``{"age": 41, "income": 52000, ...}``; exactly the schema's features) or rows of numbers in
  schema order; every row must satisfy the schema's domain: bounds, integer and binary
  features, one-hot groups with exactly one 1, linear relations. The batch is float32
  ``(n, features)``.

Everything here raises :class:`~advguard.guard.problems.Problem` (a 4xx) for bad input.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from advguard.guard.edge import InputSpec, as_float_array, check_batch
from advguard.guard.problems import Problem

if TYPE_CHECKING:
    from advguard.attacks.tabular.schema import FeatureSchema

Kind = Literal["tensor", "text", "tabular"]


def text_batch(raw: Any, *, max_batch: int, max_chars: int) -> np.ndarray:
    """``raw`` (a JSON list of strings) as a 1-D object array of ``str``."""
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "OU":
        raw = raw.reshape(-1).tolist()
    if not isinstance(raw, list):
        raise Problem("invalid-input", "a text model takes a list of strings")
    if not raw:
        raise Problem("invalid-input", "the batch is empty")
    if len(raw) > max_batch:
        raise Problem("batch-too-large", f"at most {max_batch} inputs per request, got {len(raw)}")
    for i, t in enumerate(raw):
        if not isinstance(t, str):
            raise Problem(
                "invalid-input", f"inputs[{i}] is a {type(t).__name__}; a text model takes strings"
            )
        if len(t) > max_chars:
            raise Problem(
                "invalid-input", f"inputs[{i}] has {len(t)} characters; at most {max_chars}"
            )
    out = np.empty(len(raw), dtype=object)
    out[:] = raw
    return out


def _record_rows(raw: list[Any], names: list[str]) -> np.ndarray:
    """Records keyed by feature name -> rows in schema order (every feature, nothing else)."""
    index = {n: j for j, n in enumerate(names)}
    rows = np.empty((len(raw), len(names)), dtype=np.float64)
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise Problem(
                "invalid-input", f"inputs[{i}] must be a record (object) like every other input"
            )
        unknown = [k for k in rec if k not in index]
        if unknown:
            raise Problem(
                "invalid-input",
                f"inputs[{i}] has unknown features: {', '.join(unknown[:5])!s:.200}",
            )
        missing = [n for n in names if n not in rec]
        if missing:
            listed = ", ".join(missing[:5])[:200]
            raise Problem("invalid-input", f"inputs[{i}] lacks features: {listed}")
        for name, v in rec.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise Problem(
                    "invalid-input", f"inputs[{i}].{name!s:.60} must be a number, got {v!r:.40}"
                )
            rows[i, index[name]] = float(v)
    return rows


def schema_violation(schema: FeatureSchema, x: np.ndarray) -> str | None:
    """The first way a row of ``x`` breaks the schema's domain, or None."""
    c = schema.compiled
    for j, name in enumerate(c.names):
        col = x[:, j]
        bad = np.flatnonzero((col < c.low[j]) | (col > c.high[j]))
        if len(bad):
            return f"feature {name!r} of input {bad[0]} is outside [{c.low[j]:g}, {c.high[j]:g}]"
        if c.integer[j] and (col != np.round(col)).any():
            return f"feature {name!r} must be an integer"
        if (c.binary[j] or c.categorical[j]) and not np.isin(col, (0.0, 1.0)).all():
            return f"feature {name!r} must be 0 or 1"
    for g, cols in enumerate(c.groups):
        if (x[:, cols].sum(1) != 1).any():
            return f"one-hot group {c.group_names[g]!r} must have exactly one feature set to 1"
    if len(c.ops):
        from advguard.attacks.tabular.compiled import residuals

        res, tol = residuals(c, x)
        for r, op in enumerate(c.ops):
            ok = {
                "<=": res[:, r] <= tol[:, r],
                ">=": res[:, r] >= -tol[:, r],
                "==": np.abs(res[:, r]) <= tol[:, r],
            }[op]
            if not ok.all():
                return f"the inputs break the relation {c.rel_names[r]!r}"
    return None


def tabular_batch(
    raw: Any, schema: FeatureSchema, spec: InputSpec, *, max_batch: int, clip: bool
) -> np.ndarray:
    """Records or numeric rows -> float32 ``(n, features)`` inside the schema's domain."""
    names = schema.compiled.names
    if isinstance(raw, list) and raw and all(isinstance(r, dict) for r in raw[:1]):
        if len(raw) > max_batch:
            raise Problem(
                "batch-too-large", f"at most {max_batch} inputs per request, got {len(raw)}"
            )
        x = _record_rows(raw, names)
    else:
        x = raw if isinstance(raw, np.ndarray) else as_float_array(raw, '"inputs"')
    out = check_batch(x, spec, max_batch=max_batch, clip=clip)
    why = schema_violation(schema, out.astype(np.float64))
    if why is not None:
        raise Problem("invalid-input", f"the inputs break the feature schema: {why}")
    return out


def text_spec(num_classes: int) -> InputSpec:
    """A text model's input spec: one string per input (shape ``()``, no numeric bounds)."""
    return InputSpec((), (-math.inf, math.inf), num_classes)
