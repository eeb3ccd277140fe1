"""OpenTelemetry traces of guard requests (a real SDK with an in-memory exporter): the span
tree, its attributes (never keys or payloads), trace context from the caller, the switch by
OTEL_* variables, and exemplars linking the latency histograms to the traces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.forensics import fingerprint
from advguard.guard.pipeline import DetectorSlot
from advguard.guard.telemetry import build_provider, tracing_requested
from guard_helpers import MeanDetector, make_guard

PREDICT = "/v1/models/digits/predict"
STAGES = ["sanitize", "detect", "stateful", "predict", "record"]


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


@pytest.fixture()
def traced(tmp_path, module):
    exporter = InMemorySpanExporter()
    g = make_guard(
        tmp_path,
        module,
        detectors=[DetectorSlot("mean", MeanDetector(), [(0.6, "reject")])],
        tracer_provider=build_provider(exporter),
    )
    yield g, exporter
    g.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _attr_text(spans) -> str:
    return " ".join(f"{k}={v!r}" for s in spans for k, v in (s.attributes or {}).items())


def test_one_span_per_request_with_a_child_per_stage(traced):
    g, exporter = traced
    c = TestClient(create_app(g))
    created = create_key(g.store, "alice")
    marker = 0.123456789
    x = np.full((2, 1, 8, 8), 0.25, np.float32)
    x[0, 0, 0, 0] = marker
    r = c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(created.key))
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1
    root = roots[0]
    assert root.name == "POST /v1/models/{name}/predict"
    children = [s for s in spans if s.parent is not None]
    assert all(s.parent.span_id == root.context.span_id for s in children)
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    names = sorted(s.name for s in children)
    want = ["limit", "limit", "read", "parse", "validate", *STAGES]  # rate and budget
    assert names == sorted(f"guard.{n}" for n in want)
    a = root.attributes
    assert a["advguard.model.name"] == "digits" and a["advguard.model.version"] == "digits:1"
    assert a["advguard.decision"] == "allow"
    assert a["advguard.decision.id"] == r.json()["decision_id"]
    assert a["advguard.client.key_id"] == created.record.key_id
    assert a["http.response.status_code"] == 200 and a["http.route"] == PREDICT.replace(
        "digits", "{name}"
    )
    # the fingerprint of the validated float32 batch, the detector's per-row scores
    assert a["advguard.input.fingerprint"] == fingerprint(np.asarray(x, np.float32))
    assert list(a["advguard.detector.mean.score"]) == pytest.approx(
        [float(v) for v in MeanDetector().score(x)], abs=1e-6
    )
    # never the key (nor its secret part) or the payload
    text = _attr_text(spans)
    secret = created.key.split(".")[1]
    for s in (created.key, secret, str(marker), "0.12345"):
        assert s not in text


def test_rejected_and_failed_requests_are_traced_too(traced):
    g, exporter = traced
    c = TestClient(create_app(g), raise_server_exceptions=False)
    k = create_key(g.store, "b").key
    x = np.full((1, 1, 8, 8), 0.9, np.float32)
    assert c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k)).status_code == 422
    root = next(s for s in exporter.get_finished_spans() if s.parent is None)
    assert root.attributes["advguard.decision"] == "reject"
    assert root.attributes["http.response.status_code"] == 422
    assert "guard.predict" not in {s.name for s in exporter.get_finished_spans()}
    exporter.clear()
    assert c.post(PREDICT, content=b"{bad", headers=auth(k)).status_code == 400
    spans = exporter.get_finished_spans()
    parse = next(s for s in spans if s.name == "guard.parse")
    assert parse.attributes["error.type"] == "Problem"
    assert {s.name for s in spans} == {"POST /v1/models/{name}/predict", "guard.limit",
                                       "guard.read", "guard.parse"}  # fmt: skip


def test_the_callers_trace_context_is_continued(traced):
    g, exporter = traced
    c = TestClient(create_app(g))
    k = create_key(g.store, "c").key
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {**auth(k), "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    x = np.full((1, 1, 8, 8), 0.2, np.float32)
    assert c.post(PREDICT, json={"inputs": x.tolist()}, headers=headers).status_code == 200
    root = next(s for s in exporter.get_finished_spans() if s.name.startswith("POST"))
    assert f"{root.context.trace_id:032x}" == trace_id
    assert f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"


def test_exemplars_link_latency_to_traces_in_openmetrics(traced):
    g, exporter = traced
    c = TestClient(create_app(g))
    k = create_key(g.store, "d").key
    x = np.full((1, 1, 8, 8), 0.2, np.float32)
    assert c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k)).status_code == 200
    root = next(s for s in exporter.get_finished_spans() if s.parent is None)
    tid = f"{root.context.trace_id:032x}"
    om = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    lines = [ln for ln in om.text.splitlines() if f'trace_id="{tid}"' in ln]
    assert any(ln.startswith("advguard_guard_request_latency_seconds_bucket") for ln in lines)
    assert any(ln.startswith("advguard_guard_stage_latency_seconds_bucket") for ln in lines)
    assert om.text.rstrip().endswith("# EOF")
    plain = c.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text


def test_tracing_is_off_by_default_and_follows_the_otel_variables(tmp_path, module):
    assert not tracing_requested(False, {})
    assert tracing_requested(True, {})
    assert tracing_requested(False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_requested(False, {"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing_requested(True, {"OTEL_SDK_DISABLED": "true"})
    assert not tracing_requested(True, {"OTEL_TRACES_EXPORTER": "none"})
    with pytest.raises(InputError, match="grpc"):
        build_provider(environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(InputError, match="zipkin"):
        build_provider(environ={"OTEL_TRACES_EXPORTER": "zipkin"})
    p = build_provider(environ={"OTEL_TRACES_EXPORTER": "otlp"})  # built, nothing sent yet
    assert p.resource.attributes["service.name"] == "advguard-guard"
    p.shutdown()
    g = make_guard(tmp_path, module)
    assert not g.telemetry.tracing
    c = TestClient(create_app(g))
    k = create_key(g.store, "e").key
    x = np.full((1, 1, 8, 8), 0.2, np.float32)
    assert c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k)).status_code == 200
    om = c.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text
    assert "trace_id" not in om and "advguard_guard_stage_latency_seconds_bucket" in om
    g.close()


class _Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (stdlib server + the OTLP protobuf types)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        received: list = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                received.append((self.path, req))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_otel_variables_export_spans_over_otlp_http(tmp_path, module, monkeypatch):
    from advguard.guard.config import parse_config
    from advguard.guard.pipeline import Guard
    from advguard.guard.serving import ServedModel
    from advguard.guard.storage import GuardStore
    from advguard.models import TorchClassifier

    col = _Collector()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", col.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "guard-under-test")
        cfg = parse_config("", "g.yaml", tmp_path)  # tracing comes from the environment only
        served = ServedModel(
            "digits", "digits:1", TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
        )
        g = Guard.from_config(cfg, model=served, store=GuardStore(f"sqlite:///{tmp_path}/g.db"))
        assert g.telemetry.tracing
        c = TestClient(create_app(g))
        k = create_key(g.store, "f").key
        x = np.full((1, 1, 8, 8), 0.2, np.float32)
        assert c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k)).status_code == 200
        g.close()  # flushes the batch processor
    finally:
        col.close()
    assert col.received and all(path == "/v1/traces" for path, _ in col.received)
    spans, services = [], set()
    for _, req in col.received:
        for rs in req.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes
                         if a.key == "service.name"}  # fmt: skip
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    assert services == {"guard-under-test"}
    names = sorted(s.name for s in spans)
    assert "POST /v1/models/{name}/predict" in names and "guard.predict" in names
    assert len(spans) == 11 and len({s.trace_id for s in spans}) == 1
