"""Incident response: an incident record (what, when, who) with an append-only action log in
the guard's database, and the actions an operator takes during an incident. Every action is a
library function here, used by both ``advguard incident ...`` and the admin API
(:func:`advguard.guard.incident_api.add_incident_routes`), and appends one entry to the
incident's log.

Actions: ``block-client`` (403 from then on), ``throttle-client`` (a reduced request rate the
limiter applies to that client), ``isolate`` (every request to a model answered by the fallback
or rejected), ``rollback`` (the registry's previous production version, then a hot reload of the
guard) and ``preserve`` (hold the forensic records of a window against retention purges and
export them with a SHA-256 manifest, :mod:`advguard.guard.preserve`).

``who`` is the admin key id (API) or the operator name (CLI ``--who`` / ``$USER``); key material
is never recorded. Rows read back are validated like any other input.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select, update

from advguard.errors import InputError
from advguard.guard.storage import (
    KEY_ID_RE,
    ClientLimit,
    GuardStore,
    Isolation,
    StoreCorrupt,
    now,
)

if TYPE_CHECKING:  # fastapi (serve extra) and cryptography (guard extra) are optional
    from cryptography.fernet import Fernet

INCIDENT_ID_RE = r"^[0-9a-f]{16}$"
WHO_RE = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
SEVERITIES = ("sev1", "sev2", "sev3", "sev4")
ACTIONS = (
    "open",
    "note",
    "block-client",
    "throttle-client",
    "isolate",
    "rollback",
    "preserve",
    "triage",
    "close",
)
ISOLATION_MODES = ("fallback", "reject", "off")


class IncidentNotFound(InputError):
    """No incident with this id."""


class IncidentClosed(InputError):
    """The incident is closed; no action can be appended."""


class Incident(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=INCIDENT_ID_RE)
    title: str = Field(min_length=1, max_length=200)
    severity: Literal["sev1", "sev2", "sev3", "sev4"]
    model: str | None = Field(default=None, max_length=100)
    status: Literal["open", "closed"]
    opened_at: datetime
    opened_by: str = Field(pattern=WHO_RE)
    closed_at: datetime | None = None
    closed_by: str | None = Field(default=None, pattern=WHO_RE)
    summary: str | None = Field(default=None, max_length=2000)

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class IncidentAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int = Field(ge=1)
    incident_id: str = Field(pattern=INCIDENT_ID_RE)
    ts: datetime
    who: str = Field(pattern=WHO_RE)
    action: Literal[
        "open",
        "note",
        "block-client",
        "throttle-client",
        "isolate",
        "rollback",
        "preserve",
        "triage",
        "close",
    ]
    target: str | None = Field(default=None, max_length=200)
    details: dict[str, Any]
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def entry_hash(entry: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over the canonical JSON of a log entry (incident, time in UTC, who, action,
    target, details) followed by the previous entry's hash of the same incident ("" first):
    changing, removing or reordering an entry breaks every hash after it."""
    body = {k: entry[k] for k in ("incident_id", "who", "action", "target", "details")}
    body["ts"] = entry["ts"].astimezone(UTC).isoformat(timespec="microseconds")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((text + prev_hash).encode("utf-8")).hexdigest()


def _parse(model: type[BaseModel], row: Any, what: str) -> Any:
    data = {
        k: (v.replace(tzinfo=now().tzinfo) if isinstance(v, datetime) and v.tzinfo is None else v)
        for k, v in row._mapping.items()
    }
    try:
        return model.model_validate(data)
    except ValidationError as e:
        field = ".".join(str(p) for p in e.errors()[0]["loc"])
        raise StoreCorrupt(f"the guard database holds a bad {what} row (field {field})") from None


def check_who(who: str | None) -> str:
    """The operator or key id recorded as ``who`` (letters, digits and ``._@+-``)."""
    if not who or not re.fullmatch(WHO_RE, who):
        raise InputError(
            f"who must be an operator name or key id (letters, digits, ._@+-; at most 64), "
            f"got {who!r}; give --who NAME"
        )
    return who


def check_incident_id(incident_id: str) -> str:
    if not re.fullmatch(INCIDENT_ID_RE, incident_id or ""):
        raise IncidentNotFound(f"an incident id is 16 hex digits, got {incident_id!r}")
    return incident_id


def check_client_id(client_id: str) -> str:
    if not re.fullmatch(KEY_ID_RE, client_id or ""):
        raise InputError(f"a client id is a key id (16 hex digits), got {client_id!r}")
    return client_id


def _text(value: str, what: str, limit: int) -> str:
    v = (value or "").strip()
    if not v or len(v) > limit or any(ord(c) < 32 for c in v):
        raise InputError(f"{what} must be 1 to {limit} printable characters")
    return v


