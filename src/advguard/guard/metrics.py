"""Prometheus metrics of one guard (its own registry, so several guards can live in a process).

Labels are model names, versions, endpoints, status codes, actions, detector and stage names:
never keys or payloads. The one per-client series, ``advguard_guard_client_queries_total``,
is labelled with the first 12 hex digits of SHA-256(key id) for the top-N clients only (a
space-saving sketch, :class:`TopClients`); every other client counts under ``other``, so the
label has at most N + 1 values however many clients call. The metric names are a contract
shared with dashboards, SLO rules and alerts (docs/operations.md lists them).

With ``advguard guard serve --workers N`` each worker process writes its metrics to
prometheus_client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, set by
:func:`advguard.guard.server.serve` before the workers start) and ``/metrics`` answers the
merge of every worker's files: counters and histograms are summed, each gauge is merged by its
mode in :data:`GAUGE_MODES`. Gauges read at scrape time in one process (drift, open
incidents) are written to the files instead: by the worker answering the scrape and, for
drift, every :data:`REFRESH_S` seconds by each worker.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("advguard.guard")

__all__ = [
    "CONTENT_TYPE_LATEST",
    "GAUGE_MODES",
    "MULTIPROC_ENV",
    "STAGES",
    "GuardMetrics",
    "TopClients",
    "client_label",
    "multiprocess_dir",
    "reap_dead_workers",
]

#: The environment variable of prometheus_client's multiprocess mode (its directory).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How each gauge is merged over the worker processes in multiprocess mode (prometheus_client's
#: ``multiprocess_mode``; ``live*``: the files of a worker that exited are left out). The drift
#: PSIs take the largest of the workers' windows (each worker sees its share of the traffic; an
#: alert on a threshold fires when any window drifts); the confidence z-score, whose sign
#: matters, is the most recently refreshed worker's; open incidents are counted in the shared
#: database, so the value of the worker that answered the scrape (it refreshes it first).
GAUGE_MODES = {
    "advguard_guard_drift_input_psi": "livemax",
    "advguard_guard_drift_prediction_psi": "livemax",
    "advguard_guard_drift_confidence_zscore": "livemostrecent",
    "advguard_guard_incidents_open": "livemostrecent",
    # 0 as soon as one worker has moved the model's small requests to the thread pool
    "advguard_guard_inline": "livemin",
    # the slowest worker's moving average (the one nearest the edge.inline_max_ms bound)
    "advguard_guard_inline_run_seconds": "livemax",
}
#: Seconds between two writes of a worker's drift gauges to the multiprocess files.
REFRESH_S = 5.0
_MAX_MODES = ("max", "livemax")
_MOSTRECENT_MODES = ("mostrecent", "livemostrecent")


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process writes its metrics to, or None when it keeps
    them in memory (the variable was not set when prometheus_client was first imported)."""
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(MULTIPROC_ENV) or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_workers(path: str) -> list[int]:
    """``mark_process_dead`` for every process with live-gauge files in ``path`` that no
    longer runs (a worker killed without its shutdown hook); returns their pids."""
    dead = set()
    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        tail = os.path.basename(f)[: -len(".db")].rsplit("_", 1)[-1]
        if tail.isdigit() and not _alive(int(tail)):
            dead.add(int(tail))
    for pid in sorted(dead):
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return sorted(dead)


class _Merged:
    """The merge of the workers' files; a ``max`` gauge no worker has a value for (each wrote
    -inf, see :meth:`GuardMetrics.refresh`) reads NaN, as in one process."""

    def __init__(self, path: str) -> None:
        self.inner = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        for fam in self.inner.collect():  # type: ignore[no-untyped-call]
            if GAUGE_MODES.get(fam.name) in _MAX_MODES:
                fam.samples = [
                    s._replace(value=math.nan) if s.value == -math.inf else s for s in fam.samples
                ]
            yield fam


#: The pipeline stages timed in ``advguard_guard_stage_latency_seconds``.
STAGES = (
    "limit",
    "read",
    "parse",
    "validate",
    "sanitize",
    "detect",
    "stateful",
    "predict",
    "record",
)
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 25, 50, 100)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
OTHER = "other"


