"""The guard's incident-response tables (SQLAlchemy Core, same prefix as the other guard tables):
incidents and their append-only action log, forensic holds, per-client rate overrides and
per-model isolation. Only table definitions live here; :class:`advguard.guard.storage.GuardStore`
creates them with its own tables, and reading/writing them is in :mod:`advguard.guard.storage`
(the hot-path lookups) and :mod:`advguard.guard.incident` (everything else)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import JSON, Column, DateTime, Float, Integer, MetaData, String, Table


@dataclass(frozen=True)
class ControlTables:
    incidents: Table
    actions: Table
    holds: Table
    client_limits: Table
    isolation: Table


def control_tables(prefix: str, md: MetaData) -> ControlTables:
    """The incident-response tables, added to ``md`` (created with the guard's other tables)."""
    incidents = Table(
        f"{prefix}incidents",
        md,
        Column("id", String(16), primary_key=True),
        Column("title", String(200), nullable=False),
        Column("severity", String(8), nullable=False),
        Column("model", String(100), nullable=True),
        Column("status", String(8), nullable=False, index=True),
        Column("opened_at", DateTime(timezone=True), nullable=False),
        Column("opened_by", String(64), nullable=False),
        Column("closed_at", DateTime(timezone=True), nullable=True),
        Column("closed_by", String(64), nullable=True),
        Column("summary", String(2000), nullable=True),
    )
    actions = Table(
        f"{prefix}incident_actions",
        md,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("incident_id", String(16), nullable=False, index=True),
        Column("ts", DateTime(timezone=True), nullable=False),
        Column("who", String(64), nullable=False),
        Column("action", String(32), nullable=False),
        Column("target", String(200), nullable=True),
        Column("details", JSON, nullable=False),
        Column("hash", String(64), nullable=False),  # chained per incident (tamper evidence)
    )
    holds = Table(
        f"{prefix}holds",
        md,
        Column("decision_id", String(32), primary_key=True),
        Column("incident_id", String(16), nullable=False, index=True),
        Column("held_at", DateTime(timezone=True), nullable=False),
        Column("held_until", DateTime(timezone=True), nullable=True),
    )
    client_limits = Table(
        f"{prefix}client_limits",
        md,
        Column("client_id", String(16), primary_key=True),
        Column("rate", Float, nullable=False),
        Column("burst", Integer, nullable=False),
        Column("reason", String(500), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=True),
    )
    isolation = Table(
        f"{prefix}isolation",
        md,
        Column("model", String(100), primary_key=True),
        Column("mode", String(16), nullable=False),
        Column("reason", String(500), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    return ControlTables(incidents, actions, holds, client_limits, isolation)