# -- incidents -----------------------------------------------------------------------------
def open_incident(
    store: GuardStore, title: str, *, who: str, severity: str = "sev2", model: str | None = None
) -> Incident:
    """Open an incident (its first log entry is ``open``)."""
    if severity not in SEVERITIES:
        raise InputError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    inc = Incident(
        id=uuid.uuid4().hex[:16],
        title=_text(title, "the title", 200),
        severity=severity,  # type: ignore[arg-type]
        model=_text(model, "the model name", 100) if model is not None else None,
        status="open",
        opened_at=now(),
        opened_by=check_who(who),
    )
    with store.engine.begin() as conn:
        conn.execute(store.controls.incidents.insert().values(**inc.model_dump()))
    append_action(store, inc.id, who, "open", inc.model, {"title": inc.title})
    return inc


def get_incident(store: GuardStore, incident_id: str) -> Incident:
    t = store.controls.incidents
    with store.engine.begin() as conn:
        row = conn.execute(select(t).where(t.c.id == check_incident_id(incident_id))).first()
    if row is None:
        raise IncidentNotFound(f"no incident {incident_id!r}")
    inc: Incident = _parse(Incident, row, "incident")
    return inc


def list_incidents(store: GuardStore, status: str | None = None) -> list[Incident]:
    t = store.controls.incidents
    q = select(t).order_by(t.c.opened_at)
    if status is not None:
        if status not in ("open", "closed"):
            raise InputError(f"status must be open or closed, got {status!r}")
        q = q.where(t.c.status == status)
    with store.engine.begin() as conn:
        rows = conn.execute(q).all()
    return [_parse(Incident, r, "incident") for r in rows]


def count_open(store: GuardStore) -> int:
    """Open incidents (the ``advguard_guard_incidents_open`` gauge)."""
    t = store.controls.incidents
    with store.engine.begin() as conn:
        return int(conn.execute(select(func.count()).where(t.c.status == "open")).scalar_one())


def actions_of(store: GuardStore, incident_id: str) -> list[IncidentAction]:
    t = store.controls.actions
    with store.engine.begin() as conn:
        rows = conn.execute(
            select(t).where(t.c.incident_id == check_incident_id(incident_id)).order_by(t.c.seq)
        ).all()
    return [_parse(IncidentAction, r, "incident action") for r in rows]


def incident_status(store: GuardStore, incident_id: str) -> dict[str, Any]:
    """The incident, its whole action log (oldest first) and the check of its hash chain."""
    inc = get_incident(store, incident_id)
    return {
        "incident": inc.public(),
        "actions": [a.public() for a in actions_of(store, inc.id)],
        "log": verify_log(store, inc.id),
    }


def append_action(
    store: GuardStore,
    incident_id: str,
    who: str,
    action: str,
    target: str | None,
    details: dict[str, Any],
) -> IncidentAction:
    """Append one entry to an open incident's log (the log is never updated or deleted)."""
    inc = get_incident(store, incident_id)
    if inc.status != "open" and action != "close":
        raise IncidentClosed(f"incident {incident_id} is closed; open a new one")
    if action not in ACTIONS:
        raise InputError(f"unknown incident action {action!r}")
    values = {
        "incident_id": inc.id,
        "ts": now(),
        "who": check_who(who),
        "action": action,
        "target": target,
        "details": details,
    }
    t, incidents = store.controls.actions, store.controls.incidents
    with store.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE; PostgreSQL: the row lock
        conn.execute(select(incidents.c.id).where(incidents.c.id == inc.id).with_for_update())
        prev = conn.execute(
            select(t.c.hash).where(t.c.incident_id == inc.id).order_by(t.c.seq.desc()).limit(1)
        ).scalar()
        values["hash"] = entry_hash(values, str(prev or ""))
        seq = conn.execute(t.insert().values(**values)).inserted_primary_key[0]  # type: ignore[index]
    rec: IncidentAction = IncidentAction.model_validate({"seq": int(seq), **values})
    return rec


def verify_log(store: GuardStore, incident_id: str) -> dict[str, Any]:
    """Recompute an incident's hash chain: ``ok``, ``entries`` and the first entry (``seq``)
    whose hash does not match (edited, or after a removed or reordered entry)."""
    prev = ""
    actions = actions_of(store, incident_id)
    for a in actions:
        entry = a.model_dump()
        if entry_hash(entry, prev) != a.hash:
            return {"ok": False, "entries": len(actions), "first_bad_seq": a.seq}
        prev = a.hash
    return {"ok": True, "entries": len(actions), "first_bad_seq": None}


