"""Numbered schema migrations for the conversation store, recorded in `schema_migrations`.

In: an `Engine` (SQLite or PostgreSQL). Out: `migrate(engine, target=None) -> list[int]`, the
versions it applied, in order. Each migration runs in its own transaction together with the row that
records it, so a failing migration leaves neither its half-done DDL nor its version behind
(SQLite and PostgreSQL both have transactional DDL; `memory.db` makes SQLite's driver use it), and
`migrate` raises `MigrationError`. Start-up must stop on that error, never continue on an old schema.

Adding a migration: write `def _m00N_what_it_does(conn)` below the last one and append
`Migration(N, "what it does", _m00N_what_it_does)` to `MIGRATIONS`. Never edit or reorder a migration
that has shipped; databases out there already recorded it. Each migration describes tables as they
were at that version (its own `MetaData`), not by importing the store's current table definitions,
so that replaying old migrations keeps producing old schemas. Keep them portable: Core constructs,
or plain `ALTER TABLE ... ADD COLUMN` that both SQLite and PostgreSQL accept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from memory.db import UTCDateTime, is_sqlite, utcnow, write_transaction

MIGRATIONS_TABLE = "schema_migrations"
# Serialises concurrent `migrate` calls on PostgreSQL (two processes starting at once); SQLite's
# BEGIN IMMEDIATE already does that. Any fixed number works; this one is "asst" in ASCII.
_PG_LOCK_KEY = 0x61737374


class MigrationError(RuntimeError):
    """A migration failed or the requested target makes no sense; the schema was left as it was."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


_meta = sa.MetaData()
schema_migrations = sa.Table(
    MIGRATIONS_TABLE,
    _meta,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)


# ---------------------------------------------------------------------------------------------------
# Migrations. Append only.


