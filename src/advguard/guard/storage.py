"""The guard's database: API keys (hashes only), blocked clients, decisions and forensic records.

SQLAlchemy Core on an embedded SQLite file by default (WAL, ``synchronous=FULL``, every
transaction ``BEGIN IMMEDIATE``; the engine set-up is the registry's), or PostgreSQL through a
``postgresql+psycopg://`` URL. Every table name starts with ``table_prefix`` so several guards
(or tests) can share one database. The tables are created and upgraded by the Alembic scripts
in ``migrations/`` (:func:`migrate`, on every open; one version table per prefix), and a
database created by an earlier advguard without them is checked and adopted. Rows read back
are validated like any other input: a row that breaks the schema raises :class:`StoreCorrupt`
instead of being trusted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    event,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from advguard.errors import AdvguardError, InputError
from advguard.guard.controls import control_tables

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

SCOPES = ("predict", "admin")
KEY_ID_RE = r"^[0-9a-f]{16}$"
DECISION_ID_RE = r"^[0-9a-f]{32}$"
REVIEW_STATES = ("pending", "approved", "rejected")
#: Execution option of decision-record writes (they leave :attr:`GuardStore.generation` as is).
_DECISIONS = "advguard_decision_records"


class StoreCorrupt(AdvguardError):
    """A row read back from the guard database breaks its schema (never trusted)."""


def now() -> datetime:
    return datetime.now(UTC)


def _aware(ts: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything is stored in UTC
    if ts is None:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


class OutputPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["probabilities", "top_k", "label"] = "probabilities"
    top_k: int = Field(default=1, ge=1, le=1000)
    decimals: int | None = Field(default=None, ge=0, le=8)


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key_id: str = Field(pattern=KEY_ID_RE)
    name: str = Field(max_length=200)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    scopes: tuple[Literal["predict", "admin"], ...]
    output: OutputPolicy | None = None
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self) -> dict[str, Any]:
        """What ``keys list`` shows: never the hash."""
        return {
            "key_id": self.key_id,
            "name": self.name,
            "scopes": list(self.scopes),
            "output": self.output.model_dump() if self.output else None,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class BlockRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=KEY_ID_RE)
    reason: str = Field(max_length=500)
    created_at: datetime
    expires_at: datetime | None = None

    def active(self, at: datetime) -> bool:
        return self.expires_at is None or self.expires_at > at

    def public(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


class DecisionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=DECISION_ID_RE)
    ts: datetime
    key_id: str = Field(pattern=KEY_ID_RE)
    model: str = Field(max_length=100)
    version: str = Field(max_length=200)
    action: Literal["allow", "fallback", "review", "reject", "block"]
    flagged: bool
    forensic: bool
    reasons: list[str] = Field(max_length=64)
    scores: dict[str, list[float] | float | None]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    n_rows: int = Field(ge=0)
    shape: list[int] = Field(max_length=8)
    latency_ms: float = Field(ge=0)
    payload: bytes | None = Field(default=None, repr=False)
    payload_encrypted: bool = False
    review_status: Literal["pending", "approved", "rejected"] | None = None
    reviewed_at: datetime | None = None
    review_note: str | None = Field(default=None, max_length=500)

    def public(self) -> dict[str, Any]:
        """The record without its payload (what the API and ``review list`` show)."""
        out = self.model_dump(exclude={"payload"})
        out["ts"] = self.ts.isoformat()
        out["reviewed_at"] = self.reviewed_at.isoformat() if self.reviewed_at else None
        out["payload_stored"] = self.payload is not None
        return out


class ClientLimit(BaseModel):
    """A reduced request rate for one client (``advguard incident throttle-client``)."""

    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=KEY_ID_RE)
    rate: float = Field(gt=0, le=1e6)
    burst: int = Field(ge=1, le=10**7)
    reason: str = Field(max_length=500)
    created_at: datetime
    expires_at: datetime | None = None

    def active(self, at: datetime) -> bool:
        return self.expires_at is None or self.expires_at > at


class Isolation(BaseModel):
    """All of a model's traffic answered by the fallback or rejected (``incident isolate``)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=100)
    mode: Literal["fallback", "reject"]
    reason: str = Field(max_length=500)
    created_at: datetime


