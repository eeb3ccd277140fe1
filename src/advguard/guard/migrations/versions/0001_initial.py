"""Initial guard schema: keys, blocks, decisions, incident response, rollout events.

Every table name starts with the guard's ``table_prefix`` (``config.attributes``). The
definitions are frozen here: later schema changes are new revisions, never edits to this one.
:func:`advguard.guard.storage.migrate` also reads :func:`tables` to check a database that an
earlier advguard created without migrations before stamping it at this revision.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def tables(prefix: str) -> sa.MetaData:
    """This revision's tables for ``prefix``."""
    md = sa.MetaData()
    _guard_tables(prefix, md)
    _incident_tables(prefix, md)
    return md


def _guard_tables(prefix: str, md: sa.MetaData) -> None:
    """Keys, blocks, decisions and rollout events."""
    sa.Table(
        f"{prefix}keys",
        md,
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(100), nullable=False),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
    )
    sa.Table(
        f"{prefix}blocks",
        md,
        sa.Column("client_id", sa.String(16), primary_key=True),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=True),
    )
    sa.Table(
        f"{prefix}decisions",
        md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ts", TZ, nullable=False, index=True),
        sa.Column("key_id", sa.String(16), nullable=False, index=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("forensic", sa.Boolean, nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("n_rows", sa.Integer, nullable=False),
        sa.Column("shape", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=True),
        sa.Column("payload_encrypted", sa.Boolean, nullable=False),
        sa.Column("review_status", sa.String(16), nullable=True, index=True),
        sa.Column("reviewed_at", TZ, nullable=True),
        sa.Column("review_note", sa.String(500), nullable=True),
    )
    sa.Table(
        f"{prefix}rollout_events",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", TZ, nullable=False, index=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("production_version", sa.String(200), nullable=False),
        sa.Column("canary_version", sa.String(200), nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )


def _incident_tables(prefix: str, md: sa.MetaData) -> None:
    """The incident-response tables."""
    sa.Table(
        f"{prefix}incidents",
        md,
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("model", sa.String(100), nullable=True),
        sa.Column("status", sa.String(8), nullable=False, index=True),
        sa.Column("opened_at", TZ, nullable=False),
        sa.Column("opened_by", sa.String(64), nullable=False),
        sa.Column("closed_at", TZ, nullable=True),
        sa.Column("closed_by", sa.String(64), nullable=True),
        sa.Column("summary", sa.String(2000), nullable=True),
    )
    sa.Table(
        f"{prefix}incident_actions",
        md,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("incident_id", sa.String(16), nullable=False, index=True),
        sa.Column("ts", TZ, nullable=False),
        sa.Column("who", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("details", sa.JSON, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    sa.Table(
        f"{prefix}holds",
        md,
        sa.Column("decision_id", sa.String(32), primary_key=True),
        sa.Column("incident_id", sa.String(16), nullable=False, index=True),
        sa.Column("held_at", TZ, nullable=False),
        sa.Column("held_until", TZ, nullable=True),
    )
    sa.Table(
        f"{prefix}client_limits",
        md,
        sa.Column("client_id", sa.String(16), primary_key=True),
        sa.Column("rate", sa.Float, nullable=False),
        sa.Column("burst", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=True),
    )
    sa.Table(
        f"{prefix}isolation",
        md,
        sa.Column("model", sa.String(100), primary_key=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )


def _prefix() -> str:
    config = op.get_context().config
    if config is None or not isinstance(config.attributes.get("table_prefix"), str):
        raise RuntimeError("the guard migrations need config.attributes['table_prefix']")
    return str(config.attributes["table_prefix"])


def upgrade() -> None:
    tables(_prefix()).create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    tables(_prefix()).drop_all(op.get_bind(), checkfirst=False)
