"""Argument checks shared by every attack, transform, detector and trainer.

One rule set for the whole library: integers are ``int`` (or numpy integers), never
``bool`` and never floats (``steps=2.5`` and ``steps=True`` are refused alike); numbers are
finite reals, never ``bool``; every failure raises :class:`ParameterError` (an
:class:`~advguard.errors.InputError`) with a one-line message that starts with the
parameter's name, and carries the name in ``.param`` (threat-model files use it to point
at the offending line).

Work-size parameters (steps, restarts, queries, samples) have upper bounds
(:data:`LIMITS`): ``steps: 1000000000000`` is a typo or a mistake, not a plan, and would
run silently for days. ``allow_large=True`` (CLI ``--allow-large``, threat-model
``allow_large: true``) lifts them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import TypeGuard, TypeVar

from advguard.errors import InputError

LIMITS: dict[str, int] = {
    "steps": 100_000,
    "restarts": 1_000,
    "queries": 10_000_000,
    "samples": 10_000_000,
}
"""Upper bounds of the work-size parameters, by kind (lifted by ``allow_large=True``)."""

T = TypeVar("T")


class ParameterError(InputError):
    """A bad value for the parameter named ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(value: object) -> TypeGuard[Integral]:
    return isinstance(value, Integral) and not isinstance(value, bool)


def integer(
    name: str,
    value: object,
    *,
    low: int | None = None,
    high: int | None = None,
    limit: str | None = None,
    allow_large: bool = False,
) -> int:
    """``value`` as an ``int`` in ``[low, high]``; ``limit`` names a :data:`LIMITS` kind."""
    if not _is_int(value):
        raise ParameterError(name, f"{name} must be an integer, got {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise ParameterError(name, f"{name} must be an integer >= {low}, got {v}")
    if high is not None and v > high:
        raise ParameterError(name, f"{name} must be an integer <= {high}, got {v}")
    if limit is not None and not allow_large and v > LIMITS[limit]:
        raise ParameterError(
            name,
            f"{name}={v:,} is over the limit of {LIMITS[limit]:,}; set allow_large "
            "(CLI --allow-large) to run it anyway",
        )
    return v


def positive_int(
    name: str,
    value: object,
    *,
    high: int | None = None,
    limit: str | None = None,
    allow_large: bool = False,
) -> int:
    """An integer >= 1 (``high``, ``limit``, ``allow_large`` as in :func:`integer`)."""
    return integer(name, value, low=1, high=high, limit=limit, allow_large=allow_large)


def steps(name: str, value: object, *, allow_large: bool = False, low: int = 1) -> int:
    """Iterations: an integer in ``[low, 100_000]``."""
    return integer(name, value, low=low, limit="steps", allow_large=allow_large)


def restarts(name: str, value: object, *, allow_large: bool = False) -> int:
    """Random restarts: an integer in ``[1, 1_000]``."""
    return integer(name, value, low=1, limit="restarts", allow_large=allow_large)


def queries(name: str, value: object, *, allow_large: bool = False, low: int = 1) -> int:
    """A query budget: an integer in ``[low, 10_000_000]``."""
    return integer(name, value, low=low, limit="queries", allow_large=allow_large)


def samples(name: str, value: object, *, allow_large: bool = False, low: int = 1) -> int:
    """A sample count: an integer in ``[low, 10_000_000]``."""
    return integer(name, value, low=low, limit="samples", allow_large=allow_large)


def number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the range given (``*_open``: bound excluded)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise ParameterError(name, f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ParameterError(name, f"{name} must be a finite number, got {value!r}")
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        raise ParameterError(
            name, f"{name} must be {_range(low, high, low_open, high_open)}, got {value!r}"
        )
    return v


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    return number(name, value, low=0.0, low_open=True)


def non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    return number(name, value, low=0.0)


def fraction(name: str, value: object, *, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in [0, 1] (either end excluded on request)."""
    return number(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def choice(name: str, value: object, choices: Iterable[T]) -> T:
    """One of ``choices`` (compared with ``==``)."""
    options = list(choices)
    for c in options:
        if type(value) is type(c) and value == c:
            return c
    shown = ", ".join(str(c) for c in options)
    raise ParameterError(name, f"unknown {name} {value!r}; use one of {shown}")


def flag(name: str, value: object) -> bool:
    """A real ``bool`` (``"no"`` or ``0`` are refused rather than guessed)."""
    if not isinstance(value, bool):
        raise ParameterError(name, f"{name} must be true or false, got {value!r}")
    return value


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "a finite number"  # pragma: no cover
