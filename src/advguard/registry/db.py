"""Registry metadata database: SQLAlchemy Core schema, engine set-up and migrations.

SQLite (the default, ``sqlite:///<root>/registry.db``) runs in WAL mode with
``synchronous=FULL``, foreign keys on and a busy timeout; every transaction is
``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing half-way.
PostgreSQL works through a ``postgresql+psycopg://`` URL (extra ``postgres``).
The schema is created and upgraded by Alembic (``upgrade head``) each time a
registry is opened; the migration scripts ship inside the package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

from advguard.errors import InputError, MissingDependencyError

#: Stages a version can be in.
STAGES = ("candidate", "canary", "production", "archived")

#: SQLite busy timeout (ms): how long a writer waits for the lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

#: Largest JSON value (characters) read back from a database column.
MAX_JSON_CHARS = 1 << 20
#: Deepest nesting of arrays/objects accepted in a JSON value read back from the database.
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("format", String(40), nullable=False),
    Column("artifacts", JSON, nullable=False),
    Column("model_digest", String(64), nullable=False),
    Column("input_spec", JSON, nullable=False),
    Column("provenance", JSON, nullable=False),
    Column("stage", String(20), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("signature_path", Text, nullable=True),
    UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
)

reports = Table(
    "reports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("threat_model", String(200), nullable=False),
    Column("report_digest", String(64), nullable=False),
    Column("attestation_path", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

stage_events = Table(
    "stage_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("from_stage", String(20), nullable=True),
    Column("to_stage", String(20), nullable=False),
    Column("reason", String(20), nullable=False),  # push, promote, archive, rollback
    Column("actor", String(200), nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("ts", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(40), nullable=False),
    Column("subject", String(300), nullable=False),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)


def bounded_json_loads(
    text: Any, *, what: str = "a JSON column", max_chars: int = MAX_JSON_CHARS
) -> Any:
    """Parse JSON read back from the registry database, refusing values that are too large
    (:data:`MAX_JSON_CHARS`) or too deeply nested (:data:`MAX_JSON_DEPTH`) *before* parsing.

    The database is untrusted input: anyone with write access to it could plant a value
    built to exhaust memory or the parser's recursion limit.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"the registry database holds {what} that is not UTF-8") from None
    if not isinstance(text, str):
        raise InputError(f"the registry database holds {what} that is not JSON text")
    if len(text) > max_chars:
        raise InputError(
            f"the registry database holds {what} of {len(text)} characters "
            f"(at most {max_chars} are read); the database was edited or is corrupted"
        )
    depth = deepest = 0
    for ch in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise InputError(
            f"the registry database holds {what} nested {deepest} levels deep "
            f"(at most {MAX_JSON_DEPTH}); the database was edited or is corrupted"
        )
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(
            f"the registry database holds {what} that is not valid JSON ({exc})"
        ) from None


#: Execution option for read-only transactions (``engine.connect().execution_options(**{READ_ONLY:
#: True})``): SQLite begins them DEFERRED instead of IMMEDIATE; other databases ignore it.
READ_ONLY = "advguard_read_only"


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred)
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            # a read: WAL gives it a snapshot without the write lock, so it never waits for
            # a writer's commit (fsync)
            conn.exec_driver_sql("BEGIN DEFERRED")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the engine for ``url`` (SQLite gets WAL/FULL/foreign keys/busy timeout)."""
    if url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url[len("postgres://") :]
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                json_deserializer=bounded_json_loads,
            )
            _sqlite_setup(engine)
            return engine
        return create_engine(url, pool_pre_ping=True, json_deserializer=bounded_json_loads)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            exc.name or "psycopg", "postgres", f"The registry database {url.split(':')[0]}"
        ) from exc
    except Exception as exc:  # bad URL syntax, unknown dialect
        raise InputError(f"cannot use registry database URL {url!r}: {exc}") from exc


#: PostgreSQL advisory lock id that serialises concurrent first opens of a registry database.
REGISTRY_LOCK_ID = 7324001


def upgrade(engine: Engine) -> None:
    """Run Alembic ``upgrade head`` on ``engine`` with the packaged migration scripts.

    A database stamped with a revision these scripts do not know (written by a newer
    advguard, or edited) raises :class:`InputError` instead of being touched.
    """
    run_migrations(engine, MIGRATIONS_DIR, lock_id=REGISTRY_LOCK_ID, what="registry database")


def run_migrations(
    engine: Engine,
    script_dir: Path,
    *,
    lock_id: int,
    what: str,
    attributes: dict[str, Any] | None = None,
    version_table: str = "alembic_version",
    adopt: Callable[[Connection, ScriptDirectory], str | None] | None = None,
) -> None:
    """Run Alembic ``upgrade head`` with the migration scripts in ``script_dir`` (shared by
    the registry and the guard), in one transaction.

    On PostgreSQL the transaction first takes advisory lock ``lock_id`` so concurrent first
    opens queue (SQLite's ``BEGIN IMMEDIATE`` does the same). ``attributes`` reach the
    scripts' ``env.py`` through ``config.attributes`` (with ``connection`` and
    ``version_table``, the table that records the revision). When that table does not exist
    yet, ``adopt(connection, scripts)`` may return a revision to stamp first: a database
    created before it used migrations. A database stamped with a revision these scripts do
    not know raises a one-line :class:`InputError` naming ``what``.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError
    from sqlalchemy import inspect

    cfg = Config()
    cfg.set_main_option("script_location", str(script_dir))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # serialise concurrent first opens (advisory lock, released at commit)
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(lock_id)})")
        cfg.attributes.update(attributes or {})
        cfg.attributes["connection"] = conn
        cfg.attributes["version_table"] = version_table
        try:
            if adopt is not None and not inspect(conn).has_table(version_table):
                revision = adopt(conn, ScriptDirectory.from_config(cfg))
                if revision is not None:
                    command.stamp(cfg, revision)
            command.upgrade(cfg, "head")
        except CommandError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"the {what} {engine.url!r} has a schema revision this advguard "
                f"does not know ({first}); was it written by a newer advguard?"
            ) from None
