"""The guard's tables come from Alembic migrations (src/advguard/guard/migrations): a fresh
database is upgraded to head, one per table prefix, and one created by an earlier advguard
(``metadata.create_all``, no version table) is checked and adopted."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from advguard.errors import InputError
from advguard.guard.storage import (
    MIGRATIONS_DIR,
    DecisionRecord,
    GuardStore,
    guard_metadata,
    now,
    version_table,
)
from advguard.registry import db as registry_db
from guard_helpers import pg_url

HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def _revision(engine: sa.Engine, prefix: str) -> str | None:
    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"version_table": version_table(prefix)})
        return mc.get_current_revision()


def _schema_diff(engine: sa.Engine, md: sa.MetaData) -> list:
    """What autogenerate would change to make the database's tables for ``md`` match it."""

    def ours(name, type_, _parents):
        return type_ != "table" or name in md.tables

    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"include_name": ours, "compare_type": True})
        return compare_metadata(mc, md)


def _decision(i: int) -> DecisionRecord:
    return DecisionRecord(
        id=f"{i:032x}",
        ts=now(),
        key_id="a" * 16,
        model="m",
        version="1",
        action="allow",
        flagged=False,
        forensic=False,
        reasons=[],
        scores={"s": 0.25 * i},
        fingerprint="f" * 64,
        n_rows=1,
        shape=[1, 4],
        latency_ms=1.5,
    )


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _old_way(url: str, prefix: str, *, rollout: bool) -> None:
    """Create the tables as advguard did before migrations: ``create_all`` of the store's
    metadata, no version table (the rollout events table only once a guard had run)."""
    engine = registry_db.make_engine(url)
    md = guard_metadata(prefix)
    tables = [t for t in md.sorted_tables if rollout or not t.name.endswith("rollout_events")]
    md.create_all(engine, tables=tables)
    engine.dispose()


def test_fresh_database_is_at_head_and_matches_the_code(tmp_path):
    assert HEAD == "0001"
    s = GuardStore(f"sqlite:///{tmp_path / 'g.db'}")
    try:
        assert _revision(s.engine, "guard_") == HEAD
        names = set(sa.inspect(s.engine).get_table_names())
        assert names == set(s.metadata.tables) | {"guard_alembic_version"}
        assert len(s.metadata.tables) == 9 and "guard_rollout_events" in names
        # the frozen migration produces exactly what the code defines: no autogenerate diff
        assert _schema_diff(s.engine, s.metadata) == []
        assert _schema_diff(s.engine, guard_metadata("guard_")) == []
        # the check can fail: a column the migration does not create is reported
        md = guard_metadata("guard_")
        md.tables["guard_keys"].append_column(sa.Column("extra", sa.Integer))
        diff = _schema_diff(s.engine, md)
        assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "guard_keys", "extra")]
    finally:
        s.close()
    # opening again finds it at head and leaves it as it is
    s = GuardStore(f"sqlite:///{tmp_path / 'g.db'}")
    s.add_decision(_decision(1))
    assert _revision(s.engine, "guard_") == HEAD and len(list(s.iter_decisions())) == 1
    s.close()


def test_prefixes_and_the_registry_each_have_their_own_version_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = GuardStore(url, table_prefix="a_")
    b = GuardStore(url, table_prefix="b_")
    engine = registry_db.make_engine(url)
    registry_db.upgrade(engine)  # the registry's tables and alembic_version in the same file
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert {"a_alembic_version", "b_alembic_version", "alembic_version"} <= names
        assert _revision(engine, "a_") == HEAD and _revision(engine, "b_") == HEAD
        with engine.connect() as conn:
            registry_rev = MigrationContext.configure(conn).get_current_revision()
        assert registry_rev == ScriptDirectory(str(registry_db.MIGRATIONS_DIR)).get_current_head()
        b.add_decision(_decision(7))
        # dropping one prefix drops its version table too; the other prefix is untouched
        a.drop_all()
        names = set(sa.inspect(engine).get_table_names())
        assert not {n for n in names if n.startswith("a_")}
        assert "b_alembic_version" in names and len(list(b.iter_decisions())) == 1
        a.close()
        a = GuardStore(url, table_prefix="a_")  # recreated from scratch
        assert _revision(engine, "a_") == HEAD and _schema_diff(engine, a.metadata) == []
    finally:
        a.close()
        b.close()
        engine.dispose()


