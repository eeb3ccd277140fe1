"""Exceptions raised by advguard.

Every error a user can trigger with bad input derives from :class:`AdvguardError`;
input problems additionally derive from :class:`ValueError` so generic callers
can catch them the usual way. The CLI turns these into a one-line message and
exit code 2, never a traceback.
"""

from __future__ import annotations


class AdvguardError(Exception):
    """Base class of all advguard errors."""


class InputError(AdvguardError, ValueError):
    """Bad argument or bad data given to advguard (shape, NaN, bounds, labels...)."""


class UnsafeFileError(AdvguardError, ValueError):
    """A file format that could execute code on load (pickle) was refused."""


class MissingDependencyError(AdvguardError, ImportError):
    """An optional dependency (an extra) is needed for this feature."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional package '{package}'. "
            f"Install it with: pip install 'advguard[{extra}]'"
        )
