"""Black-box adapter around a live HTTP prediction endpoint.

The endpoint receives batches of raw inputs as JSON and answers class probabilities or
logits (the contract is in ``docs/http-contract.md``)::

    POST <url>     {"inputs": [[...], ...]}
    200 OK         {"probabilities": [[...], ...]}     (or {"logits": [[...], ...]})

:class:`HttpTextClassifier` sends texts instead (``{"inputs": ["text", ...]}``) through the
same client, with the same limits, retries and budget.

Only the standard library is used (``urllib.request``). Every answered sample counts in
``queries.forward``; a hard ``query_budget`` stops a request *before* it is sent when it
would answer more samples than allowed. The API key is sent in a configurable header and
never appears in ``repr``, error messages or :meth:`HttpClassifier.describe`.

A response is untrusted input: its body is read in chunks and reading stops as soon as it
passes ``max_response_bytes`` (a declared ``Content-Length`` over the cap is refused before
reading); every request has a total ``deadline`` checked before each socket read, so a
server that drips one byte at a time cannot hold a run; the JSON nesting depth and the
number of values are checked against the expected batch before the body is parsed.
"""

from __future__ import annotations

import email.message
import email.utils
import functools
import http.client
import io
import json
import math
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import IO, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import torch

from advguard.errors import AdvguardError, InputError
from advguard.models.base import ClassifierBase

#: Added to probabilities before the log when ``output="probabilities"``.
PROBA_EPS = 1e-12
#: How far a row of probabilities may be from summing to 1.
PROBA_SUM_TOL = 1e-3
#: Characters of a response body quoted in error messages.
BODY_EXCERPT = 200
#: HTTP statuses retried (besides connection errors and time-outs).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDACTED = "***"
#: Default cap on the bytes of one response body (16 MiB).
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Default cap on the nesting depth of a response's JSON (``{"probabilities": [[...]]}`` is 3).
DEFAULT_MAX_JSON_DEPTH = 32
#: Bytes of an error (non-2xx) body read to quote in the error message; the rest is dropped.
ERROR_BODY_BYTES = 4096
#: Most bytes asked of the socket per read while reading a body.
READ_CHUNK = 64 * 1024
# A JSON string literal (no catastrophic backtracking: the unrolled-loop form).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


HttpOutput = Literal["probabilities", "logits", "labels"]
"""What an endpoint returns: class probabilities, raw logits, or only top-1 labels (a
label-only API; each label becomes a one-hot probability row)."""


def parse_output(value: object) -> HttpOutput:
    """``value`` as an :data:`HttpOutput` (the CLI passes a plain string)."""
    if value == "probabilities":
        return "probabilities"
    if value == "logits":
        return "logits"
    if value == "labels":
        return "labels"
    raise InputError(f"output must be 'probabilities', 'logits' or 'labels', got {value!r}")


class QueryBudgetExceeded(AdvguardError):
    """The next request would answer more samples than the endpoint's ``query_budget``.

    Raised *before* the request is sent, so the budget is never exceeded.
    """

    def __init__(self, budget: int, used: int, requested: int, message: str | None = None):
        self.budget = int(budget)
        self.used = int(used)
        self.requested = int(requested)
        super().__init__(
            message
            or f"query budget exhausted: {used} of {budget} samples already answered, the "
            f"next request needs {requested} more; raise the query budget to continue"
        )


class EndpointError(AdvguardError):
    """The endpoint could not be reached or answered with an error status (after retries)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class EndpointResponseError(EndpointError, ValueError):
    """The endpoint answered 2xx but the body breaks the JSON contract (or its limits)."""


class DeadlineExceeded(TimeoutError):
    """A request did not finish (connect, headers and body) within its total deadline."""


def json_structure(body: bytes) -> tuple[int, int]:
    """``(max nesting depth, number of values)`` of a JSON text, without parsing it.

    String literals are skipped, so brackets and commas inside strings do not count. The
    value count is ``commas + containers + 1`` (exact for arrays; an object's key/value pair
    counts once). Linear time, memory proportional to the number of brackets. Invalid JSON
    gives some numbers; the parser rejects it afterwards.
    """
    bare = _JSON_STRING.sub(b"0", body)
    brackets = bare.translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0, bare.count(b",") + 1
    opens = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((opens == ord("[")) | (opens == ord("{")), 1, -1).astype(np.int32)
    depth = int(np.cumsum(steps).max())
    return depth, bare.count(b",") + int((steps > 0).sum()) + 1


class _Deadline:
    """One request's time limit: ``limit`` seconds in total by ``clock``; each socket
    operation waits at most ``per_read`` seconds (and never past the limit)."""

    def __init__(self, clock: Callable[[], float], limit: float, per_read: float) -> None:
        self.clock = clock
        self.limit = limit
        self.per_read = per_read
        self.start = clock()

    def remaining(self) -> float:
        return self.limit - (self.clock() - self.start)

    def next_timeout(self) -> tuple[float, bool]:
        """Socket time-out for the next operation and whether the deadline set it."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"no complete response within {self.limit:g} s")
        return (left, True) if left < self.per_read else (self.per_read, False)

    def apply(self, sock: socket.socket) -> bool:
        timeout, clipped = self.next_timeout()
        sock.settimeout(timeout)
        return clipped

    def expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"no complete response within {self.limit:g} s")


