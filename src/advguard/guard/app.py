"""The guard's HTTP API (FastAPI): advguard's own JSON/.npy predict endpoint, the Open Inference
Protocol v2 subset, health, readiness, metrics and decisions. Every error is an RFC 9457
problem document; bad input is always a 4xx."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advguard import __version__
from advguard.guard.batching import BatchItem
from advguard.guard.dashboard import add_dashboard_routes
from advguard.guard.deps import SECURITY, key_dependency, request_key
from advguard.guard.edge import (
    parse_json,
    parse_npy,
    parse_predict_json,
    parse_v2_infer,
    read_capped,
)
from advguard.guard.incident_api import add_incident_routes
from advguard.guard.oip import V2_BODY, v2_metadata, v2_response
from advguard.guard.pipeline import Guard, Outcome
from advguard.guard.problems import MEDIA_TYPE, Problem, ProblemModel, openapi_responses
from advguard.guard.ratelimit import LimitResult
from advguard.guard.rollout import add_rollout_routes
from advguard.guard.serving import ServedModel
from advguard.guard.storage import DecisionRecord, KeyRecord
from advguard.guard.telemetry import RequestObs

log = logging.getLogger("advguard.guard")
T = TypeVar("T")

AUTH_ERRORS = (
    "unauthorized",
    "forbidden",
    "client-blocked",
    "internal",
    "not-ready",
    "dependency-unavailable",
)
BODY_ERRORS = (
    "bad-request",
    "invalid-json",
    "too-deep",
    "model-not-found",
    "request-timeout",
    "body-too-large",
    "unsupported-media-type",
    "invalid-input",
    "batch-too-large",
    "rejected",
    "rate-limited",
    "budget-exhausted",
)

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "inputs": {
                            "type": "array",
                            "description": "One entry per input, nested lists of the model's "
                            "input shape (or flat), raw input space within the bounds.",
                            "items": {},
                        }
                    },
                }
            },
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def problem_response(p: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(
        p.body(instance), status_code=p.status, headers=p.headers, media_type=MEDIA_TYPE
    )


class CatchAll:
    """Outermost ASGI layer: an unexpected exception becomes a 500 problem document, and only
    its type is logged (a message could quote input)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("internal error (%s) on %s", type(exc).__name__, scope.get("path", "?"))
            if started:
                return
            resp = problem_response(Problem("internal", "the guard failed to answer; try again"))
            await resp(scope, receive, send)


