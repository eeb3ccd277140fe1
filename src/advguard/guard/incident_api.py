"""The incident admin API (admin scope): ``/v1/admin/incidents`` to open and list,
``/v1/admin/incidents/{id}`` for the status and action log, ``.../close``, and one endpoint
per action (``.../actions/block-client``, ``throttle-client``, ``isolate``, ``preserve``).
The caller's key id is recorded as ``who``. The rollback's API half is the guard's
``POST /v1/admin/models/{name}/reload`` (``advguard incident rollback`` calls it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from advguard.errors import InputError
from advguard.guard import incident as inc
from advguard.guard.forensics import parse_since
from advguard.guard.problems import Problem, openapi_responses

if TYPE_CHECKING:
    from fastapi import FastAPI

    from advguard.guard.pipeline import Guard
    from advguard.guard.storage import KeyRecord

ERRORS = ("unauthorized", "forbidden", "client-blocked", "invalid-input", "incident-not-found")


class OpenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)
    severity: Literal["sev1", "sev2", "sev3", "sev4"] = "sev2"
    model: str | None = Field(default=None, max_length=100)


class CloseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    summary: str = Field(min_length=1, max_length=2000)


class NoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=2000)


class BlockBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    reason: str = Field(default="blocked during an incident", max_length=400)
    ttl_s: int | None = Field(default=None, ge=1, le=10**8)


class ThrottleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    rate: float | None = Field(default=None, gt=0, le=1e6)
    burst: int | None = Field(default=None, ge=1, le=10**7)
    ttl_s: int | None = Field(default=None, ge=1, le=10**8)
    reason: str = Field(default="throttled during an incident", max_length=400)
    clear: bool = False


class IsolateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=100)
    mode: Literal["fallback", "reject", "off"]
    reason: str = Field(default="isolated during an incident", max_length=400)


class PreserveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: str = Field(max_length=64, description="7d, 12h, 30m or an ISO date/time")
    until: str | None = Field(default=None, max_length=64)
    client_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    model: str | None = Field(default=None, max_length=100)
    hold_days: int | None = Field(default=None, ge=1, le=36_500)


def _problem(e: InputError) -> Problem:
    if isinstance(e, inc.IncidentNotFound):
        return Problem("incident-not-found", str(e))
    if isinstance(e, inc.IncidentClosed):
        return Problem("incident-closed", str(e))
    return Problem("invalid-input", str(e))


T = TypeVar("T")


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except InputError as e:
        raise _problem(e) from None


def add_incident_routes(
    app: FastAPI, guard: Guard, admin_key: Callable[..., Awaitable[KeyRecord]]
) -> None:
    """Register the incident endpoints on ``app`` (``admin_key``: the admin-scope dependency)."""
    from fastapi import Depends

    store = guard.store
    admin = Depends(admin_key)
    base = "/v1/admin/incidents"
    add_open_gauge(guard)

    @app.post(base, tags=["incidents"], status_code=201, responses=openapi_responses(*ERRORS))
    def open_incident(body: OpenBody, key: KeyRecord = admin) -> dict[str, Any]:
        """Open an incident."""
        return _call(
            lambda: inc.open_incident(
                store, body.title, who=key.key_id, severity=body.severity, model=body.model
            ).public()
        )

    @app.get(base, tags=["incidents"], responses=openapi_responses(*ERRORS))
    def list_incidents(
        status: Literal["open", "closed"] | None = None, key: KeyRecord = admin
    ) -> list[dict[str, Any]]:
        """Incidents, oldest first."""
        return [i.public() for i in inc.list_incidents(store, status)]

    @app.get(base + "/{incident_id}", tags=["incidents"], responses=openapi_responses(*ERRORS))
    def incident_status(incident_id: str, key: KeyRecord = admin) -> dict[str, Any]:
        """The incident and its action log."""
        return _call(lambda: inc.incident_status(store, incident_id))

    closed = openapi_responses(*ERRORS, "incident-closed")

    @app.post(base + "/{incident_id}/close", tags=["incidents"], responses=closed)
    def close(incident_id: str, body: CloseBody, key: KeyRecord = admin) -> dict[str, Any]:
        return _call(
            lambda: inc.close_incident(
                store, incident_id, who=key.key_id, summary=body.summary
            ).public()
        )

    @app.post(base + "/{incident_id}/notes", tags=["incidents"], responses=closed)
    def note(incident_id: str, body: NoteBody, key: KeyRecord = admin) -> dict[str, Any]:
        """Add a note to the incident's log."""
        return _call(
            lambda: inc.add_note(store, incident_id, who=key.key_id, text=body.text).public()
        )

    add_action_routes(app, guard, admin, base + "/{incident_id}/actions", closed)


def add_open_gauge(guard: Guard) -> None:
    """``advguard_guard_incidents_open``, counted in the guard database at each scrape (once
    per guard: several apps may serve one guard)."""
    if getattr(guard.metrics, "incidents_open", None) is not None:
        return

    def count() -> float:
        try:
            return float(inc.count_open(guard.store))
        except Exception:  # the database is down: no number rather than a failed scrape
            return float("nan")

    gauge = guard.metrics.gauge(
        "advguard_guard_incidents_open",
        "Open incidents in the guard database (advguard incident open/close).",
    )
    guard.metrics.watch(gauge, count, per_worker=False)
    guard.metrics.incidents_open = gauge


def add_action_routes(
    app: FastAPI, guard: Guard, admin: Any, base: str, responses: dict[int | str, Any]
) -> None:
    store = guard.store

    @app.post(base + "/block-client", tags=["incidents"], responses=responses)
    def block(incident_id: str, body: BlockBody, key: KeyRecord = admin) -> dict[str, Any]:
        """Block a client (403 from its next request on)."""
        return _call(
            lambda: inc.block_client(
                store,
                incident_id,
                who=key.key_id,
                client_id=body.client_id,
                reason=body.reason,
                ttl_s=body.ttl_s,
            ).public()
        )

    @app.post(base + "/throttle-client", tags=["incidents"], responses=responses)
    def throttle(incident_id: str, body: ThrottleBody, key: KeyRecord = admin) -> dict[str, Any]:
        """Give a client a reduced request rate (or lift it with ``clear``)."""
        return _call(
            lambda: inc.throttle_client(
                store, incident_id, who=key.key_id, **body.model_dump()
            ).public()
        )

    @app.post(base + "/isolate", tags=["incidents"], responses=responses)
    def isolate(incident_id: str, body: IsolateBody, key: KeyRecord = admin) -> dict[str, Any]:
        """Route all of a model's traffic to the fallback, or reject it (``off`` lifts it)."""
        return _call(
            lambda: inc.isolate_model(
                store,
                incident_id,
                who=key.key_id,
                model=body.model,
                mode=body.mode,
                reason=body.reason,
                has_fallback=guard.fallback is not None,
            ).public()
        )

    @app.post(base + "/preserve", tags=["incidents"], responses=responses)
    def preserve(incident_id: str, body: PreserveBody, key: KeyRecord = admin) -> dict[str, Any]:
        """Hold the records of a window (and client) against retention purges; export them
        with ``advguard incident preserve --out``."""

        def run() -> dict[str, Any]:
            since = parse_since(body.since)
            assert since is not None
            return inc.preserve(
                store,
                incident_id,
                who=key.key_id,
                since=since,
                until=parse_since(body.until),
                client_id=body.client_id,
                model=body.model,
                hold_days=body.hold_days,
            ).public()

        return _call(run)
