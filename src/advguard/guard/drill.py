"""Pieces of a guard drill (``advguard gameday`` and the acceptance tests): a guard served by
uvicorn on an ephemeral 127.0.0.1 port, stateful detectors that log when each client was
first flagged, and the clients (benign replay, evasion attacker, extraction attacker) that
talk to the guard over HTTP with :class:`~advguard.models.http_model.HttpClassifier`.

Times come from an injectable ``clock`` (seconds, monotonic); nothing here prints.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advguard.guard.pipeline import StatefulVerdictLike
from advguard.models.http_model import EndpointError, HttpClassifier, QueryBudgetExceeded

Clock = Callable[[], float]
Progress = Callable[[str, int, int], None]


# -- detectors that remember when a client was first flagged ---------------------------------
@dataclass(frozen=True)
class FirstFlag:
    """When a detector first flagged a client: ``at`` (clock seconds), the 1-based query index
    of the detection, the client's queries seen by then, and the score against its threshold."""

    detector: str
    at: float
    query: int
    queries_seen: int
    score: float
    threshold: float


class DetectionLog:
    """Wraps a stateful detector (``observe(client_id, x) -> verdict``) and records each
    client's first flag with ``clock``; the verdict is passed through unchanged."""

    def __init__(self, name: str, detector: Any, clock: Clock) -> None:
        self.name = name
        self.detector = detector
        self.clock = clock
        self._first: dict[str, FirstFlag] = {}
        self._lock = threading.Lock()

    def observe(self, client_id: str, x: np.ndarray) -> StatefulVerdictLike:
        v = self.detector.observe(client_id, x)
        if v.flagged:
            with self._lock:
                if client_id not in self._first:
                    first = getattr(v, "first_detection", None)
                    self._first[client_id] = FirstFlag(
                        self.name,
                        self.clock(),
                        int(first) if first is not None else int(v.queries_seen),
                        int(v.queries_seen),
                        float(v.score),
                        float(v.threshold),
                    )
        return v  # type: ignore[no-any-return]

    def first(self, client_id: str) -> FirstFlag | None:
        with self._lock:
            return self._first.get(client_id)


def earliest(logs: list[DetectionLog], client_id: str) -> FirstFlag | None:
    """The first flag of ``client_id`` over ``logs`` (the lowest query index, then time)."""
    flags = [f for f in (log.first(client_id) for log in logs) if f is not None]
    return min(flags, key=lambda f: (f.query, f.at)) if flags else None


# -- a guard served on 127.0.0.1 in a thread -------------------------------------------------
class LocalGuardServer:
    """Serve an ASGI app with uvicorn in a daemon thread on an ephemeral 127.0.0.1 port (the
    socket is bound before the thread starts, so there is no port race)."""

    def __init__(self, app: Any, *, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            server_header=False,
            limit_concurrency=500,
        )
        self.server = uvicorn.Server(config)
        self.start_timeout_s = start_timeout_s
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalGuardServer:
        self._thread.start()
        waited = 0.0
        while not self.server.started:
            if waited > self.start_timeout_s or not self._thread.is_alive():
                self.close()
                raise RuntimeError("the local guard server did not start")
            time.sleep(0.01)
            waited += 0.01
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- clients -----------------------------------------------------------------------------------
def client(url: str, key: str, spec: Any, *, output: str = "probabilities") -> HttpClassifier:
    """An :class:`HttpClassifier` for one API key: no retries (a refusal is an answer here),
    no proxies, batches up to 256 rows per request."""
    return HttpClassifier(
        url,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        bounds=spec.bounds,
        output=output,  # type: ignore[arg-type]
        api_key=key,
        retries=0,
        batch_size=256,
        timeout=60.0,
        proxies={},
    )


def is_block(exc: EndpointError) -> bool:
    """Whether the guard refused the client as blocked (403 ``client-blocked``)."""
    return exc.status == 403 and "client-blocked" in str(exc)


@dataclass
class AttackerRun:
    """What one attacking client saw: queries answered before the guard stopped it, when it
    was refused (clock seconds), whether the block held on a further request."""

    name: str
    kind: str
    key_id: str
    started: float
    queries_answered: int = 0
    requests: int = 0
    blocked: bool = False
    blocked_at: float | None = None
    block_persists: bool | None = None
    stopped: str = "finished"
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def confirm_block(model: HttpClassifier, x: np.ndarray) -> bool:
    """Send one more request: True when it is refused as blocked too."""
    try:
        model.query_scores(x[:1])
    except EndpointError as e:
        return is_block(e)
    return False


def record_refusal(run: AttackerRun, model: HttpClassifier, exc: Exception, clock: Clock) -> None:
    """Fill ``run`` from the exception that stopped an attacker."""
    run.queries_answered = model.samples_answered
    run.requests = model.requests_sent
    if isinstance(exc, EndpointError) and is_block(exc):
        run.blocked, run.blocked_at, run.stopped = True, clock(), "blocked"
    elif isinstance(exc, QueryBudgetExceeded):
        run.stopped = "attacker budget spent"
    else:
        run.stopped = "error"
        run.error = f"{type(exc).__name__}: {str(exc)[:300]}"


@dataclass
class BenignRun:
    """One benign client's replay: rows and requests sent, refusals by HTTP status."""

    key_id: str
    rows: int = 0
    requests: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


def replay_benign(
    model: HttpClassifier,
    x: np.ndarray,
    run: BenignRun,
    rng: np.random.Generator,
    batch_sizes: tuple[int, int],
    on_rows: Callable[[int], None] | None = None,
) -> BenignRun:
    """Send ``x`` in a random order in requests of ``batch_sizes[0]..batch_sizes[1]`` rows
    (uniform), as an ordinary client would; a refused request is counted, not retried."""
    order = rng.permutation(len(x))
    i = 0
    while i < len(order):
        n = int(rng.integers(batch_sizes[0], batch_sizes[1] + 1))
        rows = x[order[i : i + n]]
        i += n
        run.requests += 1
        try:
            model.query_scores(rows)
        except EndpointError as e:
            run.errors += 1
            code = str(e.status) if e.status is not None else "network"
            run.statuses[code] = run.statuses.get(code, 0) + 1
        else:
            run.rows += len(rows)
        if on_rows is not None:
            on_rows(len(rows))
    return run