def _m001_initial(conn: Connection) -> None:
    """Users, API keys, conversations, messages (content, adapter, generation) and feedback."""
    m = sa.MetaData()
    sa.Table(
        "users", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("role IN ('user', 'admin')", name="ck_users_role"),
    )
    sa.Table(
        "api_keys", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the key
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    sa.Table(
        "conversations", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Index("ix_conversations_user_updated", "user_id", "updated_at"),
    )
    sa.Table(
        "messages", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("adapter", sa.String(200), nullable=True),
        sa.Column("generation", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("role IN ('system', 'user', 'assistant', 'tool')", name="ck_messages_role"),
    )
    sa.Table(
        "feedback", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("rating", sa.Integer, nullable=True),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("corrected", sa.Text, nullable=True),
        sa.Column("other_message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  nullable=True, index=True),
        sa.Column("chosen_message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("kind IN ('thumb', 'edit', 'pair')", name="ck_feedback_kind"),
        sa.CheckConstraint("rating IS NULL OR rating IN (-1, 1)", name="ck_feedback_rating"),
    )
    m.create_all(conn)


def _m002_message_context(conn: Connection) -> None:
    """What produced an answer: cited sources, memories used, agent steps; its status and parent."""
    # ADD COLUMN with a constant default and inline constraints is the subset both backends accept.
    add_column(conn, "messages", "sources", sa.JSON, "NOT NULL DEFAULT '[]'")
    add_column(conn, "messages", "memories", sa.JSON, "NOT NULL DEFAULT '[]'")
    add_column(conn, "messages", "steps", sa.JSON, "NOT NULL DEFAULT '[]'")
    # No CHECK on status: the set of statuses grows (memory.store.MESSAGE_STATUSES validates), and
    # changing a CHECK means rebuilding the table on SQLite.
    add_column(conn, "messages", "status", sa.String(16), "NOT NULL DEFAULT 'complete'")
    add_column(conn, "messages", "parent_id", sa.Integer, "REFERENCES messages (id) ON DELETE SET NULL")


def _m003_synthetic_pairs(conn: Connection) -> None:
    """Teacher-generated question/answer pairs (training/synth.py), accepted or not, with their chunk."""
    m = sa.MetaData()
    sa.Table(
        "messages", m, sa.Column("id", sa.Integer, primary_key=True),
    )
    sa.Table(
        "synthetic_pairs", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),  # "doc": from a chunk; "repair": for a rated-down answer
        sa.Column("teacher", sa.String(200), nullable=False),
        sa.Column("doc_id", sa.String(200), nullable=True, index=True),
        sa.Column("chunk_id", sa.String(200), nullable=True),
        sa.Column("chunk_sha256", sa.String(64), nullable=True),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("question_source", sa.String(16), nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("rejected", sa.Text, nullable=True),
        sa.Column("accepted", sa.Boolean, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("rejected_score", sa.Float, nullable=True),
        sa.Column("judge", sa.JSON, nullable=False),
        # A repair pair dies with the answer it repairs (and so with its conversation).
        sa.Column("target_message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  nullable=True, index=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("kind IN ('doc', 'repair')", name="ck_synthetic_pairs_kind"),
    )
    m.tables["synthetic_pairs"].create(conn)


def _m004_training_loop(conn: Connection) -> None:
    """The retraining loop: jobs and their events, adapter versions, serving history, loop settings."""
    m = sa.MetaData()
    jobs = sa.Table(
        "training_jobs", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=True),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("heartbeat_at", UTCDateTime, nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                           name="ck_training_jobs_status"),
    )
    # One active job per kind, enforced by the database itself (two servers, or a CLI run beside a server).
    active = "status IN ('queued', 'running')"
    sa.Index("ux_training_jobs_one_active", jobs.c.kind, unique=True,
             sqlite_where=sa.text(active), postgresql_where=sa.text(active))
    sa.Index("ix_training_jobs_created", jobs.c.created_at)
    sa.Table(
        "job_events", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    sa.Table(
        "adapter_versions", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("parent", sa.String(64), nullable=True),
        sa.Column("files", sa.JSON, nullable=False),  # path inside the adapter folder -> sha256
        sa.Column("gate", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("training_jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("dataset", sa.String(200), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("deleted_at", UTCDateTime, nullable=True),
        sa.CheckConstraint("gate IN ('passed', 'failed', 'skipped')", name="ck_adapter_versions_gate"),
    )
    sa.Table(
        "adapter_serving", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),  # NULL = the base model
        sa.Column("previous", sa.String(64), nullable=True),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("action IN ('promote', 'rollback')", name="ck_adapter_serving_action"),
    )
    sa.Table(
        "loop_settings", m,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    m.create_all(conn)


def _m005_long_term_memory(conn: Connection) -> None:
    """Per-user long-term memories with supersede lineage, and tombstones of forgotten ones (memory/longterm.py)."""
    m = sa.MetaData()
    sa.Table("users", m, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "memories", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("slot", sa.String(120), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("superseded_by", sa.Integer, sa.ForeignKey("memories.id", ondelete="SET NULL"), nullable=True),
        sa.Column("embedding", sa.LargeBinary, nullable=True),
        sa.Column("embedder", sa.String(200), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("kind IN ('fact', 'preference', 'note')", name="ck_memories_kind"),
        sa.CheckConstraint("status IN ('active', 'superseded')", name="ck_memories_status"),
        sa.Index("ix_memories_user_status", "user_id", "status"),
    )
    sa.Table(
        "memory_tombstones", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("digest", sa.String(64), nullable=False),  # sha256 of a normalised phrase, never the text
        sa.Column("forgotten_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("user_id", "digest", name="uq_memory_tombstones_user_digest"),
    )
    m.tables["memories"].create(conn)
    m.tables["memory_tombstones"].create(conn)


def _m006_user_admin(conn: Connection) -> None:
    """Disabled accounts (a disabled user can neither log in nor use a key) and the audit log of admin actions."""
    add_column(conn, "users", "disabled_at", UTCDateTime)
    m = sa.MetaData()
    sa.Table(
        "admin_audit", m,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("actor", sa.String(100), nullable=False),  # an admin's username, or cli:<os user>
        sa.Column("action", sa.String(32), nullable=False),
        # No foreign key: the record of deleting a user outlives that user.
        sa.Column("target_user_id", sa.Integer, nullable=True, index=True),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    m.tables["admin_audit"].create(conn)


def _m007_imported_messages(conn: Connection) -> None:
    """Which messages a client wrote into its request history rather than this server generating them.

    Imported messages are kept (they are the conversation the user had) but are never rated as answers
    nor trained on. Rows from before this migration are marked by how they were written: a served answer
    always has its question as parent (`Store.add_turn`, a regeneration), and a served question always
    has an answer pointing at it; history an API client sent was stored with neither.
    """
    add_column(conn, "messages", "imported", sa.Boolean, "NOT NULL DEFAULT FALSE")
    conn.exec_driver_sql(
        "UPDATE messages SET imported = TRUE WHERE role = 'assistant' AND parent_id IS NULL")
    conn.exec_driver_sql(
        "UPDATE messages SET imported = TRUE WHERE role = 'user' AND NOT EXISTS "
        "(SELECT 1 FROM messages AS answer WHERE answer.parent_id = messages.id)")


def _m008_personal_adapters(conn: Connection) -> None:
    """Personal adapters: the owner of an adapter version and of a serving event (NULL = the shared adapter),
    and each user's choice to have one, with the feedback id up to which they asked it to forget them."""
    add_column(conn, "adapter_versions", "owner_id", sa.Integer)
    add_column(conn, "adapter_serving", "owner_id", sa.Integer)
    conn.exec_driver_sql("CREATE INDEX ix_adapter_versions_owner ON adapter_versions (owner_id)")
    conn.exec_driver_sql("CREATE INDEX ix_adapter_serving_owner ON adapter_serving (owner_id)")
    m = sa.MetaData()
    sa.Table("users", m, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "personal_settings", m,
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True,
                  autoincrement=False),
        sa.Column("opted_in", sa.Boolean, nullable=False),
        # "Forget what you learned from me": their feedback up to this id is left out of every later build.
        sa.Column("forgotten_through", sa.Integer, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    m.tables["personal_settings"].create(conn)


MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema", _m001_initial),
    Migration(2, "message sources, memories, steps, status, parent", _m002_message_context),
    Migration(3, "synthetic pairs from the teacher", _m003_synthetic_pairs),
    Migration(4, "training jobs, adapter versions, serving history, loop settings", _m004_training_loop),
    Migration(5, "long-term memories and forgotten-memory tombstones", _m005_long_term_memory),
    Migration(6, "disabled users and the admin audit log", _m006_user_admin),
    Migration(7, "messages a client imported as history", _m007_imported_messages),
    Migration(8, "personal adapters: owners of adapter versions and serving events, opt-in", _m008_personal_adapters),
    # Append new migrations here.
]


# ---------------------------------------------------------------------------------------------------
# Helpers for migrations.


def add_column(conn: Connection, table: str, column: str, type_: sa.types.TypeEngine | type,
               constraints: str = "") -> None:
    """`ALTER TABLE table ADD COLUMN column <type compiled for this backend> constraints`."""
    prep = conn.dialect.identifier_preparer
    type_sql = sa.types.to_instance(type_).compile(dialect=conn.dialect)
    conn.exec_driver_sql(
        f"ALTER TABLE {prep.quote(table)} ADD COLUMN {prep.quote(column)} {type_sql} {constraints}".rstrip()
    )


# ---------------------------------------------------------------------------------------------------
# Running them.


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [mig.version for mig in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1..N in order without gaps, got {versions}")


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1].version if migrations else 0


def _applied(conn: Connection) -> set[int]:
    if not sa.inspect(conn).has_table(MIGRATIONS_TABLE):
        return set()
    return set(conn.execute(sa.select(schema_migrations.c.version)).scalars())


def applied_versions(engine: Engine) -> list[int]:
    """Versions recorded in `schema_migrations`, ascending (empty for a fresh database)."""
    with engine.connect() as conn:
        return sorted(_applied(conn))


def current_version(engine: Engine) -> int:
    """Highest recorded version; 0 for a database that was never migrated."""
    return max(applied_versions(engine), default=0)


def _lock(conn: Connection) -> None:
    if not is_sqlite(conn):
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})


def migrate(engine: Engine, target: int | None = None,
            migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply every migration up to `target` (default: the latest) that is not recorded yet.

    Returns the versions applied now (empty when already there). Raises `MigrationError` when a
    migration fails (that migration is rolled back; earlier ones in this call stay committed) or
    when `target` is unknown or below the current version (there are no down-migrations).
    """
    _check_sequence(migrations)
    latest = latest_version(migrations)
    if target is None:
        target = latest
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= latest:
        raise MigrationError(f"unknown target schema version {target!r}; known versions are 0..{latest}")

    with write_transaction(engine) as conn:
        _lock(conn)
        schema_migrations.create(conn, checkfirst=True)
        done = _applied(conn)
    unknown = sorted(v for v in done if v > latest)
    if unknown:
        raise MigrationError(f"database has schema versions {unknown} that this code does not know; "
                             "it was migrated by a newer version of the product")
    if done and max(done) > target:
        raise MigrationError(f"database is at schema version {max(done)}, above target {target}; "
                             "down-migrations are not supported")

    applied: list[int] = []
    for mig in migrations[:target]:
        try:
            with write_transaction(engine) as conn:
                _lock(conn)
                # Re-read inside the lock: another process may have applied it meanwhile.
                if mig.version in _applied(conn):
                    continue
                mig.apply(conn)
                conn.execute(schema_migrations.insert().values(
                    version=mig.version, name=mig.name, applied_at=utcnow()))
        except Exception as exc:
            raise MigrationError(f"schema migration {mig.version} ({mig.name}) failed: {exc}") from exc
        applied.append(mig.version)
    return applied
