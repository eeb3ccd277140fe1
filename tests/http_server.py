"""A small threaded HTTP model server for tests, with switchable failure modes.

    with ModelServer(lr.predict_proba, api_key="s3cret") as srv:
        srv.fail_429 = 2            # the next 2 requests get 429 + Retry-After
        HttpClassifier(srv.url, ...)

Bound to 127.0.0.1 on a free port; stdlib only (``http.server``). Every request is counted
(``requests``), answered samples too (``samples``); ``headers_seen`` keeps each request's
headers with lower-case names. The contract is docs/http-contract.md.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


class ModelServer:
    """Serve ``predict(x_flat) -> (n, K) probabilities or scores`` over HTTP POST.

    Failure knobs (plain attributes, change them any time):

    - ``api_key`` / ``api_key_header`` / ``api_key_prefix``: 401 unless the header matches.
    - ``fail_429``: answer the next k requests with 429 and ``Retry-After: retry_after``.
    - ``fail_500``: answer the next k requests with 500.
    - ``malformed``: answer 200 with a body that is not JSON.
    - ``wrong_classes``: drop the last score column.
    - ``wrong_rows``: drop the last row.
    - ``nan`` / ``negative``: put a NaN / a negative value in the first row.
    - ``missing_field``: answer ``{"result": ...}`` instead of the output field.
    - ``delay``: sleep this many seconds before answering.
    - ``echo_key_in_errors``: 401 bodies quote the key header received (to test redaction).
    - ``stream_bytes``: answer 200 with a body of this many bytes streamed in 64 KiB writes,
      without ``Content-Length`` (the body ends when the connection closes).
    - ``declare_length``: with ``stream_bytes``, announce it as ``Content-Length``.
    - ``drip``: seconds between single bytes; ``drip_where`` is ``"body"`` (headers at
      once, then a ``drip_bytes``-byte body one byte at a time) or ``"headers"`` (the
      status line and headers one byte at a time).
    - ``nested``: answer ``{"probabilities": [[[...]]]}`` nested this many levels.
    - ``extra_values``: add a field holding this many zeros to a normal answer.
    - ``short_body``: the next k answers announce their length but send only half the body.

    ``text=True`` serves a text model: the input field must hold a list of strings and
    ``predict`` gets that list.

    ``bytes_sent`` counts body bytes the server managed to write (streamed and dripped).
    """

    def __init__(
        self,
        predict: Callable[[Any], np.ndarray],
        *,
        api_key: str | None = None,
        api_key_header: str = "Authorization",
        api_key_prefix: str = "Bearer ",
        input_field: str = "inputs",
        output_field: str = "probabilities",
        text: bool = False,
    ) -> None:
        self.predict = predict
        self.text = text
        self.api_key = api_key
        self.api_key_header = api_key_header
        self.api_key_prefix = api_key_prefix
        self.input_field = input_field
        self.output_field = output_field
        self.fail_429 = 0
        self.retry_after: str | None = "0.2"
        self.fail_500 = 0
        self.malformed = False
        self.wrong_classes = False
        self.wrong_rows = False
        self.nan = False
        self.negative = False
        self.missing_field = False
        self.delay = 0.0
        self.echo_key_in_errors = False
        self.stream_bytes = 0
        self.declare_length = False
        self.drip = 0.0
        self.drip_where = "body"
        self.drip_bytes = 2000
        self.nested = 0
        self.extra_values = 0
        self.short_body = 0
        self.bytes_sent = 0
        self.closing = threading.Event()
        self.requests = 0
        self.samples = 0
        self.request_times: list[float] = []
        self.headers_seen: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    def start(self) -> ModelServer:
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- request handling ---------------------------------------------------------
    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests += 1
            self.request_times.append(time.monotonic())
            self.headers_seen.append({k.lower(): v for k, v in headers.items()})
            if self.fail_429 > 0:
                self.fail_429 -= 1
                extra = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
                return 429, extra, b'{"error": "rate limited"}'
            if self.fail_500 > 0:
                self.fail_500 -= 1
                return 500, {}, b'{"error": "internal error"}'
        if self.delay:
            time.sleep(self.delay)
        if self.api_key is not None:
            got = {k.lower(): v for k, v in headers.items()}.get(self.api_key_header.lower())
            if got != f"{self.api_key_prefix}{self.api_key}":
                msg = "missing or wrong API key"
                if self.echo_key_in_errors:
                    msg += f" (got {self.api_key_header}: {got})"
                return 401, {}, json.dumps({"error": msg}).encode()
        try:
            req = json.loads(body)
            raw = req[self.input_field]
            if self.text:
                if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
                    raise TypeError("inputs must be a list of strings")
                x: Any = raw
            else:
                x = np.asarray(raw, dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            return 400, {}, json.dumps({"error": f"bad request: {e}"}).encode()
        if self.malformed:
            return 200, {}, b"<html>oops, not json"
        if self.nested:
            d = self.nested
            return 200, {}, b'{"probabilities": ' + b"[" * d + b"]" * d + b"}"
        out = np.asarray(self.predict(x if self.text else x.reshape(len(x), -1)), dtype=np.float64)
        with self._lock:
            self.samples += len(x)
        if self.wrong_classes:
            out = out[:, :-1]
        if self.wrong_rows:
            out = out[:-1]
        if self.nan:
            out[0, 0] = np.nan
        if self.negative:
            out[0, 0] = -0.5
        field = "result" if self.missing_field else self.output_field
        answer: dict[str, Any] = {field: out.tolist()}
        if self.extra_values:
            answer["debug"] = [0] * self.extra_values
        return 200, {}, json.dumps(answer).encode()

    def add_sent(self, n: int, *, request: bool = False) -> None:
        with self._lock:
            self.bytes_sent += n
            self.requests += int(request)


def _make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            try:
                if server.stream_bytes or server.drip:
                    server.add_sent(0, request=True)
                if server.stream_bytes:
                    return self.stream()
                if server.drip:
                    return self.drip()
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                return
            status, headers, out = server.handle(dict(self.headers.items()), body)
            length = len(out)
            with server._lock:
                if server.short_body > 0:
                    server.short_body -= 1
                    out = out[: len(out) // 2]
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)
            except (BrokenPipeError, ConnectionResetError):  # client gave up (time-out)
                pass

        def stream(self) -> None:
            total = server.stream_bytes
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if server.declare_length:
                self.send_header("Content-Length", str(total))
            self.end_headers()
            head = b'{"probabilities": ['
            self.wfile.write(head)
            server.add_sent(len(head))
            block = b"0.0," * (64 * 1024 // 4)
            sent = len(head)
            while sent < total and not server.closing.is_set():
                part = block[: total - sent]
                self.wfile.write(part)
                sent += len(part)
                server.add_sent(len(part))

        def drip(self) -> None:
            body = b"0" * server.drip_bytes
            if server.drip_where == "headers":
                head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
                for i in range(len(head)):
                    if server.closing.is_set():
                        return
                    self.wfile.write(head[i : i + 1])
                    time.sleep(server.drip)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                if server.closing.is_set():
                    return
                self.wfile.write(body[i : i + 1])
                server.add_sent(1)
                time.sleep(server.drip)

        def log_message(self, format: str, *args: Any) -> None:  # silence stderr
            pass

    return Handler