@functools.lru_cache(maxsize=65_536)
def client_label(key_id: str) -> str:
    """The label of a client: the first 12 hex digits of SHA-256 of its key id (the key id is
    not the key, and the hash keeps ids out of the metrics)."""
    return hashlib.sha256(key_id.encode("utf-8")).hexdigest()[:12]


class TopClients:
    """Which clients get their own label: a space-saving sketch (Metwally, Agrawal & El
    Abbadi, ICDT 2005) of ``capacity`` counters estimates the heaviest clients; at most ``n``
    of them are *labelled*. A client in the sketch replaces the lightest labelled one only when
    its guaranteed count (count - error) exceeds that one's estimated count, so labels do not
    flap between clients of similar volume. Memory and time per call are O(capacity)."""

    def __init__(self, n: int = 20, capacity: int | None = None) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.capacity = max(capacity or 4 * n, n)
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.labelled: set[str] = set()
        self.lock = threading.Lock()

    def _count(self, client: str) -> str | None:
        """Count one query; returns a labelled client the sketch evicted (now unlabelled)."""
        if client in self.counts:
            self.counts[client] += 1
            return None
        if len(self.counts) < self.capacity:
            self.counts[client] = 1
            self.errors[client] = 0
            return None
        victim = min(self.counts, key=self.counts.__getitem__)
        low = self.counts.pop(victim)
        self.errors.pop(victim)
        self.counts[client] = low + 1
        self.errors[client] = low
        if victim in self.labelled:
            self.labelled.discard(victim)
            return victim
        return None

    def observe(self, client: str) -> tuple[str, list[str]]:
        """Count one query of ``client``; returns its label (itself or ``other``) and the
        labels that stopped being labels (their series should be removed)."""
        with self.lock:
            dropped = []
            evicted = self._count(client)
            if evicted is not None:
                dropped.append(evicted)
            if client in self.labelled:
                return client, dropped
            if len(self.labelled) < self.n:
                self.labelled.add(client)
                return client, dropped
            weakest = min(self.labelled, key=self.counts.__getitem__)
            if self.counts[client] - self.errors[client] > self.counts[weakest]:
                self.labelled.discard(weakest)
                self.labelled.add(client)
                dropped.append(weakest)
                return client, dropped
            return OTHER, dropped


def _nth(fn: Callable[[], tuple[float, float, float]], i: int) -> Callable[[], float]:
    def read() -> float:
        return fn()[i]

    return read


