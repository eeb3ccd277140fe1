"""Alembic environment for the advguard registry (run programmatically by db.upgrade)."""

from __future__ import annotations

from alembic import context

from advguard.registry.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via advguard.registry.db.upgrade
    raise RuntimeError("run migrations through advguard.registry.db.upgrade(engine)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=context.config.attributes.get("version_table", "alembic_version"),
)
with context.begin_transaction():
    context.run_migrations()
