"""Names and references of registry versions: ``NAME``, ``NAME:VERSION``, ``NAME@STAGE``,
version numbers and the stored names of artifacts."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advguard.errors import InputError
from advguard.registry.db import STAGES

__all__ = [
    "MAX_VERSION",
    "check_artifact_name",
    "check_file_names",
    "check_name",
    "check_name_set",
    "check_version",
    "parse_ref",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
MAX_VERSION = 2**63 - 1
# what ``pull`` writes itself next to the artifacts
_RESERVED_NAMES = ("MODEL_CARD.md", "version.json", "signature.sigstore.json")
_RESERVED_DIRS = ("reports",)


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``NAME``, ``NAME:VERSION`` or ``NAME@STAGE`` -> (name, version, stage)."""
    name, version, stage = ref, None, None
    if "@" in ref:
        name, stage = ref.rsplit("@", 1)
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r} in {ref!r}; stages: {', '.join(STAGES)}")
    elif ":" in ref:
        name, v = ref.rsplit(":", 1)
        if not v.isascii() or not v.isdigit() or len(v) > 19:
            raise InputError(
                f"version in {ref!r} must be a positive integer below 2^63 (e.g. {name}:3)"
            )
        version = check_version(int(v))
    check_name(name)
    return name, version, stage


def check_version(version: Any) -> int:
    """A version number: an integer in 1 .. 2^63-1 (what every database can store)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(f"version {version!r} must be an integer")
    if not 1 <= version <= MAX_VERSION:
        raise InputError(f"version {version} is out of range (1 to 2^63-1)")
    return version


def check_name(name: str) -> str:
    if not _NAME.match(name or "") or ".." in name:
        raise InputError(
            f"model name {name!r} is invalid: use letters, digits, '.', '_', '-', '/' "
            "(no ':' or '@'), at most 200 characters"
        )
    return name


def check_artifact_name(name: Any) -> str:
    """An artifact's stored name: a relative POSIX path that stays inside the folder it is
    pulled into (no absolute path, drive, '..', '.', empty part, backslash or control
    character) and does not shadow a file ``pull`` writes itself."""
    if not isinstance(name, str) or not 0 < len(name) <= 255:
        raise InputError(f"artifact name {name!r} must be a non-empty string (at most 255)")
    parts = name.split("/")
    if (
        "\\" in name
        or name.startswith("/")
        or ":" in parts[0]
        or any(ord(c) < 32 or c == "\x7f" for c in name)
        or any(p in ("", ".", "..") for p in parts)
        or len(parts) > 16
    ):
        raise InputError(
            f"artifact name {name!r} must be a relative path without '..', '.', empty parts, "
            "backslashes or control characters"
        )
    if name in _RESERVED_NAMES or parts[0] in _RESERVED_DIRS:
        raise InputError(
            f"artifact name {name!r} is reserved for what pull writes itself "
            f"({', '.join(_RESERVED_NAMES)}, {'/, '.join(_RESERVED_DIRS)}/)"
        )
    return name


def check_name_set(names: Sequence[str]) -> None:
    ordered = sorted(names)
    for a, b in itertools.pairwise(ordered):
        if b.startswith(a + "/"):
            raise InputError(f"artifact name {a!r} is also used as a folder by {b!r}")


def check_file_names(files: Mapping[str, Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, path in files.items():
        check_artifact_name(name)
        p = Path(path)
        if not p.is_file():
            raise InputError(f"model file not found: {p}")
        out[name] = p
    if not out:
        raise InputError("push needs at least one model file (--model FILE)")
    check_name_set(list(out))
    return out
