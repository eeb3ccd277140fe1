"""Prometheus metrics of one guard (its own registry, so several guards can live in a process).

Labels are model names, versions, endpoints, status codes and actions: never key ids, keys or
payloads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "GuardMetrics"]


class GuardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
