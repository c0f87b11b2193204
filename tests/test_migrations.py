"""Schema migrations on real SQLite and (when ASSISTANT_TEST_PG_URL is set) real PostgreSQL:
from empty, from the previous version with data, idempotence, failures, concurrency."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from memory import schema
from memory.db import UTCDateTime, create_engine, write_transaction
from memory.migrations import (
    MIGRATIONS,
    MIGRATIONS_TABLE,
    Migration,
    MigrationError,
    add_column,
    applied_versions,
    current_version,
    latest_version,
    migrate,
)
from memory.store import Store
from tests.conftest import fast_password_hasher

LATEST = latest_version()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, settings) -> str:
    if request.param == "sqlite":
        return settings.db_url
    return request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url):
    eng = create_engine(db_url)
    yield eng
    eng.dispose()


def table_names(engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def recorded(engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT version, name FROM schema_migrations ORDER BY version")]


def test_from_empty_to_latest(engine):
    assert LATEST >= 2 and current_version(engine) == 0 and applied_versions(engine) == []
    assert migrate(engine) == list(range(1, LATEST + 1))
    assert current_version(engine) == LATEST
    assert recorded(engine) == [(m.version, m.name) for m in MIGRATIONS]
    assert table_names(engine) >= {"schema_migrations", "users", "api_keys", "conversations", "messages",
                                   "feedback"}
    with engine.connect() as conn:
        applied_at = conn.execute(sa.select(sa.column("applied_at", UTCDateTime))
                                  .select_from(sa.table("schema_migrations"))).scalars().all()
    assert len(applied_at) == LATEST and all(t.tzinfo is not None for t in applied_at)


def test_migrate_twice_is_a_no_op(engine):
    migrate(engine)
    before = recorded(engine)
    assert migrate(engine) == []
    assert migrate(engine, target=LATEST) == []
    assert recorded(engine) == before


def test_step_by_step(engine):
    assert migrate(engine, target=0) == []
    assert migrate(engine, target=1) == [1]
    assert current_version(engine) == 1
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    assert "content" in columns and "sources" not in columns
    assert migrate(engine) == list(range(2, LATEST + 1))


def test_current_tables_match_migrated_schema(engine):
    """memory.schema and the migrations describe the same tables, columns and foreign keys."""
    migrate(engine)
    with engine.connect() as conn:
        insp = sa.inspect(conn)
        assert set(insp.get_table_names()) - {MIGRATIONS_TABLE} == set(schema.metadata.tables)
        for table in schema.metadata.sorted_tables:
            db_cols = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
            code_cols = {c.name: c.nullable for c in table.columns}
            assert db_cols == code_cols, table.name
            code_fks = {(fk.parent.name, fk.column.table.name, fk.ondelete or "NO ACTION")
                        for fk in table.foreign_keys}
            assert foreign_keys(conn, table.name) == code_fks, table.name


def foreign_keys(conn, table: str) -> set[tuple[str, str, str]]:
    """(column, referred table, ON DELETE action) of each foreign key, as the database has them."""
    if conn.dialect.name == "sqlite":
        # SQLAlchemy's SQLite reflection misses ON DELETE on inline `REFERENCES` (as migration 2's
        # ADD COLUMN writes them); SQLite's own pragma reports what it enforces.
        return {(r[3], r[2], r[6]) for r in conn.exec_driver_sql(f"PRAGMA foreign_key_list({table})")}
    return {(fk["constrained_columns"][0], fk["referred_table"], fk["options"].get("ondelete", "NO ACTION"))
            for fk in sa.inspect(conn).get_foreign_keys(table)}


# The v1 schema as the data of a v1 installation was written (migration 1's columns only).
_v1 = sa.MetaData()
v1_users = sa.Table("users", _v1, sa.Column("id", sa.Integer, primary_key=True), sa.Column("username", sa.String),
                    sa.Column("password_hash", sa.String), sa.Column("role", sa.String),
                    sa.Column("created_at", UTCDateTime))
v1_conversations = sa.Table("conversations", _v1, sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("user_id", sa.Integer), sa.Column("title", sa.String),
                            sa.Column("source", sa.String), sa.Column("created_at", UTCDateTime),
                            sa.Column("updated_at", UTCDateTime))
v1_messages = sa.Table("messages", _v1, sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("conversation_id", sa.Integer), sa.Column("role", sa.String),
                       sa.Column("content", sa.Text), sa.Column("adapter", sa.String),
                       sa.Column("generation", sa.JSON), sa.Column("created_at", UTCDateTime))
v1_feedback = sa.Table("feedback", _v1, sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("user_id", sa.Integer), sa.Column("message_id", sa.Integer),
                       sa.Column("kind", sa.String), sa.Column("rating", sa.Integer),
                       sa.Column("reason", sa.String), sa.Column("created_at", UTCDateTime))


def test_data_written_at_v1_survives_migration(db_url, engine):
    assert migrate(engine, target=1) == [1]
    t0 = datetime(2026, 5, 1, 12, 30, tzinfo=UTC)
    password_hash = fast_password_hasher().hash("old-pw")
    with write_transaction(engine) as conn:
        uid = conn.execute(v1_users.insert().values(username="old", password_hash=password_hash, role="user",
                                                    created_at=t0).returning(v1_users.c.id)).scalar()
        cid = conn.execute(v1_conversations.insert().values(
            user_id=uid, title="from v1", source="ui", created_at=t0, updated_at=t0,
        ).returning(v1_conversations.c.id)).scalar()
        conn.execute(v1_messages.insert().values(conversation_id=cid, role="user", content="hi", adapter=None,
                                                 generation={}, created_at=t0))
        mid = conn.execute(v1_messages.insert().values(
            conversation_id=cid, role="assistant", content="hello", adapter="v0",
            generation={"temperature": 0.2}, created_at=t0,
        ).returning(v1_messages.c.id)).scalar()
        conn.execute(v1_feedback.insert().values(user_id=uid, message_id=mid, kind="thumb", rating=-1,
                                                 reason="wrong", created_at=t0))
    engine.dispose()

    with Store(db_url, password_hasher=fast_password_hasher()) as store:
        assert store.schema_version() == 1
        assert store.migrate() == list(range(2, LATEST + 1))
        user = store.authenticate("old", "old-pw")
        assert user is not None and user.created_at == t0
        assert store.get_conversation(cid, user.id).title == "from v1"
        question, answer = store.messages(cid)
        assert (answer.content, answer.adapter, answer.generation, answer.created_at) == (
            "hello", "v0", {"temperature": 0.2}, t0)
        # New columns got their defaults.
        assert (answer.sources, answer.memories, answer.steps, answer.status, answer.parent_id) == (
            [], [], [], "complete", None)
        assert [(f.rating, f.reason) for f in store.feedback_for_message(mid)] == [(-1, "wrong")]
        # And the migrated database works like a new one.
        _, new_answer = store.add_turn(cid, "again", "with sources", sources=[{"doc": "a"}])
        assert store.get_message(new_answer.id).sources == [{"doc": "a"}]
        assert store.counts()["thumbs_down"] == 1
        assert store.integrity_check() is True


def _create_then_fail(conn) -> None:
    conn.execute(sa.text("CREATE TABLE half_done (id INTEGER PRIMARY KEY)"))
    add_column(conn, "messages", "half_column", sa.Integer)
    raise RuntimeError("boom")


def _bad_sql(conn) -> None:
    conn.execute(sa.text("ALTER TABLE no_such_table ADD COLUMN x INTEGER"))


@pytest.mark.parametrize("broken", [_create_then_fail, _bad_sql])
def test_broken_migration_raises_and_changes_nothing(engine, broken):
    migrate(engine)
    before = recorded(engine)
    extended = [*MIGRATIONS, Migration(LATEST + 1, "broken", broken)]
    with pytest.raises(MigrationError, match=f"migration {LATEST + 1} \\(broken\\)"):
        migrate(engine, migrations=extended)
    assert recorded(engine) == before
    assert current_version(engine) == LATEST
    # Its DDL was rolled back with it (transactional DDL on both backends).
    assert "half_done" not in table_names(engine)
    with engine.connect() as conn:
        assert "half_column" not in {c["name"] for c in sa.inspect(conn).get_columns("messages")}


def test_store_open_fails_loudly_on_unknown_newer_schema(db_url, engine):
    migrate(engine)
    with write_transaction(engine) as conn:
        conn.exec_driver_sql(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'from the future', "
            "CURRENT_TIMESTAMP)")
    with pytest.raises(MigrationError, match="newer version"):
        Store.open(db_url)


def test_bad_targets_and_sequences(engine):
    migrate(engine)
    for target in (LATEST + 1, -1, "2", True):
        with pytest.raises(MigrationError):
            migrate(engine, target=target)
    with pytest.raises(MigrationError, match="down-migrations"):
        migrate(engine, target=1)
    gap = [MIGRATIONS[0], Migration(3, "gap", lambda conn: None)]
    with pytest.raises(MigrationError, match="without gaps"):
        migrate(engine, migrations=gap)
    assert current_version(engine) == LATEST


def test_concurrent_migrate_applies_each_version_once(db_url):
    """Two processes starting at once (separate engines) must not both run a migration."""
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        eng = create_engine(db_url)
        try:
            barrier.wait()
            results.append(migrate(eng))
        except BaseException as exc:  # collected and re-raised by the assertions below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v for r in results for v in r) == list(range(1, LATEST + 1))
    eng = create_engine(db_url)
    assert current_version(eng) == LATEST
    eng.dispose()