@dataclass(frozen=True)
class ClientState:
    """What every request of one client reads: its key, its block and its incident throttle
    (each block and throttle possibly expired: check ``active`` at the time of use)."""

    key: KeyRecord
    block: BlockRecord | None
    limit: ClientLimit | None


def _tables(prefix: str) -> tuple[MetaData, Table, Table, Table]:
    md = MetaData()
    keys = Table(
        f"{prefix}keys",
        md,
        Column("key_id", String(16), primary_key=True),
        Column("name", String(200), nullable=False),
        Column("hash", String(64), nullable=False),
        Column("scopes", String(100), nullable=False),
        Column("output", JSON, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("revoked_at", DateTime(timezone=True), nullable=True),
    )
    blocks = Table(
        f"{prefix}blocks",
        md,
        Column("client_id", String(16), primary_key=True),
        Column("reason", String(500), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=True),
    )
    decisions = Table(
        f"{prefix}decisions",
        md,
        Column("id", String(32), primary_key=True),
        Column("ts", DateTime(timezone=True), nullable=False, index=True),
        Column("key_id", String(16), nullable=False, index=True),
        Column("model", String(100), nullable=False),
        Column("version", String(200), nullable=False),
        Column("action", String(16), nullable=False),
        Column("flagged", Boolean, nullable=False),
        Column("forensic", Boolean, nullable=False),
        Column("reasons", JSON, nullable=False),
        Column("scores", JSON, nullable=False),
        Column("fingerprint", String(64), nullable=False),
        Column("n_rows", Integer, nullable=False),
        Column("shape", JSON, nullable=False),
        Column("latency_ms", Float, nullable=False),
        Column("payload", LargeBinary, nullable=True),
        Column("payload_encrypted", Boolean, nullable=False),
        Column("review_status", String(16), nullable=True, index=True),
        Column("reviewed_at", DateTime(timezone=True), nullable=True),
        Column("review_note", String(500), nullable=True),
    )
    rollout_events_table(prefix, md)
    return md, keys, blocks, decisions


def rollout_events_table(prefix: str, md: MetaData) -> Table:
    """The rollout events table (read and written by advguard.guard.rollout.RolloutEvents),
    added to ``md``."""
    return Table(
        f"{prefix}rollout_events",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("ts", DateTime(timezone=True), nullable=False, index=True),
        Column("model", String(100), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("reason", String(200), nullable=False),
        Column("production_version", String(200), nullable=False),
        Column("canary_version", String(200), nullable=True),
        Column("detail", JSON, nullable=False),
    )


def guard_metadata(prefix: str) -> MetaData:
    """Every guard table for ``prefix``, as this code defines it (what the migrations must
    produce; the test suite compares the two)."""
    md = _tables(prefix)[0]
    control_tables(prefix, md)
    return md


#: The guard's Alembic migration scripts (shipped inside the package).
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: PostgreSQL advisory lock id that serialises concurrent first opens of a guard database.
GUARD_LOCK_ID = 7324013
#: The revision a database created by an earlier advguard (``create_all``, no version table)
#: is stamped at once its tables are checked.
ADOPTED_REVISION = "0001"
#: Tables every earlier advguard created together on first open. The others came later
#: (incident response) or were created on first use (rollout events), so adoption creates
#: them when they are absent.
_CORE_TABLES = ("keys", "blocks", "decisions")


def version_table(prefix: str) -> str:
    """The table recording the guard schema's Alembic revision for ``prefix`` (one per prefix,
    so guards sharing a database, and the registry's ``alembic_version``, never collide)."""
    return f"{prefix}alembic_version"


def migrate(engine: Engine, prefix: str) -> None:
    """Bring the guard tables for ``prefix`` to the newest schema (Alembic ``upgrade head``),
    adopting a database created by an earlier advguard first (see :func:`_adopt`)."""
    from advguard.registry.db import run_migrations

    def adopt(conn: Connection, scripts: ScriptDirectory) -> str | None:
        return _adopt(conn, scripts, prefix)

    run_migrations(
        engine,
        MIGRATIONS_DIR,
        lock_id=GUARD_LOCK_ID,
        what="guard database",
        attributes={"table_prefix": prefix},
        version_table=version_table(prefix),
        adopt=adopt,
    )


def _adopt(conn: Connection, scripts: ScriptDirectory, prefix: str) -> str | None:
    """A database without a version table: None when it holds none of this prefix's guard
    tables (a fresh one: upgrade from scratch); otherwise one that an earlier advguard created
    with ``create_all``. Its tables are checked against revision :data:`ADOPTED_REVISION`'s
    (a missing core table, or a column that differs, raises a one-line :class:`InputError`),
    tables added since are created, and it is stamped at that revision."""
    frozen: MetaData = scripts.get_revision(ADOPTED_REVISION).module.tables(prefix)
    present = set(inspect(conn).get_table_names())
    if not present & set(frozen.tables):
        return None
    where = f"the guard database {conn.engine.url!r} (created by an earlier advguard)"
    for name in _CORE_TABLES:
        if f"{prefix}{name}" not in present:
            raise InputError(f"{where} has no table {prefix}{name}; cannot adopt it")
    problems = _differences(conn, frozen)
    if problems:
        raise InputError(f"{where}: {problems[0]}; cannot adopt it")
    frozen.create_all(conn, tables=[t for t in frozen.sorted_tables if t.name not in present])
    return ADOPTED_REVISION


def _differences(conn: Connection, frozen: MetaData) -> list[str]:
    """The column differences between the database's tables and ``frozen``'s (only tables
    both have; indexes and defaults are not compared, as ``create_all`` never changed them)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def include(name: str | None, type_: str, _parents: Any) -> bool:
        return type_ != "table" or name in frozen.tables

    mc = MigrationContext.configure(conn, opts={"include_name": include, "compare_type": True})
    out = []
    for diff in compare_metadata(mc, frozen):
        for op in diff if isinstance(diff, list) else [diff]:
            kind = op[0]
            if kind == "add_column":
                out.append(f"table {op[2]} has no column {op[3].name}")
            elif kind == "remove_column":
                out.append(f"table {op[2]} has a column {op[3].name} this advguard does not know")
            elif kind == "modify_type":
                out.append(f"column {op[2]}.{op[3]} is {op[5]}, not {op[6]}")
            elif kind == "modify_nullable":
                allowed = "allows" if op[5] else "does not allow"
                out.append(f"column {op[2]}.{op[3]} {allowed} NULL, unlike this advguard's")
    return out


class _Row:
    """A row's columns, shaped like a SQLAlchemy row for :meth:`GuardStore._parse`."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping


class GuardStore:
    """Keys, blocks and decisions in one SQL database (see the module docstring)."""

    def __init__(self, url: str, *, table_prefix: str = "guard_") -> None:
        from advguard.registry.db import make_engine

        try:
            self.engine: Engine = make_engine(url)
        except InputError as e:
            raise InputError(str(e).replace("registry database", "guard database")) from None
        #: Bumped by every transaction this store's engine commits, except reads and decision
        #: records: keys, blocks, throttles, isolations, incidents. A cache of what requests
        #: read (:class:`advguard.guard.controlcache.ControlCache`) drops its entries when it
        #: changes, so a change made through this process is seen by its next request.
        self.generation = 0
        event.listen(self.engine, "commit", self._on_commit)
        self.metadata, self.keys, self.blocks, self.decisions = _tables(table_prefix)
        self.table_prefix = table_prefix
        self.controls = control_tables(table_prefix, self.metadata)  # incident response
        try:
            migrate(self.engine, table_prefix)
        except InputError:
            self.engine.dispose()
            raise
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise InputError(
                f"cannot open the guard database {self.engine.url!r}: "
                f"{type(getattr(exc, 'orig', exc) or exc).__name__}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    def _on_commit(self, conn: Connection) -> None:
        from advguard.registry.db import READ_ONLY

        opts = conn.get_execution_options()
        if not (opts.get(READ_ONLY) or opts.get(_DECISIONS)):
            self.generation += 1

    def drop_all(self) -> None:
        """Drop this guard's tables and its migration version table (tests and
        ``purge --all``)."""
        with self.engine.begin() as conn:
            self.metadata.drop_all(conn)
            version = Table(version_table(self.table_prefix), MetaData(), Column("v", String(32)))
            version.drop(conn, checkfirst=True)

    # -- validation of rows read back -------------------------------------------------
    @staticmethod
    def _parse(model: type[BaseModel], row: Any, what: str) -> Any:
        data = dict(row._mapping)
        for k, v in data.items():
            if isinstance(v, datetime):
                data[k] = _aware(v)
        if "scopes" in data and isinstance(data["scopes"], str):
            data["scopes"] = tuple(s for s in data["scopes"].split(",") if s)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise StoreCorrupt(
                f"the guard database holds a bad {what} row (field {field})"
            ) from None

    # -- keys -------------------------------------------------------------------------------
    def add_key(
        self,
        key_id: str,
        name: str,
        digest: str,
        scopes: Sequence[str],
        output: OutputPolicy | None = None,
    ) -> KeyRecord:
        rec = KeyRecord(
            key_id=key_id,
            name=name,
            hash=digest,
            scopes=tuple(scopes),  # type: ignore[arg-type]
            output=output,
            created_at=now(),
        )
        with self.engine.begin() as conn:
            conn.execute(
                self.keys.insert().values(
                    key_id=rec.key_id,
                    name=rec.name,
                    hash=rec.hash,
                    scopes=",".join(rec.scopes),
                    output=rec.output.model_dump() if rec.output else None,
                    created_at=rec.created_at,
                )
            )
        return rec

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(select(self.keys).where(self.keys.c.key_id == key_id)).first()
        return None if row is None else self._parse(KeyRecord, row, "key")

    def list_keys(self) -> list[KeyRecord]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(self.keys).order_by(self.keys.c.created_at)).all()
        return [self._parse(KeyRecord, r, "key") for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(
                update(self.keys)
                .where(self.keys.c.key_id == key_id, self.keys.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
        return bool(res.rowcount)

    # -- blocks -----------------------------------------------------------------------------
    def add_block(self, client_id: str, reason: str, ttl: timedelta | None = None) -> BlockRecord:
        at = now()
        rec = BlockRecord(
            client_id=client_id,
            reason=reason[:500],
            created_at=at,
            expires_at=at + ttl if ttl else None,
        )
        with self.engine.begin() as conn:
            conn.execute(delete(self.blocks).where(self.blocks.c.client_id == client_id))
            conn.execute(self.blocks.insert().values(**rec.model_dump()))
        return rec

    def remove_block(self, client_id: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(delete(self.blocks).where(self.blocks.c.client_id == client_id))
        return bool(res.rowcount)

    def get_block(self, client_id: str) -> BlockRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(self.blocks).where(self.blocks.c.client_id == client_id)
            ).first()
        if row is None:
            return None
        rec: BlockRecord = self._parse(BlockRecord, row, "block")
        return rec if rec.active(now()) else None

    def list_blocks(self) -> list[BlockRecord]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(self.blocks).order_by(self.blocks.c.created_at)).all()
        at = now()
        return [b for b in (self._parse(BlockRecord, r, "block") for r in rows) if b.active(at)]

    # -- decisions --------------------------------------------------------------------------
    def add_decision(self, rec: DecisionRecord) -> None:
        """Insert (committed when this returns)."""
        self.add_decisions([rec])

    def add_decisions(self, recs: Sequence[DecisionRecord]) -> None:
        """Insert several records in one transaction (committed when this returns)."""
        if not recs:
            return
        rows = [r.model_dump() for r in recs]
        with self.engine.connect().execution_options(**{_DECISIONS: True}) as conn, conn.begin():
            conn.execute(self.decisions.insert(), rows)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only transaction: with SQLite it begins DEFERRED, so the reads on every
        request (key, block, throttle, isolation) do not queue behind decision writes."""
        from advguard.registry.db import READ_ONLY

        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin():
            yield conn

    def get_key_and_block(self, key_id: str) -> tuple[KeyRecord | None, BlockRecord | None]:
        """The key ``key_id`` and its client's active block, read in one read-only
        transaction (with SQLite it does not wait for writers)."""
        state = self.client_state(key_id)
        if state is None:
            return None, None
        block = state.block
        return state.key, block if block is not None and block.active(now()) else None

    def client_state(self, key_id: str) -> ClientState | None:
        """The key ``key_id``, its client's block and incident throttle (whether active or
        expired: the caller checks at the time of use), in one query of one read-only
        transaction (with SQLite it does not wait for writers). None: no such key."""
        k, b, t = self.keys, self.blocks, self.controls.client_limits
        q = (
            select(
                k,
                *(c.label(f"block_{c.name}") for c in b.columns),
                *(c.label(f"limit_{c.name}") for c in t.columns),
            )
            .select_from(
                k.outerjoin(b, b.c.client_id == k.c.key_id).outerjoin(
                    t, t.c.client_id == k.c.key_id
                )
            )
            .where(k.c.key_id == key_id)
        )
        with self.reading() as conn:
            joined = conn.execute(q).first()
        if joined is None:
            return None
        data = dict(joined._mapping)
        krow = _Row({c.name: data[c.name] for c in k.columns})
        key: KeyRecord = self._parse(KeyRecord, krow, "key")
        block, limit = None, None
        if data["block_client_id"] is not None:
            brow = _Row({c.name: data[f"block_{c.name}"] for c in b.columns})
            block = self._parse(BlockRecord, brow, "block")
        if data["limit_client_id"] is not None:
            lrow = _Row({c.name: data[f"limit_{c.name}"] for c in t.columns})
            limit = self._parse(ClientLimit, lrow, "client limit")
        return ClientState(key, block, limit)

    def get_decision(self, decision_id: str) -> DecisionRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(self.decisions).where(self.decisions.c.id == decision_id)
            ).first()
        return None if row is None else self._parse(DecisionRecord, row, "decision")

    def iter_decisions(
        self,
        *,
        since: datetime | None = None,
        forensic_only: bool = False,
        review_status: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        flagged_only: bool = False,
        newest_first: bool = False,
    ) -> Iterator[DecisionRecord]:
        ts = self.decisions.c.ts
        q = select(self.decisions).order_by(ts.desc() if newest_first else ts)
        if flagged_only:
            q = q.where(self.decisions.c.flagged.is_(True))
        if since is not None:
            q = q.where(self.decisions.c.ts >= since)
        if forensic_only:
            q = q.where(self.decisions.c.forensic.is_(True))
        if review_status is not None:
            q = q.where(self.decisions.c.review_status == review_status)
        if model is not None:
            q = q.where(self.decisions.c.model == model)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.begin() as conn:
            rows = conn.execute(q).all()
        for r in rows:
            yield self._parse(DecisionRecord, r, "decision")

    def set_review(self, decision_id: str, status: str, note: str | None = None) -> bool:
        if status not in ("approved", "rejected"):
            raise InputError(f"review status must be approved or rejected, got {status!r}")
        with self.engine.begin() as conn:
            res = conn.execute(
                update(self.decisions)
                .where(
                    self.decisions.c.id == decision_id,
                    self.decisions.c.review_status == "pending",
                )
                .values(review_status=status, reviewed_at=now(), review_note=note)
            )
        return bool(res.rowcount)

    def purge(self, older_than: datetime) -> int:
        """Delete decisions (and their payloads) recorded before ``older_than``, except those an
        incident holds (``advguard incident preserve``) until their hold ends."""
        h = self.controls.holds
        held = select(h.c.decision_id).where(or_(h.c.held_until.is_(None), h.c.held_until > now()))
        with self.engine.begin() as conn:
            res = conn.execute(
                delete(self.decisions).where(
                    self.decisions.c.ts < older_than, self.decisions.c.id.not_in(held)
                )
            )
        return int(res.rowcount or 0)

    # -- incident-response overrides (read on every request) -------------------------------
    def client_limit(self, client_id: str) -> ClientLimit | None:
        """The active reduced rate of ``client_id``, if an incident set one."""
        t = self.controls.client_limits
        with self.reading() as conn:
            row = conn.execute(select(t).where(t.c.client_id == client_id)).first()
        if row is None:
            return None
        rec: ClientLimit = self._parse(ClientLimit, row, "client limit")
        return rec if rec.active(now()) else None

    def isolation(self, model: str) -> Isolation | None:
        """How ``model`` is isolated, if an incident isolated it."""
        t = self.controls.isolation
        with self.reading() as conn:
            row = conn.execute(select(t).where(t.c.model == model)).first()
        return None if row is None else self._parse(Isolation, row, "isolation")
