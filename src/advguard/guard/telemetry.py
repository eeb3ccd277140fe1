"""Stage timing and OpenTelemetry traces of guard requests.

Every request gets a :class:`RequestObs`: each pipeline stage runs inside ``obs.stage(name)``,
which times it with :func:`time.perf_counter` into ``advguard_guard_stage_latency_seconds``
and, when tracing is on, opens a child span of the request's span. Tracing is off by default;
the standard ``OTEL_*`` environment variables turn it on (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none`` keep it off), as does ``telemetry: {tracing: true}`` in the
guard config. Spans carry the model name and version, the decision, detector scores, the input
fingerprint (SHA-256) and the client's key id: never payloads or keys. With tracing on, the
latency histograms carry the trace id as an exemplar (seen in the OpenMetrics exposition).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from advguard.errors import InputError
from advguard.guard.metrics import GuardMetrics

if TYPE_CHECKING:  # opentelemetry is part of the guard extra; imported only when tracing
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

__all__ = ["RequestObs", "Telemetry", "build_provider", "tracing_requested"]

TRACER_NAME = "advguard.guard"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_requested(configured: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to trace: ``configured`` (the config's ``telemetry.tracing``) or an exporter or
    OTLP endpoint named in the environment, unless the environment switches the SDK off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return configured or bool(exporters) or any(env.get(v, "").strip() for v in _ENDPOINT_VARS)


def _exporters_from_env(env: Mapping[str, str]) -> list[SpanExporter]:
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    out: list[SpanExporter] = []
    for name in filter(None, names):
        if name == "otlp":
            proto = env.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
            )
            if proto.strip() not in ("", "http/protobuf"):
                raise InputError(
                    f"OTLP protocol {proto.strip()!r} is not supported; the guard exports "
                    "http/protobuf (set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())  # endpoint, headers, timeout from OTEL_* variables
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        else:
            raise InputError(
                f"OTEL_TRACES_EXPORTER {name!r} is not supported (otlp, console or none)"
            )
    return out


def build_provider(
    exporter: SpanExporter | None = None, environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A tracer provider of its own (not the process-global one): resource and sampler from
    ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES``/``OTEL_TRACES_SAMPLER``; the exporters
    from ``OTEL_TRACES_EXPORTER`` behind a batch processor, or ``exporter`` behind a simple
    (synchronous) processor."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    env = os.environ if environ is None else environ
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": "advguard-guard"})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for exp in _exporters_from_env(env):
            provider.add_span_processor(BatchSpanProcessor(exp))
    return provider


class Telemetry:
    """The guard's metrics plus, when tracing is on, its tracer."""

    def __init__(self, metrics: GuardMetrics, provider: TracerProvider | None = None) -> None:
        self.metrics = metrics
        self.provider = provider
        self.tracer: Tracer | None = (
            provider.get_tracer(TRACER_NAME) if provider is not None else None
        )

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    def request(
        self,
        model: str,
        name: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        carrier: Mapping[str, str] | None = None,
    ) -> RequestObs:
        """A new request's observer; with tracing on, its span (named ``name``) is started
        as a child of the W3C ``traceparent`` in ``carrier`` (the request headers), if any."""
        span = None
        if self.tracer is not None and name is not None:
            from opentelemetry.propagate import extract
            from opentelemetry.trace import SpanKind

            ctx = extract(carrier) if carrier is not None else None
            span = self.tracer.start_span(
                name, context=ctx, kind=SpanKind.SERVER, attributes=dict(attributes or {})
            )
        return RequestObs(self, model, span)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class _Stage:
    __slots__ = ("name", "obs", "span", "t0")

    def __init__(self, obs: RequestObs, name: str) -> None:
        self.obs = obs
        self.name = name
        self.span: Span | None = None
        self.t0 = 0.0

    def __enter__(self) -> _Stage:
        obs = self.obs
        if obs.span is not None and obs.telemetry.tracer is not None:
            from opentelemetry.trace import set_span_in_context

            self.span = obs.telemetry.tracer.start_span(
                f"guard.{self.name}", context=set_span_in_context(obs.span)
            )
        self.t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        dt = time.perf_counter() - self.t0
        times = self.obs.times
        times[self.name] = times.get(self.name, 0.0) + dt
        if self.span is not None:
            if ev is not None:
                self.span.set_attribute("error.type", type(ev).__name__)
            self.span.end()


class RequestObs:
    """Observes one request: per-stage time (summed when a stage runs twice, e.g. the rate
    and the budget check of ``limit``), observed once per stage by :meth:`finish`; the request
    span and its stage spans when tracing."""

    __slots__ = ("finished", "model", "span", "telemetry", "times")

    def __init__(self, telemetry: Telemetry, model: str, span: Span | None = None) -> None:
        self.telemetry = telemetry
        self.model = model
        self.span = span
        self.times: dict[str, float] = {}
        self.finished = False

    @property
    def recording(self) -> bool:
        return self.span is not None and self.span.is_recording()

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def set(self, attributes: Mapping[str, Any]) -> None:
        """Attributes of the request span (no-op without tracing)."""
        if self.span is not None:
            self.span.set_attributes(dict(attributes))

    def exemplar(self) -> dict[str, str] | None:
        """``{trace_id, span_id}`` of the request span, for the latency histograms."""
        if self.span is None:
            return None
        ctx = self.span.get_span_context()
        if not ctx.is_valid or not ctx.trace_flags.sampled:
            return None
        return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}

    def finish(self, status: int | None = None) -> None:
        """Observe every stage that ran, then end the request span (idempotent)."""
        if self.finished:
            return
        self.finished = True
        ex = self.exemplar()
        stage = self.telemetry.metrics.stage
        for name, dt in self.times.items():
            stage(self.model, name).observe(dt, ex)
        if self.span is not None:
            if status is not None:
                self.span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    from opentelemetry.trace import Status, StatusCode

                    self.span.set_status(Status(StatusCode.ERROR))
            self.span.end()