def create_app(guard: Guard) -> FastAPI:
    """The ASGI application serving ``guard``: error handlers, then one route group each
    (prediction, health, admin), then the OpenAPI document. A new group is a function taking
    ``(app, guard)`` registered here."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # the rows of the background writer are committed before the server process ends
        await run_in_threadpool(guard.flush_records)

    app = FastAPI(
        lifespan=lifespan,
        title="advguard guard",
        version=__version__,
        description="Runtime guard in front of a model: authentication, limits, input "
        "validation, detection, policy decisions and forensics.",
        responses=openapi_responses("internal"),
    )
    app.state.guard = guard
    install_problem_handlers(app)
    add_prediction_routes(app, guard)
    add_health_routes(app, guard)
    add_admin_routes(app, guard)
    add_dashboard_routes(app, guard)
    add_rollout_routes(app, guard, key_dependency(guard, "admin"))
    add_incident_routes(app, guard, key_dependency(guard, "admin"))
    install_openapi(app)
    return app


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app answers is an RFC 9457 problem document."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        detail = {404: "no such endpoint", 405: "method not allowed here"}.get(
            exc.status_code, "the request could not be handled"
        )
        return problem_response(Problem(slug, detail), request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after answering; CatchAll (outermost) swallows and logs it
        return problem_response(
            Problem("internal", "the guard failed to answer; try again"), request.url.path
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(
            Problem("invalid-input", "the request's parameters are not valid"), request.url.path
        )


Parse = Callable[[bytes, str], Any]
Render = Callable[[Outcome, Any], dict[str, Any]]


async def serve_prediction(
    guard: Guard,
    endpoint: str,
    name: str,
    key: KeyRecord,
    request: Request,
    parse: Parse,
    render: Render,
) -> JSONResponse:
    """One prediction request through the pipeline: rate, read, parse, validate, budget,
    process; the blocking steps run off the event loop."""
    started = time.perf_counter()
    status = 500
    model = guard.get_model(name)
    version = model.version  # the version that answered (a canary's when routed there)
    edge = guard.cfg.edge
    obs = request_obs(guard, model, key, endpoint, request)
    try:
        with obs.stage("limit"):  # the rate (and an incident throttle) may read the stores
            if guard.rate_is_local(key):
                guard.check_rate(key, model.name)
            else:
                await run_in_threadpool(guard.check_rate, key, model.name)
        with obs.stage("read"):
            body = await read_capped(
                request.stream(),
                edge.max_body_bytes,
                edge.read_timeout_s,
                request.headers.get("content-length"),
            )
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()

        def admit() -> tuple[np.ndarray, Any, LimitResult | None]:
            # parsing a large body takes a while: this runs off the event loop
            with obs.stage("parse"):
                raw, extra = parse(body, ctype.lower())
            with obs.stage("validate"):
                x = guard.validate(raw, model)
            with obs.stage("limit"):
                return x, extra, guard.check_budget(key, model.name, len(x))

        def admit_and_process(
            records: list[DecisionRecord] | None = None,
        ) -> tuple[Outcome, Any, LimitResult | None]:
            x, extra, budget = admit()
            return guard.process(key, model, x, started, obs, records), extra, budget

        # a small request of a fast model: no thread-pool hop (advguard.guard.inline)
        inline = guard.runs_inline(len(body), model)
        if guard.batcher is None:  # at most one thread-pool hop for all the blocking steps
            if inline:
                outcome, extra, budget = await run_inline(guard, model, obs, admit_and_process)
            else:
                outcome, extra, budget = await run_in_threadpool(admit_and_process)
        else:  # the batch runs in the batcher's thread
            if inline:
                x, extra, budget = timed_inline(guard, model, admit)
            else:
                x, extra, budget = await run_in_threadpool(admit)
            outcome = await guard.batcher.submit(BatchItem(key, model, x, started), len(x))
        headers = budget.headers() if budget is not None else {}
        headers["X-Decision-Id"] = outcome.decision_id
        status, version = 200, outcome.model.version
        return JSONResponse(render(outcome, extra), headers=headers)
    except Problem as p:
        status, version = p.status, p.model_version or version
        raise
    finally:
        m = guard.metrics
        m.child(m.requests, model.name, version, endpoint, str(status)).inc()
        m.child(m.latency, model.name, endpoint).observe(
            time.perf_counter() - started, obs.exemplar()
        )
        obs.finish(status)


def timed_inline(guard: Guard, model: ServedModel, work: Callable[[], T]) -> T:
    """``work()`` on the event loop, timed for the inline gate (a batched request's
    admission)."""
    t0 = guard.inline.start()
    try:
        return work()
    finally:
        guard.inline.record(model.name, t0)


async def run_inline(
    guard: Guard,
    model: ServedModel,
    obs: RequestObs,
    work: Callable[[list[DecisionRecord]], T],
) -> T:
    """``work(records)`` on the event loop, timed for the inline gate; the decision records
    it leaves in ``records`` (those committed before the answer: forensic ones) are committed
    in the thread pool, so that no database write blocks the loop. A refusal leaves after its
    record too; a failed commit wins over it (as when the record is committed in the pool)."""
    records: list[DecisionRecord] = []
    refused: Problem | None = None
    try:
        result = timed_inline(guard, model, lambda: work(records))
    except Problem as p:
        refused = p
    if records:
        with obs.stage("record"):
            await run_in_threadpool(guard.commit_records, records, model)
    if refused is not None:
        raise refused
    return result


def request_obs(
    guard: Guard, model: ServedModel, key: KeyRecord, endpoint: str, request: Request
) -> RequestObs:
    """Count the client's query and start the request's observer (and span, when tracing)."""
    guard.metrics.count_client(model.name, key.key_id)
    if not guard.telemetry.tracing:  # the span's name and attributes are only for tracing
        return guard.telemetry.request(model.name)
    route = request.scope.get("route")
    path = getattr(route, "path", endpoint)
    return guard.telemetry.request(
        model.name,
        f"{request.method} {path}",
        {
            "http.request.method": request.method,
            "http.route": path,
            "advguard.endpoint": endpoint,
            "advguard.model.name": model.name,
            "advguard.model.version": model.version,
            "advguard.client.key_id": key.key_id,
        },
        carrier=request.headers if guard.telemetry.tracing else None,
    )


def _is_json(ctype: str) -> bool:
    return ctype == "application/json" or ctype.endswith("+json")


def add_prediction_routes(app: FastAPI, guard: Guard) -> None:
    """advguard's own predict endpoint and the Open Inference Protocol v2 infer endpoint (these
    two authenticate with :func:`request_key`, not a dependency: the hot path)."""
    predict_key = key_dependency(guard, "predict")
    depth = guard.cfg.edge.max_json_depth

    def parse_v1(body: bytes, ctype: str) -> tuple[np.ndarray, None]:
        if ctype in ("application/x-npy", "application/octet-stream"):
            return parse_npy(body), None
        if not _is_json(ctype):
            raise Problem("unsupported-media-type", "send application/json or application/x-npy")
        return parse_predict_json(parse_json(body, depth)), None

    def parse_v2(body: bytes, ctype: str) -> tuple[np.ndarray, tuple[str | None, str]]:
        if not _is_json(ctype):
            raise Problem("unsupported-media-type", "send application/json")
        x, rid, name = parse_v2_infer(parse_json(body, depth))
        return x, (rid, name)

    def render_v1(o: Outcome, _extra: Any) -> dict[str, Any]:
        return o.body()

    def render_v2(o: Outcome, extra: tuple[str | None, str]) -> dict[str, Any]:
        return v2_response(o.body(), extra[0])

    @app.post(
        "/v1/models/{name}/predict",
        tags=["predict"],
        summary="Classify a batch (JSON {'inputs': [...]} or a .npy array)",
        responses=openapi_responses(*AUTH_ERRORS, *BODY_ERRORS),
        openapi_extra={**PREDICT_BODY, "security": SECURITY},
    )
    async def predict(name: str, request: Request) -> JSONResponse:
        key = await request_key(guard, request, "predict", name)
        return await serve_prediction(guard, "v1-predict", name, key, request, parse_v1, render_v1)

    @app.post(
        "/v2/models/{name}/infer",
        tags=["open inference protocol v2"],
        summary="Open Inference Protocol v2 inference",
        responses=openapi_responses(*AUTH_ERRORS, *BODY_ERRORS),
        openapi_extra={**V2_BODY, "security": SECURITY},
    )
    async def v2_infer(name: str, request: Request) -> JSONResponse:
        key = await request_key(guard, request, "predict", name)
        return await serve_prediction(guard, "v2-infer", name, key, request, parse_v2, render_v2)

    @app.get(
        "/v2/models/{name}",
        tags=["open inference protocol v2"],
        summary="Model metadata",
        responses=openapi_responses(*AUTH_ERRORS, "model-not-found"),
    )
    def v2_model(name: str, key: KeyRecord = Depends(predict_key)) -> dict[str, Any]:
        return v2_metadata(guard.get_model(name))

    @app.get(
        "/v2/models/{name}/ready",
        tags=["open inference protocol v2"],
        responses=openapi_responses(*AUTH_ERRORS, "model-not-found"),
    )
    def v2_model_ready(name: str, key: KeyRecord = Depends(predict_key)) -> dict[str, Any]:
        guard.get_model(name)
        return {"name": name, "ready": True}


def stores_ready(guard: Guard) -> bool:
    """True when the database and the rate-limit store answer."""
    try:
        with guard.store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return bool(guard.limiter.storage.check())
    except Exception as exc:
        log.warning("not ready: %s", type(exc).__name__)
        return False


def add_health_routes(app: FastAPI, guard: Guard) -> None:
    """Liveness, readiness (both advguard's and OIP v2's) and the Prometheus metrics."""
    not_ready = "the database or the rate-limit store does not answer"

    @app.get("/v2/health/live", tags=["health"])
    def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"], responses=openapi_responses("not-ready"))
    def v2_ready() -> dict[str, bool]:
        if not stores_ready(guard):
            raise Problem("not-ready", not_ready)
        return {"ready": True}

    @app.get("/v2", tags=["open inference protocol v2"])
    def v2_server() -> dict[str, Any]:
        return {"name": "advguard-guard", "version": __version__, "extensions": []}

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses=openapi_responses("not-ready"))
    def readyz() -> dict[str, str]:
        if not stores_ready(guard):
            raise Problem("not-ready", not_ready)
        return {"status": "ready", "model": guard.model.name, "version": guard.model.version}

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics(request: Request) -> Response:
        # OpenMetrics (with exemplars) when the scraper asks for it, else the text format
        body, ctype = guard.metrics.render_for(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": ctype})


def add_admin_routes(app: FastAPI, guard: Guard) -> None:
    """Endpoints that need the ``admin`` scope."""
    admin_key = key_dependency(guard, "admin")

    @app.get(
        "/v1/decisions/{decision_id}",
        tags=["admin"],
        summary="One recorded decision (admin scope; never the payload)",
        responses=openapi_responses(*AUTH_ERRORS, "decision-not-found"),
    )
    def get_decision(decision_id: str, key: KeyRecord = Depends(admin_key)) -> dict[str, Any]:
        return guard.decision(decision_id)


def install_openapi(app: FastAPI) -> None:
    """The OpenAPI document declares the Problem schema for every error; FastAPI's own 422
    body (never sent: parameter errors are problems) is replaced by it."""

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {})
        schemas = comps.setdefault("schemas", {})
        schemas["Problem"] = ProblemModel.model_json_schema()
        problem = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                resp = op.get("responses", {}).get("422")
                if resp is not None:
                    resp["content"] = problem
                    if resp.get("description") == "Validation Error":
                        resp["description"] = "Invalid parameters"
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]


def wrap(app: FastAPI) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """``app`` behind :class:`CatchAll` (what ``advguard guard serve`` runs)."""
    return CatchAll(app)
