"""Validation at the edge: body size (counted while the stream is read), read deadline, JSON
depth, batch size, shape, dtype, bounds and NaN/Inf. Every failure is a :class:`Problem` with a
4xx status; nothing here lets bad input reach the model."""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect

from advguard.guard.problems import Problem

#: Numeric dtypes accepted in ``.npy`` bodies and v2 ``datatype`` fields.
V2_DTYPES = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
}


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    bounds: tuple[float, float]
    num_classes: int


async def read_capped(
    chunks: AsyncIterator[bytes],
    max_bytes: int,
    timeout_s: float,
    declared_length: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """Read the body from ``chunks``, refusing (413) as soon as it passes ``max_bytes`` and
    (408) when it is not complete within ``timeout_s``."""
    if declared_length is not None:
        try:
            n = int(declared_length)
        except ValueError:
            raise Problem("bad-request", "Content-Length is not a number") from None
        if n > max_bytes:
            raise Problem("body-too-large", f"the body may be at most {max_bytes} bytes")
    import asyncio

    deadline = clock() + timeout_s
    buf = bytearray()
    late = Problem("request-timeout", f"the body must arrive within {timeout_s:g} s")
    try:
        # one timeout for the whole body (asyncio.wait_for per chunk made a task per chunk)
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                if clock() > deadline:
                    raise late
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise Problem("body-too-large", f"the body may be at most {max_bytes} bytes")
    except ClientDisconnect:  # nobody is left to answer; not an internal error
        raise Problem("bad-request", "the client closed the connection mid-body") from None
    except TimeoutError:
        raise late from None
    return bytes(buf)


def _refuse_constant(name: str) -> Any:
    raise Problem("invalid-input", f"{name} is not allowed: inputs must be finite numbers")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of ``obj``, stopping once it passes ``limit``."""
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        if isinstance(node, list):
            # numbers at this level add no depth; only containers are pushed
            stack.extend((v, d + 1) for v in node if isinstance(v, list | dict))
        elif isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values() if isinstance(v, list | dict))
    return deepest


#: Per byte: +1 opens a JSON container, -1 closes one, 0 otherwise.
_NEST = np.zeros(256, dtype=np.int8)
_NEST[[ord("["), ord("{")]] = 1
_NEST[[ord("]"), ord("}")]] = -1
_NEST_STEP: list[int] = _NEST.tolist()
#: Every byte but brackets and quotes (deleted by ``bytes.translate``).
_NOT_MARKS = bytes(sorted(set(range(256)) - set(b'[]{}"')))
#: A string once everything but brackets and quotes is gone (no backslash: no escapes).
_MARKED_STRING = re.compile(rb'"[^"]*"')


def _text_depth(body: bytes) -> int | None:
    """Nesting depth of the valid JSON document ``body``, from its bytes (the same number
    as :func:`_depth` of the parsed value, ~10x faster than walking it); None when ``body``
    holds a backslash (an escaped quote could hide a string boundary: walk the value then).
    Without escapes every quote opens or closes a string: the brackets and quotes alone
    (``bytes.translate``, in C) less the strings among them are the structure's brackets; a
    short run of them (a batch of images: a few dozen) is summed in Python, a long one with
    numpy."""
    if b"\\" in body or not body:
        return None
    marks = body.translate(None, _NOT_MARKS)
    if b'"' in marks:
        marks = _MARKED_STRING.sub(b"", marks)
    if len(marks) <= 512:
        return max(1, max(accumulate(_NEST_STEP[c] for c in marks), default=1))
    steps = _NEST[np.frombuffer(marks, dtype=np.uint8)]
    return max(1, int(np.cumsum(steps, dtype=np.int32).max()))


def parse_json(body: bytes, max_depth: int) -> Any:
    if not body:
        raise Problem("invalid-json", "the body is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Problem("invalid-json", "the body is not UTF-8") from None
    # the C parser nests far below the interpreter's recursion limit for every depth we
    # accept; a deeper document fails as RecursionError before any value is built
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise Problem(
            "invalid-json", f"not valid JSON at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise Problem("too-deep", f"JSON may nest at most {max_depth} levels") from None
    depth = _text_depth(body)
    if (depth if depth is not None else _depth(obj, max_depth)) > max_depth:
        raise Problem("too-deep", f"JSON may nest at most {max_depth} levels")
    return obj


def as_float_array(data: Any, what: str) -> np.ndarray:
    def bad_type() -> Problem:
        return Problem("invalid-input", f"{what} must be a (nested) list of numbers")

    if isinstance(data, bool) or not isinstance(data, list):
        raise bad_type()
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise Problem(
            "invalid-input", f"{what} is ragged: every input must have the same shape"
        ) from None
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        # strings, nulls, booleans and dicts end up as object/str/bool arrays
        raise bad_type()
    return arr.astype(np.float64, copy=False)


def check_batch(x: np.ndarray, spec: InputSpec, *, max_batch: int, clip: bool) -> np.ndarray:
    """``x`` as float32 of shape ``(n, *spec.shape)``; a flat ``(n, prod(shape))`` batch is
    reshaped. Refuses empty or oversized batches, wrong shapes, NaN/Inf and (unless ``clip``)
    values outside ``spec.bounds``."""
    want = spec.shape
    if x.ndim == 0:
        raise Problem("invalid-input", f"expected a batch of inputs of shape {list(want)}")
    n = int(x.shape[0])
    if n == 0:
        raise Problem("invalid-input", "the batch is empty")
    if n > max_batch:
        raise Problem("batch-too-large", f"at most {max_batch} inputs per request, got {n}")
    if tuple(x.shape[1:]) != want:
        if x.ndim == 2 and x.shape[1] == math.prod(want):
            x = x.reshape((n, *want))
        else:
            raise Problem(
                "invalid-input",
                f"each input must have shape {list(want)} (or {math.prod(want)} flat numbers), "
                f"got {list(x.shape[1:])}",
            )
    x64 = x.astype(np.float64, copy=False)
    finite = np.isfinite(x64)
    if not finite.all():
        raise Problem("invalid-input", "inputs contain NaN or infinite values")
    lo, hi = spec.bounds
    if clip:
        x64 = np.clip(x64, lo, hi)
    elif (x64 < lo).any() or (x64 > hi).any():
        raise Problem(
            "invalid-input",
            f"inputs must lie within the model's bounds [{lo:g}, {hi:g}]; got values in "
            f"[{float(x64.min()):.4g}, {float(x64.max()):.4g}]",
        )
    out = x64.astype(np.float32)
    if not np.isfinite(out).all():  # float64 values beyond float32's range
        raise Problem("invalid-input", "inputs overflow float32")
    return out


def parse_predict_json(obj: Any) -> Any:
    """``{"inputs": [...]}`` (the HttpClassifier contract): the ``inputs`` list, unconverted
    (numbers, strings or records: the model's kind decides, see :mod:`.modalities`)."""
    if not isinstance(obj, dict) or "inputs" not in obj:
        raise Problem("invalid-input", 'the body must be a JSON object with the field "inputs"')
    if not isinstance(obj["inputs"], list):
        raise Problem("invalid-input", '"inputs" must be a list with one entry per input')
    return obj["inputs"]


def parse_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` body: the header is read first and must describe exactly the bytes that
    follow (numpy's own reader would allocate whatever shape the header claims); numeric
    dtypes only, never pickles (``allow_pickle=False`` semantics)."""
    from numpy.lib import format as npformat

    def bad(why: str = "not a valid .npy file") -> Problem:
        return Problem("invalid-input", f"the body is {why}")

    fp = io.BytesIO(body)
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp)
        else:
            raise bad()
    except (ValueError, OSError, EOFError, TypeError, SyntaxError):
        raise bad() from None
    if dtype.hasobject or dtype.names is not None or dtype.kind not in "iuf" or dtype.subdtype:
        raise Problem(
            "invalid-input",
            f"the .npy array must be numeric (object arrays are refused), got dtype {dtype}",
        )
    if len(shape) > 8:
        raise bad("an array with too many dimensions")
    count = math.prod(shape)
    data = body[fp.tell() :]
    if len(data) != count * dtype.itemsize:
        raise bad("truncated or padded: the header's shape does not match the data")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def parse_v2_infer(obj: Any) -> tuple[np.ndarray, str | None, str]:
    """Open Inference Protocol v2 request -> (batch, request id, input name)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), list):
        raise Problem("invalid-input", 'a v2 request is an object with a list "inputs"')
    if len(obj["inputs"]) != 1:
        raise Problem("invalid-input", "this model takes exactly one input tensor")
    t = obj["inputs"][0]
    if not isinstance(t, dict):
        raise Problem("invalid-input", "inputs[0] must be an object")
    name, shape, dtype, data = t.get("name"), t.get("shape"), t.get("datatype"), t.get("data")
    if not isinstance(name, str) or len(name) > 100:
        raise Problem("invalid-input", "inputs[0].name must be a string")
    if dtype not in V2_DTYPES and dtype != "BYTES":
        raise Problem(
            "invalid-input", f"inputs[0].datatype must be one of {', '.join(V2_DTYPES)}, BYTES"
        )
    if (
        not isinstance(shape, list)
        or not shape
        or len(shape) > 8
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)
    ):
        raise Problem("invalid-input", "inputs[0].shape must be a list of non-negative integers")
    if dtype == "BYTES":  # text: a flat list of strings
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise Problem("invalid-input", "inputs[0].data must be strings for BYTES")
        arr = np.empty(len(data), dtype=object)
        arr[:] = data
    else:
        arr = as_float_array(data, "inputs[0].data").reshape(-1)
    if arr.size != math.prod(shape):
        raise Problem(
            "invalid-input",
            f"inputs[0].data holds {arr.size} numbers but shape {shape} needs {math.prod(shape)}",
        )
    if dtype.startswith(("INT", "UINT")) and not np.all(np.floor(arr) == arr):
        raise Problem("invalid-input", f"inputs[0].data must be integers for {dtype}")
    rid = obj.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > 200):
        raise Problem("invalid-input", "id must be a string of at most 200 characters")
    return arr.reshape(shape), rid, name
