"""Bounded parsing of JSON and YAML files that come from outside (reports, policies, state).

A file is data, and data can be hostile: a 2 GB file, ``[[[[...]]]]`` nested 100,000 deep
(which makes a recursive parser blow the stack), ``NaN``/``Infinity`` (not JSON, but Python's
``json`` accepts them), numbers with 10,000 digits. The readers here refuse all of these with
an :class:`~advguard.errors.InputError` (one line, naming the source) before anything else
looks at the content:

* at most ``max_bytes`` bytes are read (the file's size is checked first);
* nesting deeper than ``max_depth`` containers is refused;
* JSON constants ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow to infinity
  are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from advguard.errors import InputError

MAX_BYTES = 64 * 1024 * 1024
"""Default size limit (64 MiB): a report with picture-grid examples is a few MiB."""
MAX_DEPTH = 64
"""Default nesting limit: advguard's own documents nest fewer than 12 levels."""
MAX_CONTAINERS = 2_000_000
"""Default limit on dicts + lists visited (YAML aliases can make a small file a huge tree)."""


def check_depth(
    obj: Any,
    max_depth: int = MAX_DEPTH,
    source: str = "<data>",
    *,
    max_containers: int = MAX_CONTAINERS,
) -> None:
    """Raise :class:`InputError` when ``obj`` nests dicts/lists deeper than ``max_depth``
    or holds more than ``max_containers`` of them (counting shared ones each time seen).

    Iterative (no recursion), so it is safe on any object a parser managed to build.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > max_depth:
            raise InputError(f"{source}: nested deeper than {max_depth} levels; refusing it")
        seen += 1
        if seen > max_containers:
            raise InputError(f"{source}: more than {max_containers} lists/objects; refusing it")
        stack.extend((c, depth + 1) for c in children)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} overflows a 64-bit float")
    return v


def loads(
    data: str | bytes,
    *,
    source: str = "<json>",
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse JSON text with size, depth and number limits; errors are :class:`InputError`."""
    if len(data) > max_bytes:
        raise InputError(f"{source}: {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        obj = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise InputError(f"{source}: nested too deeply; refusing it") from None
    except UnicodeDecodeError:
        raise InputError(f"{source}: not UTF-8 text") from None
    except ValueError as e:  # JSONDecodeError, our hooks, int digits limit
        raise InputError(f"{source}: not valid JSON ({_one_line(e)})") from None
    check_depth(obj, max_depth, source)
    return obj


def read_bytes(path: str | Path, *, what: str = "file", max_bytes: int = MAX_BYTES) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes (checked before reading)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} is not a regular file")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise InputError(f"{what} {p}: {size} bytes is over the {max_bytes}-byte limit")
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"{what} {p}: cannot be read ({e.strerror or e})") from None
    if len(raw) > max_bytes:  # grew while we read it
        raise InputError(f"{what} {p}: over the {max_bytes}-byte limit")
    return raw


def load_file(
    path: str | Path,
    *,
    what: str = "JSON file",
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Read and parse a JSON file with :func:`loads`'s limits."""
    raw = read_bytes(path, what=what, max_bytes=max_bytes)
    return loads(raw, source=str(path), max_bytes=max_bytes, max_depth=max_depth)


def yaml_text(raw: bytes | str, *, source: str = "<yaml>", max_bytes: int = 1024 * 1024) -> str:
    """Decode YAML source text within a size limit (policies and threat models are small)."""
    if len(raw) > max_bytes:
        raise InputError(f"{source}: {len(raw)} bytes is over the {max_bytes}-byte limit")
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{source}: not UTF-8 text") from None
    return raw


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


__all__ = [
    "MAX_BYTES",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "check_depth",
    "load_file",
    "loads",
    "read_bytes",
    "yaml_text",
]
