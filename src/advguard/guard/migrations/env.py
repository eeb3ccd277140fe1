"""Alembic environment for the guard's tables (run programmatically by
:func:`advguard.guard.storage.migrate`; ``config.attributes`` carry the connection, the
``table_prefix`` and the per-prefix ``version_table``)."""

from __future__ import annotations

from typing import Any

from alembic import context

from advguard.guard.storage import guard_metadata

attributes = context.config.attributes
connection = attributes.get("connection")
if connection is None:  # pragma: no cover - only via advguard.guard.storage.migrate
    raise RuntimeError("run migrations through advguard.guard.storage.migrate(engine, prefix)")
target = guard_metadata(attributes["table_prefix"])


def _ours(name: str | None, type_: str, _parents: Any) -> bool:
    # several guards (other prefixes) and the registry may share the database
    return type_ != "table" or name in target.tables


context.configure(
    connection=connection,
    target_metadata=target,
    version_table=attributes["version_table"],
    include_name=_ours,
)
with context.begin_transaction():
    context.run_migrations()