def close_incident(store: GuardStore, incident_id: str, *, who: str, summary: str) -> Incident:
    """Close an open incident with a summary (appends ``close``)."""
    inc = get_incident(store, incident_id)
    if inc.status == "closed":
        raise IncidentClosed(f"incident {incident_id} is already closed")
    text = _text(summary, "the summary", 2000)
    append_action(store, inc.id, who, "close", None, {"summary": text})
    t = store.controls.incidents
    with store.engine.begin() as conn:
        conn.execute(
            update(t)
            .where(t.c.id == inc.id)
            .values(status="closed", closed_at=now(), closed_by=check_who(who), summary=text)
        )
    return get_incident(store, inc.id)


def add_note(store: GuardStore, incident_id: str, *, who: str, text: str) -> IncidentAction:
    """A free-text entry in the log (what was seen, decided or handed over)."""
    _open(store, incident_id)
    return append_action(
        store, incident_id, who, "note", None, {"text": _text(text, "the note", 2000)}
    )


def _open(store: GuardStore, incident_id: str) -> Incident:
    inc = get_incident(store, incident_id)
    if inc.status != "open":
        raise IncidentClosed(f"incident {incident_id} is closed; open a new one")
    return inc


def _ttl(ttl_s: int | None) -> timedelta | None:
    if ttl_s is None:
        return None
    if not isinstance(ttl_s, int) or isinstance(ttl_s, bool) or not 1 <= ttl_s <= 10**8:
        raise InputError(f"the TTL must be 1 to 100000000 seconds, got {ttl_s!r}")
    return timedelta(seconds=ttl_s)


# -- actions ---------------------------------------------------------------------------------
def block_client(
    store: GuardStore,
    incident_id: str,
    *,
    who: str,
    client_id: str,
    reason: str = "blocked during an incident",
    ttl_s: int | None = None,
) -> IncidentAction:
    """Block ``client_id`` (403 from the next request on)."""
    _open(store, incident_id)
    check_who(who)
    rec = store.add_block(
        check_client_id(client_id),
        f"incident {incident_id}: {_text(reason, 'reason', 400)}",
        _ttl(ttl_s),
    )
    return append_action(store, incident_id, who, "block-client", client_id, rec.public())


def throttle_client(
    store: GuardStore,
    incident_id: str,
    *,
    who: str,
    client_id: str,
    rate: float | None = None,
    burst: int | None = None,
    ttl_s: int | None = None,
    reason: str = "throttled during an incident",
    clear: bool = False,
) -> IncidentAction:
    """Give ``client_id`` a reduced request rate (``rate`` per second, ``burst`` at once), or
    lift it (``clear``); the guard's limiter applies it from the next request on."""
    _open(store, incident_id)
    check_who(who)
    check_client_id(client_id)
    t = store.controls.client_limits
    if clear:
        with store.engine.begin() as conn:
            n = conn.execute(delete(t).where(t.c.client_id == client_id)).rowcount
        if not n:
            raise InputError(f"client {client_id} is not throttled")
        return append_action(
            store, incident_id, who, "throttle-client", client_id, {"cleared": True}
        )
    if rate is None or burst is None:
        raise InputError("give --rate (requests per second) and --burst, or --clear")
    at = now()
    ttl = _ttl(ttl_s)
    try:
        rec = ClientLimit(
            client_id=client_id,
            rate=rate,
            burst=burst,
            reason=f"incident {incident_id}: {_text(reason, 'reason', 400)}",
            created_at=at,
            expires_at=at + ttl if ttl else None,
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"--{err['loc'][0]}: {err['msg']}") from None
    with store.engine.begin() as conn:
        conn.execute(delete(t).where(t.c.client_id == client_id))
        conn.execute(t.insert().values(**rec.model_dump()))
    return append_action(
        store, incident_id, who, "throttle-client", client_id, rec.model_dump(mode="json")
    )


def isolate_model(
    store: GuardStore,
    incident_id: str,
    *,
    who: str,
    model: str,
    mode: str,
    reason: str = "isolated during an incident",
    has_fallback: bool | None = None,
) -> IncidentAction:
    """Answer every request to ``model`` from the fallback (``fallback``) or refuse it
    (``reject``); ``off`` lifts the isolation. A guard without a fallback rejects instead."""
    _open(store, incident_id)
    check_who(who)
    if mode not in ISOLATION_MODES:
        raise InputError(f"mode must be one of {', '.join(ISOLATION_MODES)}, got {mode!r}")
    name = _text(model, "the model name", 100)
    t = store.controls.isolation
    details: dict[str, Any] = {"mode": mode}
    if mode == "off":
        with store.engine.begin() as conn:
            n = conn.execute(delete(t).where(t.c.model == name)).rowcount
        if not n:
            raise InputError(f"model {name} is not isolated")
        return append_action(store, incident_id, who, "isolate", name, details)
    if mode == "fallback" and has_fallback is False:
        raise InputError("this guard has no fallback model; isolate with --mode reject")
    rec = Isolation(
        model=name,
        mode=mode,  # type: ignore[arg-type]
        reason=f"incident {incident_id}: {_text(reason, 'reason', 400)}",
        created_at=now(),
    )
    with store.engine.begin() as conn:
        conn.execute(delete(t).where(t.c.model == name))
        conn.execute(t.insert().values(**rec.model_dump()))
    return append_action(store, incident_id, who, "isolate", name, rec.model_dump(mode="json"))


