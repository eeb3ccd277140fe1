"""Prometheus metrics of one guard (its own registry, so several guards can live in a process).

Labels are model names, versions, endpoints, status codes, actions, detector and stage names:
never keys or payloads. The one per-client series, ``advguard_guard_client_queries_total``,
is labelled with the first 12 hex digits of SHA-256(key id) for the top-N clients only (a
space-saving sketch, :class:`TopClients`); every other client counts under ``other``, so the
label has at most N + 1 values however many clients call. The metric names are a contract
shared with dashboards, SLO rules and alerts (docs/operations.md lists them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder

__all__ = [
    "CONTENT_TYPE_LATEST",
    "STAGES",
    "GuardMetrics",
    "TopClients",
    "client_label",
]

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
        self.inline = Gauge(
            "advguard_guard_inline",
            "1 while the model's small requests run on the event loop, 0 while its inline "
            "runs average over edge.inline_max_ms and they take the thread pool (from the "
            "model's first small request on; absent while inline is off).",
            ["model"],
            registry=self.registry,
        )
        self.inline_run = Gauge(
            "advguard_guard_inline_run_seconds",
            "Moving average of the model's inline runs (event loop time per small request, "
            "the measure the inline rule compares with edge.inline_max_ms; NaN before the "
            "first).",
            ["model"],
            registry=self.registry,
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
        self.drift_input_psi = Gauge(
            "advguard_guard_drift_input_psi",
            "Mean population stability index of the input features over the sliding window "
            "against the reference profile (NaN until the window has enough rows).",
            ["model"],
            registry=self.registry,
        )
        self.drift_prediction_psi = Gauge(
            "advguard_guard_drift_prediction_psi",
            "Population stability index of the predicted-class distribution over the sliding "
            "window against the reference profile.",
            ["model"],
            registry=self.registry,
        )
        self.drift_confidence_zscore = Gauge(
            "advguard_guard_drift_confidence_zscore",
            "z-score of the window's mean top-1 confidence against the reference mean "
            "(standard error of a window mean).",
            ["model"],
            registry=self.registry,
        )

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
        self.inline_run.labels(model).set_function(
            lambda: math.nan if state.ewma_s is None else state.ewma_s
        )

    def watch_drift(self, model: str, current: Callable[[], tuple[float, float, float]]) -> None:
        """Make the drift gauges of ``model`` read ``current()`` at every scrape."""
        gauges = (self.drift_input_psi, self.drift_prediction_psi, self.drift_confidence_zscore)
        for i, gauge in enumerate(gauges):
            gauge.labels(model).set_function(_nth(current, i))

    def set_drift(self, model: str, values: Sequence[float]) -> None:
        psi_in, psi_pred, z = values
        self.drift_input_psi.labels(model).set(psi_in)
        self.drift_prediction_psi.labels(model).set(psi_pred)
        self.drift_confidence_zscore.labels(model).set(z)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the scraper asked for: OpenMetrics (with exemplars) when its Accept
        header names ``application/openmetrics-text``, else the Prometheus text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