class GuardMetrics:
    def __init__(self, top_clients: int = 20) -> None:
        self.registry = CollectorRegistry()
        #: prometheus_client's multiprocess directory when this is a worker of ``--workers N``.
        self.multiproc = multiprocess_dir()
        self._watched: list[tuple[Any, Callable[[], float], bool]] = []
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        #: Registered by the incident routes (advguard.guard.incident_api), once per guard.
        self.incidents_open: Gauge | None = None
        self.requests = Counter(
            "advguard_guard_requests",
            "Prediction requests answered, by model, version, endpoint and HTTP status.",
            ["model", "version", "endpoint", "status"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "advguard_guard_decisions",
            "Guard decisions by model, version and action.",
            ["model", "version", "action"],
            registry=self.registry,
        )
        self.rows = Counter(
            "advguard_guard_input_rows",
            "Input rows answered, by model and version.",
            ["model", "version"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "advguard_guard_request_latency_seconds",
            "Time from the request to the answer (seconds), by model and endpoint.",
            ["model", "endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "advguard_guard_rate_limited",
            "Requests refused with 429, by model and limit (rate or budget).",
            ["model", "limit"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "advguard_guard_auth_failures",
            "Requests refused by authentication (401/403), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._add_pipeline_metrics()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._add_drift_gauges()
        self.top_clients = TopClients(top_clients)
        self._client_lock = threading.Lock()
        self.client_queries = Counter(
            "advguard_guard_client_queries",
            "Prediction requests by client: the first 12 hex digits of SHA-256(key id) for the "
            "top-N clients, 'other' for the rest.",
            ["model", "client"],
            registry=self.registry,
        )

    def _add_pipeline_metrics(self) -> None:
        self.detector_flags = Counter(
            "advguard_guard_detector_flags",
            "Decisions in which the detector flagged at least one row (input detectors) or the "
            "client (stateful detectors), by model, version and detector.",
            ["model", "version", "detector"],
            registry=self.registry,
        )
        self.detector_score = Histogram(
            "advguard_guard_detector_score",
            "Per-row scores of the input detectors (unitless; higher is more suspicious).",
            ["model", "detector"],
            buckets=SCORE_BUCKETS,
            registry=self.registry,
        )
        self.top1_confidence = Histogram(
            "advguard_guard_top1_confidence",
            "Top-1 probability of every answered row, by model and version.",
            ["model", "version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "advguard_guard_stage_latency_seconds",
            "Time spent in one pipeline stage of a request (seconds), by model and stage.",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.stateful_alerts = Counter(
            "advguard_guard_stateful_alerts",
            "Requests in which a stateful detector flagged the client, by model, detector and "
            "the action taken.",
            ["model", "detector", "action"],
            registry=self.registry,
        )
        self.inline = self.gauge(
            "advguard_guard_inline",
            "1 while the model's small requests run on the event loop, 0 while its inline "
            "runs average over edge.inline_max_ms and they take the thread pool (from the "
            "model's first small request on; absent while inline is off).",
            ["model"],
        )
        self.inline_run = self.gauge(
            "advguard_guard_inline_run_seconds",
            "Moving average of the model's inline runs (event loop time per small request, "
            "the measure the inline rule compares with edge.inline_max_ms; NaN before the "
            "first).",
            ["model"],
        )
        self.inline_switches = Counter(
            "advguard_guard_inline_switches",
            "Moves of a model's small requests between the event loop (to=loop) and the "
            "thread pool (to=pool), by the inline rule (edge.inline_max_ms).",
            ["model", "to"],
            registry=self.registry,
        )
        self.forensic_write_failures = Counter(
            "advguard_guard_forensic_write_failures",
            "Decision records that could not be written (the request failed with a 5xx; for "
            "records written after the answer, forensics.plain_records: background, it had "
            "left).",
            ["model"],
            registry=self.registry,
        )

    def _add_drift_gauges(self) -> None:
        self.drift_input_psi = self.gauge(
            "advguard_guard_drift_input_psi",
            "Mean population stability index of the input features over the sliding window "
            "against the reference profile (NaN until the window has enough rows).",
            ["model"],
        )
        self.drift_prediction_psi = self.gauge(
            "advguard_guard_drift_prediction_psi",
            "Population stability index of the predicted-class distribution over the sliding "
            "window against the reference profile.",
            ["model"],
        )
        self.drift_confidence_zscore = self.gauge(
            "advguard_guard_drift_confidence_zscore",
            "z-score of the window's mean top-1 confidence against the reference mean "
            "(standard error of a window mean).",
            ["model"],
        )

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge on this guard's registry, merged over worker processes by its mode in
        :data:`GAUGE_MODES` (the mode changes nothing in one process)."""
        return Gauge(
            name,
            documentation,
            list(labelnames),
            registry=self.registry,
            multiprocess_mode=GAUGE_MODES[name],  # type: ignore[arg-type]
        )

    def watch(self, gauge: Any, fn: Callable[[], float], *, per_worker: bool) -> None:
        """Make ``gauge`` (unlabelled, or a child) read ``fn()`` at every scrape. In multiprocess
        mode the value is written to this worker's file instead, when this worker answers a
        scrape; ``per_worker`` values (this worker's own state, like its drift window) also
        every :data:`REFRESH_S` seconds, and their NaN means "no value yet" (left out of the
        merge), while a shared value (counted in the database) is written as it is."""
        if self.multiproc is None:
            gauge.set_function(fn)
            return
        self._watched.append((gauge, fn, per_worker))
        if per_worker and self._refresher is None:
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="advguard-metrics-refresh", daemon=True
            )
            self._refresher.start()

    def refresh(self, *, per_worker_only: bool = False) -> None:
        """Write the watched gauges' values to this worker's multiprocess file."""
        for gauge, fn, per_worker in list(self._watched):
            if per_worker_only and not per_worker:
                continue
            value = float(fn())
            if per_worker and math.isnan(value):
                mode = gauge._multiprocess_mode
                if mode in _MOSTRECENT_MODES:
                    continue  # keep the last value: another worker's may be the most recent
                if mode in _MAX_MODES:
                    value = -math.inf  # never the max; read back as NaN when no worker has one
            gauge.set(value)

    def _refresh_loop(self) -> None:
        while True:
            try:
                self.refresh(per_worker_only=True)
            except Exception as exc:  # a failed refresh must not end the loop
                log.warning("metrics refresh failed (%s)", type(exc).__name__)
            if self._stop.wait(REFRESH_S):
                return

    def close(self) -> None:
        """Stop the periodic refresh of the multiprocess gauges (if any)."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)

    # -- recording helpers ---------------------------------------------------------------
    def stage(self, model: str, stage: str) -> Any:
        """The stage-latency histogram child of ``(model, stage)`` (see :meth:`child`)."""
        return self.child(self.stage_latency, model, stage)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label values (``labels()`` takes a
        lock and validates and joins the values on every call; a request makes a dozen).
        Only for metrics whose series are never removed (not the per-client counter)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_client(self, model: str, key_id: str) -> None:
        """One query of the client with ``key_id`` (hashed; bounded label set)."""
        h = client_label(key_id)
        with self._client_lock:  # a series removed here is never re-created by a racing call
            label, dropped = self.top_clients.observe(h)
            for old in dropped:
                with contextlib.suppress(KeyError):
                    self.client_queries.remove(model, old)
            self.client_queries.labels(model, label).inc()

    def observe_scores(self, model: str, detector: str, scores: np.ndarray) -> None:
        h = self.detector_score.labels(model, detector)
        for s in scores.tolist():
            h.observe(s)

    def observe_confidence(self, model: str, version: str, probs: np.ndarray) -> None:
        h = self.child(self.top1_confidence, model, version)
        for c in probs.max(axis=1).tolist():
            h.observe(c)

    def watch_inline(self, model: str, state: Any) -> None:
        """A model the inline rule sees for the first time: ``advguard_guard_inline{model}``
        is 1 and ``advguard_guard_inline_run_seconds{model}`` reads ``state.ewma_s`` (an
        :class:`advguard.guard.inline.InlineState`) at every scrape."""
        self.inline.labels(model).set(1.0)
        self.watch(
            self.inline_run.labels(model),
            lambda: math.nan if state.ewma_s is None else state.ewma_s,
            per_worker=True,
        )

    def watch_drift(self, model: str, current: Callable[[], tuple[float, float, float]]) -> None:
        """Make the drift gauges of ``model`` read ``current()`` at every scrape."""
        gauges = (self.drift_input_psi, self.drift_prediction_psi, self.drift_confidence_zscore)
        for i, gauge in enumerate(gauges):
            self.watch(gauge.labels(model), _nth(current, i), per_worker=True)

    def set_drift(self, model: str, values: Sequence[float]) -> None:
        psi_in, psi_pred, z = values
        self.drift_input_psi.labels(model).set(psi_in)
        self.drift_prediction_psi.labels(model).set(psi_pred)
        self.drift_confidence_zscore.labels(model).set(z)

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape reads: this guard's registry in one process; in multiprocess mode a
        fresh registry merging every worker's files (after this worker wrote its watched
        gauges and the live gauges of workers that died were dropped)."""
        if self.multiproc is None:
            return self.registry
        self.refresh()
        reap_dead_workers(self.multiproc)
        reg = CollectorRegistry()
        reg.register(_Merged(self.multiproc))
        return reg

    def collect(self) -> list[Metric]:
        """The metric families a scrape would see (the admin summary reads them)."""
        return list(self.scrape_registry().collect())

    def render(self) -> bytes:
        return generate_latest(self.scrape_registry())

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the scraper asked for: OpenMetrics (with exemplars; one process only,
        prometheus_client's multiprocess files keep none) when its Accept header names
        ``application/openmetrics-text``, else the Prometheus text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.scrape_registry()), content_type