@pytest.mark.parametrize("rollout", [True, False])
def test_database_created_the_old_way_is_adopted_with_its_rows(tmp_path, rollout):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_way(url, "guard_", rollout=rollout)
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute(
        "insert into guard_keys (key_id, name, hash, scopes, created_at) "
        "values ('0123456789abcdef', 'ops', ?, 'predict,admin', '2024-01-02 03:04:05')",
        ("e" * 64,),
    )
    con.commit()
    con.close()
    engine = registry_db.make_engine(url)
    with engine.begin() as conn:
        decisions = guard_metadata("guard_").tables["guard_decisions"]
        conn.execute(decisions.insert(), [_decision(3).model_dump()])
    assert "guard_alembic_version" not in sa.inspect(engine).get_table_names()
    engine.dispose()

    s = GuardStore(url)
    try:
        assert _revision(s.engine, "guard_") == HEAD
        key = s.get_key("0123456789abcdef")
        assert key is not None and key.name == "ops" and key.scopes == ("predict", "admin")
        [d] = s.iter_decisions()
        assert d.id == f"{3:032x}" and d.scores == {"s": 0.75}
        # the lazily created rollout table is there now, and everything matches the code
        assert "guard_rollout_events" in sa.inspect(s.engine).get_table_names()
        assert _schema_diff(s.engine, s.metadata) == []
    finally:
        s.close()