class _GuardedReader(io.RawIOBase):
    """Raw reader over a socket that checks the request deadline before every read."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open until closed
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int | None:
        clipped = self._deadline.apply(self._sock)
        try:
            return self._raw.readinto(b)
        except TimeoutError:
            if clipped or self._deadline.remaining() <= 0:
                raise self._deadline.expired() from None
            raise

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _GuardedSocket:
    """A connected socket whose reads and sends obey a :class:`_Deadline`."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode != "rb":
            return self._sock.makefile(mode, *args, **kwargs)  # type: ignore[call-overload]
        return io.BufferedReader(_GuardedReader(self._sock, self._deadline))

    def sendall(self, data: Any, *args: Any) -> None:
        self._deadline.apply(self._sock)
        self._sock.sendall(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _GuardMixin(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._advguard_deadline = deadline

    def connect(self) -> None:
        super().connect()
        if self._advguard_deadline is not None:
            sock: Any = self.sock
            self.sock: Any = _GuardedSocket(sock, self._advguard_deadline)


class _GuardedHTTPConnection(_GuardMixin, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardMixin, http.client.HTTPSConnection):
    pass


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    """Opens connections whose socket reads obey the current request's deadline."""

    deadline: _Deadline | None = None

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        conn = functools.partial(_GuardedHTTPConnection, deadline=self.deadline)
        return self.do_open(conn, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    deadline: _Deadline | None = None

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context=context)
        self._advguard_context = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        conn = functools.partial(_GuardedHTTPSConnection, deadline=self.deadline)
        return self.do_open(conn, req, context=self._advguard_context)


def redact_url(url: str) -> str:
    """``url`` without user info, with query-string values and the fragment replaced.

    ``https://u:p@host/predict?key=abc`` -> ``https://host/predict?key=***``.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    query = urlencode([(k, REDACTED) for k, _ in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        secs = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ref = time.time() if now is None else now
        secs = when.timestamp() - ref
    if not math.isfinite(secs):
        return None
    return max(0.0, secs)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow redirects: they would resend the API key to another location."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: email.message.Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


class HttpClassifier(ClassifierBase):
    """Query a classifier served over HTTP(S) as a black box.

    Parameters
    ----------
    url:
        ``http://`` or ``https://`` endpoint that accepts ``POST`` with a JSON body.
    input_shape, num_classes, bounds:
        What the endpoint takes and returns: one raw input's shape (no batch dimension),
        the number of classes, the valid input range. Inputs are sent in that raw space.
    output:
        ``"probabilities"`` (rows must be finite, >= 0 and sum to 1; turned into
        ``log(p + 1e-12)``), ``"logits"`` (any finite scores) or ``"labels"`` (a label-only
        API: one integer class per input, turned into one-hot probabilities).
    input_field, output_field:
        JSON keys of the request inputs and the response scores. ``output_field``
        defaults to the value of ``output`` (``"probabilities"``, ``"logits"`` or
        ``"labels"``, the field the advguard guard answers).
    flatten:
        Send each input as a flat list of ``prod(input_shape)`` numbers instead of
        nested lists of shape ``input_shape``.
    api_key, api_key_header, api_key_prefix:
        Credential sent with every request as ``<api_key_header>: <prefix><api_key>``.
        The prefix defaults to ``"Bearer "`` for ``Authorization`` and to nothing for
        other headers (e.g. ``X-API-Key``). The key is never logged nor reported.
    headers:
        Extra (non-secret) request headers.
    extra_fields:
        Extra constant top-level fields of the request body (e.g. a model name).
    timeout:
        Seconds any single socket operation (connect, one read) may wait.
    deadline:
        Seconds one request may take in total (connect, headers and body), checked
        before every socket read with ``clock``; None (default): ``timeout``. An overrun
        is a time-out (retried like one).
    max_response_bytes:
        Most bytes of one response body (default 16 MiB). Reading stops as soon as the
        cap is passed and :class:`EndpointResponseError` is raised; a larger declared
        ``Content-Length`` is refused before reading.
    max_json_depth:
        Most nesting levels of the response JSON (default 32).
    max_json_values:
        Most JSON values (numbers, strings, containers) in one response; None (default)
        scales with the batch: ``4 * n * (num_classes + 1) + 1024`` for ``n`` inputs. Raise
        it for an endpoint that returns large extra fields (e.g. embeddings).
    retries:
        Further attempts after a connection error, a time-out, a 5xx or a 429
        (so at most ``1 + retries`` requests per batch).
    backoff, max_backoff:
        Exponential backoff: before retry ``k`` (from 0) wait
        ``d = min(max_backoff, backoff * 2**k)`` with jitter, uniformly in ``[d/2, d]``.
    max_retry_after:
        Cap (seconds) on a 429's ``Retry-After`` (seconds or HTTP date); without that
        header a 429 backs off like a 5xx.
    batch_size:
        Most samples per request.
    query_budget:
        Most samples this adapter may have answered in total (None: unlimited). A
        :meth:`logits` call that would go over it raises :class:`QueryBudgetExceeded`
        before sending anything.
    seed:
        Seed of the backoff jitter (deterministic waits); None draws from the OS.
    ssl_context:
        For ``https``: a custom :class:`ssl.SSLContext` (e.g. a private CA). Certificates
        are verified by default.
    proxies:
        ``None`` uses the ``http(s)_proxy`` environment variables like ``urllib``;
        ``{}`` disables proxies; or a ``{"http": ..., "https": ...}`` mapping.
    clock, sleep:
        Monotonic clock (seconds) for the deadline and the function that waits between
        retries; injectable for tests (defaults :func:`time.monotonic`, :func:`time.sleep`).

    ``queries.forward`` counts samples actually answered; :attr:`requests_sent`,
    :attr:`retries_done`, :attr:`seconds_waited` and :attr:`samples_answered` (never reset)
    describe the traffic (see :meth:`usage`).
    """

    def __init__(
        self,
        url: str,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        bounds: tuple[float, float] = (0.0, 1.0),
        output: HttpOutput = "probabilities",
        input_field: str = "inputs",
        output_field: str | None = None,
        flatten: bool = False,
        api_key: str | None = None,
        api_key_header: str = "Authorization",
        api_key_prefix: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra_fields: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
        deadline: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
        max_json_values: int | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 60.0,
        batch_size: int = 64,
        query_budget: int | None = None,
        seed: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=tuple(input_shape), bounds=bounds)
        self.url = self._check_url(url)
        self.endpoint = redact_url(self.url)
        self.output: HttpOutput = parse_output(output)
        self._set_fields(input_field, output_field, output, flatten, extra_fields)
        self._set_limits(
            timeout, deadline, backoff, max_backoff, max_retry_after, max_response_bytes,
            max_json_depth, max_json_values, retries, batch_size, query_budget,
        )  # fmt: skip
        self._set_credentials(headers, api_key, api_key_header, api_key_prefix)
        self._http_handler = _GuardedHTTPHandler()
        self._https_handler = _GuardedHTTPSHandler(context=ssl_context)
        handlers: list[Any] = [_NoRedirect(), self._http_handler, self._https_handler]
        if proxies is not None:
            handlers.append(urllib.request.ProxyHandler(dict(proxies)))
        self._opener = urllib.request.build_opener(*handlers)
        self._rng = random.Random(seed)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()

        self.samples_answered = 0
        self.requests_sent = 0
        self.retries_done = 0
        self.seconds_waited = 0.0

    # -- construction helpers ---------------------------------------------
    def _set_fields(
        self,
        input_field: str,
        output_field: str | None,
        output: str,
        flatten: bool,
        extra_fields: Mapping[str, Any] | None,
    ) -> None:
        """The JSON fields of the request and the response."""
        for field_name, fval in (("input_field", input_field), ("output_field", output_field)):
            if fval is not None and (not isinstance(fval, str) or not fval):
                raise InputError(f"{field_name} must be a non-empty string, got {fval!r}")
        self.input_field = input_field
        self.output_field = output_field if output_field is not None else output
        self.flatten = bool(flatten)
        self.extra_fields = dict(extra_fields or {})
        if self.input_field in self.extra_fields:
            raise InputError(f"extra_fields must not contain the input field {input_field!r}")

    def _set_limits(
        self,
        timeout: float,
        deadline: float | None,
        backoff: float,
        max_backoff: float,
        max_retry_after: float,
        max_response_bytes: int,
        max_json_depth: int,
        max_json_values: int | None,
        retries: int,
        batch_size: int,
        query_budget: int | None,
    ) -> None:
        """Time limits, response size limits, retries, batch size and query budget."""
        deadline = timeout if deadline is None else deadline
        for name, val, lo in (
            ("timeout", timeout, 0.0),
            ("deadline", deadline, 0.0),
            ("backoff", backoff, -1.0),
            ("max_backoff", max_backoff, -1.0),
            ("max_retry_after", max_retry_after, -1.0),
        ):
            if not isinstance(val, int | float) or not math.isfinite(val) or val <= lo:
                rule = "> 0" if lo == 0.0 else ">= 0"
                raise InputError(f"{name} must be a finite number {rule}, got {val!r}")
        self.timeout = float(timeout)
        self.deadline = float(deadline)
        for name, ival in (
            ("max_response_bytes", max_response_bytes),
            ("max_json_depth", max_json_depth),
        ):
            if not isinstance(ival, int | np.integer) or isinstance(ival, bool) or ival < 1:
                raise InputError(f"{name} must be an integer >= 1, got {ival!r}")
        self.max_response_bytes = int(max_response_bytes)
        self.max_json_depth = int(max_json_depth)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self._set_counts(max_json_values, retries, batch_size, query_budget)

    def _set_counts(
        self, max_json_values: int | None, retries: int, batch_size: int, query_budget: int | None
    ) -> None:
        if max_json_values is not None and (
            not isinstance(max_json_values, int | np.integer)
            or isinstance(max_json_values, bool)
            or max_json_values < 1
        ):
            raise InputError(
                f"max_json_values must be an integer >= 1 or None, got {max_json_values!r}"
            )
        self.max_json_values = None if max_json_values is None else int(max_json_values)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise InputError(f"retries must be an integer >= 0, got {retries!r}")
        self.retries = retries
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        if query_budget is not None and (
            not isinstance(query_budget, int | np.integer)
            or isinstance(query_budget, bool)
            or query_budget < 0
        ):
            raise InputError(f"query_budget must be an integer >= 0 or None, got {query_budget!r}")
        self.query_budget = None if query_budget is None else int(query_budget)

    def _set_credentials(
        self,
        headers: Mapping[str, str] | None,
        api_key: str | None,
        api_key_header: str,
        api_key_prefix: str | None,
    ) -> None:
        """Request headers, with the API key under ``api_key_header``."""
        # The credential lives only in this private header dict; never in repr/describe.
        self._headers: dict[str, str] = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "advguard-http-client",
        }
        for k, v in (headers or {}).items():
            self._headers[str(k)] = str(v)
        self.api_key_header: str | None = None
        self._secret: str | None = None
        if api_key is not None:
            if not isinstance(api_key, str) or not api_key.strip():
                raise InputError("api_key must be a non-empty string (or None)")
            if not api_key_header or any(c in api_key_header for c in ":\r\n "):
                raise InputError(f"api_key_header must be a header name, got {api_key_header!r}")
            if any(c in api_key for c in "\r\n"):
                raise InputError("api_key must not contain line breaks")
            if api_key_prefix is None:
                api_key_prefix = "Bearer " if api_key_header.lower() == "authorization" else ""
            self.api_key_header = api_key_header
            self._secret = api_key
            self._headers[api_key_header] = f"{api_key_prefix}{api_key}"

    @staticmethod
    def _check_url(url: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise InputError(f"url must be a non-empty string, got {url!r}")
        url = url.strip()
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise InputError(
                f"only http:// and https:// endpoints are supported, got {redact_url(url)!r}"
            )
        if not parts.hostname:
            raise InputError(f"url has no host: {redact_url(url)!r}")
        if parts.username is not None or parts.password is not None:
            raise InputError(
                "do not put credentials in the URL; pass the key as api_key "
                "(sent in a header, never reported)"
            )
        try:
            _ = parts.port
        except ValueError:
            raise InputError(f"url has an invalid port: {redact_url(url)!r}") from None
        return url

    # -- budget ---------------------------------------------------------------
    @property
    def remaining_budget(self) -> int | None:
        """Samples that may still be answered (None: unlimited)."""
        if self.query_budget is None:
            return None
        return max(0, self.query_budget - self.samples_answered)

    def _reserve(self, n: int) -> None:
        if self.query_budget is not None and self.samples_answered + n > self.query_budget:
            raise QueryBudgetExceeded(self.query_budget, self.samples_answered, n)

    # -- queries ----------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for a batch (float32, on ``x``'s device); probabilities become logs.

        Raises :class:`QueryBudgetExceeded` (nothing sent) when ``len(x)`` samples would
        exceed the budget, :class:`EndpointError` / :class:`EndpointResponseError` when
        the endpoint fails or breaks the contract.
        """
        if len(x) == 0:
            return torch.zeros((0, self.num_classes), dtype=torch.float32, device=x.device)
        out = self.query_scores(x.detach().to("cpu", torch.float32).numpy())
        if self.output in ("probabilities", "labels"):
            out = np.log(out + PROBA_EPS)
        return torch.from_numpy(out.astype(np.float32)).to(x.device)

    def query_scores(self, inputs: np.ndarray | Sequence[str]) -> np.ndarray:
        """The endpoint's checked scores for ``inputs`` as answered (``(n, num_classes)``
        float64 probabilities or logits, per ``output``), in requests of ``batch_size``.

        ``inputs`` is an array of raw inputs or a list of strings (sent as JSON strings).
        Counts every answered sample; the whole call must fit in the query budget, else
        :class:`QueryBudgetExceeded` is raised before anything is sent.
        """
        n = len(inputs)
        if n == 0:
            return np.zeros((0, self.num_classes), dtype=np.float64)
        with self._lock:
            self._reserve(n)  # the whole call must fit: no half-answered batches
            outs = []
            for i in range(0, n, self.batch_size):
                chunk = inputs[i : i + self.batch_size]
                scores = self._query(chunk)
                self.samples_answered += len(chunk)
                self.queries.forward += len(chunk)
                outs.append(scores)
        return np.concatenate(outs)

    def _payload(self, chunk: np.ndarray | Sequence[str]) -> bytes:
        body = dict(self.extra_fields)
        if isinstance(chunk, np.ndarray):
            body[self.input_field] = (
                chunk.reshape(len(chunk), -1) if self.flatten else chunk
            ).tolist()
        else:
            body[self.input_field] = list(chunk)
        return json.dumps(body, allow_nan=False).encode("utf-8")

    def _query(self, chunk: np.ndarray | Sequence[str]) -> np.ndarray:
        data = self._payload(chunk)
        status, body = self._post(data)
        return self._parse(status, body, len(chunk))

    def _contract(self) -> str:
        return (
            f"input field {self.input_field!r}, flatten={self.flatten}, "
            f"input shape {self.input_shape}"
        )

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, REDACTED)
        return text

    def _excerpt(self, body: bytes) -> str:
        text = body[:BODY_EXCERPT].decode("utf-8", errors="replace")
        text = self._redact(text).replace("\n", " ").strip()
        return repr(text) + ("..." if len(body) > BODY_EXCERPT else "")

    def _backoff_delay(self, attempt: int) -> float:
        d = min(self.max_backoff, self.backoff * (2.0**attempt))
        return d / 2.0 + self._rng.uniform(0.0, d / 2.0)

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._sleep(seconds)
            self.seconds_waited += seconds

    def _post(self, data: bytes) -> tuple[int, bytes]:
        """POST with retries; returns (2xx status, body) or raises EndpointError."""
        attempts = 1 + self.retries
        last = ""
        last_status: int | None = None
        for attempt in range(attempts):
            req = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
            retry_after: float | None = None
            self.requests_sent += 1
            deadline = _Deadline(self._clock, self.deadline, self.timeout)
            self._http_handler.deadline = self._https_handler.deadline = deadline
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return int(resp.status), self._read_body(resp)
            except urllib.error.HTTPError as exc:
                last_status, last, retry_after = self._retryable_http_error(exc)
            except DeadlineExceeded as exc:
                last_status = None
                last = f"{exc} (deadline per request)"
            except TimeoutError as exc:
                last_status = None
                last = f"no response within {self.timeout:g} s ({exc or 'timed out'})"
            except urllib.error.URLError as exc:
                last_status = None
                last = self._retryable_url_error(exc)
            except (http.client.HTTPException, ConnectionError, OSError) as exc:
                last_status = None
                last = self._redact(f"{type(exc).__name__}: {exc}")
            finally:
                self._http_handler.deadline = self._https_handler.deadline = None
            if attempt + 1 < attempts:
                self.retries_done += 1
                self._wait(retry_after if retry_after is not None else self._backoff_delay(attempt))
        raise self._gave_up(attempts, last, last_status)

    def _retryable_http_error(self, exc: urllib.error.HTTPError) -> tuple[int, str, float | None]:
        """Status, description and Retry-After (429) of a retryable HTTP error; raise
        :class:`EndpointError` for redirects and statuses that retrying cannot fix."""
        status = int(exc.code)
        try:
            body = exc.read(ERROR_BODY_BYTES)
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        if 300 <= status < 400:
            where = exc.headers.get("Location", "") if exc.headers else ""
            raise EndpointError(
                f"{self.endpoint} answered HTTP {status} (redirect to "
                f"{redact_url(where) if where else 'an unknown location'}); redirects "
                "are not followed so the API key stays with the configured endpoint. "
                "Pass the final URL.",
                status=status,
            ) from None
        if status not in RETRY_STATUSES:
            hint = ""
            if status in (401, 403):
                hint = (
                    " Check the API key and the header it is sent in "
                    f"({self.api_key_header or 'no key was given'})."
                )
            elif status in (400, 415, 422):
                hint = f" Check the request contract: {self._contract()}."
            raise EndpointError(
                f"{self.endpoint} answered HTTP {status} {exc.reason}: "
                f"{self._excerpt(body)}.{hint}",
                status=status,
            ) from None
        retry_after: float | None = None
        if status == 429:
            header = exc.headers.get("Retry-After") if exc.headers else None
            ra = parse_retry_after(header)
            if ra is not None:
                retry_after = min(ra, self.max_retry_after)
        return status, f"HTTP {status} {exc.reason}: {self._excerpt(body)}", retry_after

    def _retryable_url_error(self, exc: urllib.error.URLError) -> str:
        """Description of a connection failure; raise :class:`EndpointError` for TLS errors."""
        reason = exc.reason
        if isinstance(reason, DeadlineExceeded):
            return f"{reason} (deadline per request)"
        if isinstance(reason, TimeoutError):
            return f"no response within {self.timeout:g} s ({reason or 'timed out'})"
        if isinstance(reason, ssl.SSLError):
            raise EndpointError(
                f"TLS error talking to {self.endpoint}: {self._redact(str(reason))}"
            ) from None
        return self._redact(str(reason))

    def _gave_up(self, attempts: int, last: str, last_status: int | None) -> EndpointError:
        """The error after the last attempt failed."""
        if last_status is not None:
            return EndpointError(
                f"{self.endpoint} still failing after {attempts} attempt(s): {last}",
                status=last_status,
            )
        if "deadline per request" in last:
            return EndpointError(
                f"{self.endpoint} did not answer in time after {attempts} attempt(s): {last}. "
                "The service is too slow or stalls mid-answer; raise the timeout if it is "
                "just slow."
            )
        return EndpointError(
            f"could not reach {self.endpoint} after {attempts} attempt(s): {last}. "
            "Check that the service is up and the URL, port and network are right."
        )

    def _read_body(self, resp: Any) -> bytes:
        """The 2xx body, read in chunks; never more than ``max_response_bytes + 1`` bytes."""
        cap = self.max_response_bytes
        declared = (resp.headers.get("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise EndpointResponseError(
                f"{self.endpoint} announced a {int(declared)}-byte response, over the "
                f"{cap}-byte limit (max_response_bytes); not read"
            )
        buf = bytearray()
        while True:
            chunk = resp.read(min(READ_CHUNK, cap + 1 - len(buf)))
            if not chunk:
                if declared.isdigit() and len(buf) < int(declared):  # cut short: retried
                    raise http.client.IncompleteRead(bytes(buf[:BODY_EXCERPT]), int(declared))
                return bytes(buf)
            buf += chunk
            if len(buf) > cap:
                raise EndpointResponseError(
                    f"{self.endpoint} answered more than {cap} bytes (max_response_bytes); "
                    "stopped reading"
                )

    def _parse(self, status: int, body: bytes, n: int) -> np.ndarray:
        where = f"{self.endpoint} (HTTP {status})"
        depth, values = json_structure(body)
        if depth > self.max_json_depth:
            raise EndpointResponseError(
                f"{where}: JSON nested {depth} levels deep, over the limit of "
                f"{self.max_json_depth} (max_json_depth); not parsed"
            )
        max_values = self.max_json_values or 4 * n * (self.num_classes + 1) + 1024
        if values > max_values:
            raise EndpointResponseError(
                f"{where}: JSON holds about {values} values, over the {max_values} allowed "
                f"for {n} input(s) of {self.num_classes} classes (max_json_values); not parsed"
            )
        try:
            payload = json.loads(body)
        except RecursionError:
            raise EndpointResponseError(f"{where}: JSON nested too deeply; not parsed") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EndpointResponseError(
                f"{where} did not answer valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                f"body starts with {self._excerpt(body)}"
            ) from None
        if not isinstance(payload, dict):
            raise EndpointResponseError(
                f"{where} answered a JSON {type(payload).__name__}, expected an object with "
                f"the field {self.output_field!r}"
            )
        if self.output_field not in payload:
            keys = ", ".join(repr(k) for k in list(payload)[:10]) or "none"
            raise EndpointResponseError(
                f"{where} answered no field {self.output_field!r} (fields: {keys}); set "
                "output_field to the key that holds the scores"
            )
        raw = payload[self.output_field]
        if self.output == "labels":
            return self._one_hot(raw, where, n)
        return self._scores(raw, where, n)

    def _scores(self, raw: object, where: str, n: int) -> np.ndarray:
        """The answer's ``(n, num_classes)`` scores, checked (finite; probabilities >= 0 and
        summing to 1 when ``output='probabilities'``)."""
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise EndpointResponseError(
                f"{where}: field {self.output_field!r} is not a rectangular list of numbers"
            ) from None
        if arr.ndim != 2 or arr.shape[0] != n:
            got = f"{arr.shape[0]} row(s)" if arr.ndim >= 1 else "a single number"
            if arr.ndim == 1 and len(arr) == n:
                got = f"{n} single numbers (labels?) instead of rows of scores"
            raise EndpointResponseError(
                f"{where}: field {self.output_field!r} has {got} with shape "
                f"{arr.shape} for {n} input(s); expected shape ({n}, {self.num_classes})"
            )
        if arr.shape[1] != self.num_classes:
            raise EndpointResponseError(
                f"{where}: {arr.shape[1]} scores per input but num_classes is "
                f"{self.num_classes}; declare the right num_classes or check the endpoint"
            )
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.nonzero(bad.any(1))[0][0])
            raise EndpointResponseError(
                f"{where}: {int(bad.any(1).sum())} row(s) of {self.output_field!r} contain "
                f"NaN/Inf/null (first row {row})"
            )
        if self.output == "probabilities":
            if (arr < 0).any():
                row = int(np.nonzero((arr < 0).any(1))[0][0])
                raise EndpointResponseError(
                    f"{where}: negative probabilities in {int((arr < 0).any(1).sum())} row(s) "
                    f"(first row {row}, min {arr.min():.4g}); if the endpoint returns scores, "
                    "use output='logits'"
                )
            sums = arr.sum(1)
            off = np.abs(sums - 1.0) > PROBA_SUM_TOL
            if off.any():
                row = int(np.nonzero(off)[0][0])
                raise EndpointResponseError(
                    f"{where}: probabilities must sum to 1 per row; {int(off.sum())} row(s) do "
                    f"not (row {row} sums to {sums[row]:.6g}); if the endpoint returns scores, "
                    "use output='logits'"
                )
        return arr

    def _one_hot(self, raw: object, where: str, n: int) -> np.ndarray:
        """A label-only answer (``n`` integers in ``[0, num_classes)``) as one-hot rows."""
        ok = (
            isinstance(raw, list)
            and len(raw) == n
            and all(type(v) is int and 0 <= v < self.num_classes for v in raw)
        )
        if not ok:
            raise EndpointResponseError(
                f"{where}: field {self.output_field!r} must hold {n} integer label(s) in "
                f"[0, {self.num_classes}) for {n} input(s)"
            )
        return np.eye(self.num_classes, dtype=np.float64)[np.asarray(raw, dtype=np.int64)]

    # -- description ----------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        """Traffic so far: samples answered, requests, retries, seconds waited, budget."""
        return {
            "samples_answered": self.samples_answered,
            "requests_sent": self.requests_sent,
            "retries": self.retries_done,
            "seconds_waited": round(self.seconds_waited, 3),
            "query_budget": self.query_budget,
            "budget_left": self.remaining_budget,
        }

    def describe(self) -> dict[str, Any]:
        """Report-safe description: the URL without credentials or query values, no key."""
        return {
            "endpoint": self.endpoint,
            "output": self.output,
            "input_field": self.input_field,
            "output_field": self.output_field,
            "flatten": self.flatten,
            "authenticated": self._secret is not None,
            "api_key_header": self.api_key_header,
            "batch_size": self.batch_size,
            "timeout": self.timeout,
            "deadline": self.deadline,
            "max_response_bytes": self.max_response_bytes,
            "retries": self.retries,
            "query_budget": self.query_budget,
        }

    def __repr__(self) -> str:
        return (
            f"HttpClassifier({self.endpoint!r}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, bounds={self.bounds}, output={self.output!r})"
        )


class _TextTransport(HttpClassifier):
    """The HTTP client of :class:`HttpTextClassifier`: sends lists of strings."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise InputError(
            f"{self.endpoint} is a text endpoint: query it with predict_proba(list of strings)"
        )

    def _contract(self) -> str:
        return f"input field {self.input_field!r} holding a list of strings"

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        del info["flatten"]
        return {**info, "modality": "text"}


class HttpTextClassifier:
    """Query a text classifier served over HTTP(S) as a black box.

    ``POST <url> {"inputs": ["text", ...]}`` answered by ``{"probabilities": [[...], ...]}``
    (or logits); see ``docs/http-contract.md``. It presents what text attacks and the text
    evaluation use (:class:`advguard.attacks.text.TextModel`): ``predict_proba(list[str])``
    returning probabilities (logits pass through a softmax), ``predict``, ``num_classes``,
    ``class_names`` and the ``queries`` counter.

    The requests go through :class:`HttpClassifier` (:attr:`client`), so the response
    cap, the deadline, the JSON depth and size limits, retries, backoff, the query budget
    (in texts answered) and the injectable clock are the same; every keyword argument of
    :class:`HttpClassifier` except ``input_shape``, ``bounds`` and ``flatten`` (numeric
    inputs only) is accepted in ``options``.
    """

    def __init__(
        self,
        url: str,
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        numeric = sorted({"input_shape", "bounds", "flatten"} & set(options))
        if numeric:
            raise InputError(
                f"{', '.join(numeric)} describe numeric inputs; a text endpoint takes strings"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
            raise InputError(f"num_classes must be an integer, got {num_classes!r}")
        self.client = _TextTransport(url, input_shape=(1,), num_classes=int(num_classes), **options)
        self.num_classes = self.client.num_classes
        names = None if class_names is None else [str(c) for c in class_names]
        if names is not None and len(names) != self.num_classes:
            raise InputError(f"class_names has {len(names)} entries for {self.num_classes} classes")
        self.class_names: list[str] | None = names
        self.queries = self.client.queries
        self.endpoint = self.client.endpoint

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities ``(len(texts), num_classes)``; counts ``len(texts)`` queries."""
        if isinstance(texts, str | bytes) or not isinstance(texts, Sequence | np.ndarray):
            raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
        items = list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise InputError(f"texts[{i}] is a {type(t).__name__}; every item must be a str")
        scores = self.client.query_scores(items)
        if self.client.output == "logits":
            z = np.exp(scores - scores.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        return scores

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted class indices (column of the highest probability)."""
        return self.predict_proba(texts).argmax(axis=1)

    @property
    def remaining_budget(self) -> int | None:
        """Texts that may still be answered (None: unlimited)."""
        return self.client.remaining_budget

    def usage(self) -> dict[str, Any]:
        """Traffic so far; see :meth:`HttpClassifier.usage`."""
        return self.client.usage()

    def describe(self) -> dict[str, Any]:
        """Report-safe description (no credentials, no key); see :meth:`HttpClassifier.describe`."""
        return self.client.describe()

    def __repr__(self) -> str:
        return (
            f"HttpTextClassifier({self.endpoint!r}, num_classes={self.num_classes}, "
            f"output={self.client.output!r})"
        )