def preserve(
    store: GuardStore,
    incident_id: str,
    *,
    who: str,
    since: datetime,
    until: datetime | None = None,
    client_id: str | None = None,
    model: str | None = None,
    hold_days: int | None = None,
    out: Path | None = None,
    fernet: Fernet | None = None,
) -> IncidentAction:
    """Hold the decision records of ``[since, until)`` (of one client and model when given)
    against retention purges (``hold_days``; None: until released), and export them to ``out``
    with a SHA-256 manifest when given (:func:`advguard.guard.preserve.export_folder`)."""
    from advguard.guard.preserve import export_folder, hold_records, select_records

    _open(store, incident_id)
    check_who(who)
    if client_id is not None:
        check_client_id(client_id)
    recs = select_records(store, since=since, until=until, client_id=client_id, model=model)
    held_until = None
    if hold_days is not None:
        if not isinstance(hold_days, int) or not 1 <= hold_days <= 36_500:
            raise InputError(f"--hold-days must be 1 to 36500, got {hold_days!r}")
        held_until = now() + timedelta(days=hold_days)
    details: dict[str, Any] = {
        "since": since.isoformat(),
        "until": until.isoformat() if until else None,
        "client_id": client_id,
        "model": model,
        "held": hold_records(store, incident_id, [r.id for r in recs], held_until),
        "held_until": held_until.isoformat() if held_until else None,
    }
    if out is not None:
        manifest = export_folder(
            recs,
            Path(out),
            fernet=fernet,
            incident_id=incident_id,
            window=(since, until),
            client_id=client_id,
        )
        details["export"] = {
            "out": str(out),
            "records": manifest["records"],
            "rows": manifest["rows"],
            "manifest_sha256": manifest["manifest_sha256"],
        }
    return append_action(store, incident_id, who, "preserve", client_id or model, details)


def rollback(
    store: GuardStore,
    incident_id: str,
    *,
    who: str,
    registry: Any,
    name: str,
    reload: Callable[[str], dict[str, Any]] | None = None,
    served_name: str | None = None,
) -> IncidentAction:
    """Put the registry's previous production version of ``name`` back into production
    (:meth:`advguard.registry.store.Registry.rollback`), then ask the guard to hot-swap it
    (``reload(served_name or name)``, e.g. :func:`request_reload`; ``served_name`` is the name
    in the guard's URLs when it differs from the registry's); without ``reload`` the log says
    the guard still has to be reloaded."""
    _open(store, incident_id)
    check_who(who)
    before = registry.get(f"{name}@production")
    info = registry.rollback(name)
    details: dict[str, Any] = {
        "from_version": int(before.version),
        "to_version": int(info.version),
        "model_digest": info.model_digest,
        "reloaded": False,
    }
    if reload is not None:
        details["reload"] = reload(served_name or name)
        details["reloaded"] = True
    return append_action(store, incident_id, who, "rollback", name, details)


def request_reload(
    guard_url: str, admin_key: str, name: str, *, timeout_s: float = 30.0
) -> dict[str, Any]:
    """``POST {guard_url}/v1/admin/models/{name}/reload`` with the admin key; the guard's JSON
    answer, or InputError with the status and the problem's title (never the key)."""
    import httpx

    from advguard import _safejson

    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", guard_url or ""):
        raise InputError(f"--guard-url must be an http(s) URL, got {guard_url!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise InputError(f"not a model name: {name!r}")
    url = f"{guard_url.rstrip('/')}/v1/admin/models/{name}/reload"
    try:
        resp = httpx.post(url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise InputError(f"cannot reach the guard at {guard_url}: {type(exc).__name__}") from None
    body: Any = None
    if resp.content:
        try:
            body = _safejson.loads(resp.content[:1_000_000], source="the guard's answer")
        except InputError:
            body = None
    if resp.status_code >= 300:
        title = body.get("title") if isinstance(body, dict) else None
        raise InputError(
            f"the guard refused the reload: HTTP {resp.status_code}"
            + (f" ({str(title)[:100]})" if title else "")
        )
    return {"status": resp.status_code, "answer": body if isinstance(body, dict) else None}