def test_adoption_refuses_a_missing_table_or_a_differing_column(tmp_path):
    # no keys table, but blocks and decisions: not what any advguard created
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    engine = registry_db.make_engine(url)
    md = guard_metadata("guard_")
    md.create_all(engine, tables=[md.tables["guard_blocks"], md.tables["guard_decisions"]])
    with pytest.raises(InputError) as exc:
        GuardStore(url)
    msg = _one_line(exc)
    assert "has no table guard_keys" in msg and "cannot adopt" in msg
    # the database was left as it was (no version table, no other table created)
    assert set(sa.inspect(engine).get_table_names()) == {"guard_blocks", "guard_decisions"}
    engine.dispose()

    def keys_table(md: sa.MetaData, revoked: sa.Column | None, extra: bool) -> None:
        md.remove(md.tables["guard_keys"])
        cols = [
            sa.Column("key_id", sa.String(16), primary_key=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Column("scopes", sa.String(100), nullable=False),
            sa.Column("output", sa.JSON, nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        ]
        cols += [revoked] if revoked is not None else []
        cols += [sa.Column("extra", sa.Integer)] if extra else []
        sa.Table("guard_keys", md, *cols)

    tz = sa.DateTime(timezone=True)
    cases = {
        "same": (sa.Column("revoked_at", tz, nullable=True), False, None),
        "extra": (sa.Column("revoked_at", tz, nullable=True), True, "has a column extra"),
        "no-revoked": (None, False, "has no column revoked_at"),
        "bad-type": (sa.Column("revoked_at", sa.Integer), False, "guard_keys.revoked_at is"),
        "not-null": (sa.Column("revoked_at", tz, nullable=False), False, "does not allow NULL"),
    }
    for name, (revoked, extra, expected) in cases.items():
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
        engine = registry_db.make_engine(url)
        md = guard_metadata("guard_")
        keys_table(md, revoked, extra)
        md.create_all(engine)
        if expected is None:  # the control case: built the same way, it is adopted
            GuardStore(url).close()
            assert _revision(engine, "guard_") == HEAD
        else:
            with pytest.raises(InputError) as exc:
                GuardStore(url)
            msg = _one_line(exc)
            assert expected in msg and "guard_keys" in msg, (name, msg)
            assert "guard_alembic_version" not in sa.inspect(engine).get_table_names()
        engine.dispose()


def test_unknown_revision_is_a_one_line_input_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    GuardStore(url).close()
    con = sqlite3.connect(tmp_path / "g.db")
    con.execute("UPDATE guard_alembic_version SET version_num = 'ffff9999'")
    con.commit()
    con.close()
    with pytest.raises(InputError) as exc:
        GuardStore(url)
    msg = _one_line(exc)
    assert "the guard database" in msg and "ffff9999" in msg and "newer advguard" in msg
    # another prefix in the same file is not affected
    GuardStore(url, table_prefix="other_").close()
    # the registry keeps its own message
    engine = registry_db.make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    registry_db.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'eeee1111'")
    with pytest.raises(InputError) as exc:
        registry_db.upgrade(engine)
    msg = _one_line(exc)
    assert msg.startswith("the registry database") and "eeee1111" in msg
    assert msg.endswith("was it written by a newer advguard?")
    engine.dispose()


def test_postgresql_migrations_prefixes_adoption_and_unknown_revision():
    url = pg_url()
    if url is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 (db test, user postgres) is not reachable")
    tag = f"{random.randrange(16**8):08x}"
    fresh, old = f"gm{tag}_", f"go{tag}_"
    stores: list[GuardStore] = []
    try:
        # concurrent first opens of one fresh prefix queue on the advisory lock
        errors: list[BaseException] = []

        def open_one() -> None:
            try:
                stores.append(GuardStore(url, table_prefix=fresh))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=open_one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(stores) == 3
        s = stores[0]
        assert s.engine.dialect.name == "postgresql"
        assert _revision(s.engine, fresh) == HEAD
        assert _schema_diff(s.engine, s.metadata) == []

        # a database created the old way, with a row, is adopted
        _old_way(url, old, rollout=False)
        engine = registry_db.make_engine(url)
        with engine.begin() as conn:
            decisions = guard_metadata(old).tables[f"{old}decisions"]
            conn.execute(decisions.insert(), [_decision(5).model_dump()])
        assert version_table(old) not in sa.inspect(engine).get_table_names()
        engine.dispose()
        o = GuardStore(url, table_prefix=old)
        stores.append(o)
        assert _revision(o.engine, old) == HEAD
        assert [d.id for d in o.iter_decisions()] == [f"{5:032x}"]
        assert _schema_diff(o.engine, o.metadata) == []
        assert _revision(o.engine, fresh) == HEAD  # the other prefix is untouched

        # an unknown revision
        with o.engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE {version_table(old)} SET version_num = 'ffff9999'")
        with pytest.raises(InputError) as exc:
            GuardStore(url, table_prefix=old)
        msg = _one_line(exc)
        assert "ffff9999" in msg and "newer advguard" in msg
    finally:
        for s in stores:
            s.drop_all()
            s.close()
        if not stores or stores[-1].table_prefix != old:  # adoption failed before opening
            engine = registry_db.make_engine(url)
            guard_metadata(old).drop_all(engine)
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {version_table(old)}")
            engine.dispose()
        engine = registry_db.make_engine(url)
        left = [n for n in sa.inspect(engine).get_table_names() if tag in n]
        engine.dispose()
        assert left == []


def test_migrations_ship_as_package_data():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["advguard"]
    pkg = root / "src" / "advguard"
    shipped = {p for pat in patterns for p in pkg.glob(pat)}
    needed = set((pkg / "guard" / "migrations").rglob("*.py")) | {
        pkg / "guard" / "migrations" / "script.py.mako"
    }
    assert len(needed) >= 3 and needed <= shipped
