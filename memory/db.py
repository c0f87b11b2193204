"""Database engines for the conversation store: SQLite by default, PostgreSQL by URL.

In: a SQLAlchemy URL (`sqlite:///path/assistant.db`, `postgresql+psycopg://user:pw@host/db`).
Out: a configured `Engine`, plus two helpers every writer uses: `write_transaction(engine)` and the
`UTCDateTime` column type (timezone-aware UTC datetimes on both backends).

SQLite is set up for a server that writes from several threads and processes at once (API, UI,
training worker): WAL journal (readers never block the writer), foreign keys on (SQLite leaves
them off per connection by default, which would silently skip our ON DELETE CASCADEs), and a busy
timeout so a second writer waits instead of failing with "database is locked".
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

DEFAULT_BUSY_TIMEOUT_MS = 10_000


def normalize_url(url: str) -> str:
    """Make plain `postgresql://` / `postgres://` URLs use psycopg 3 (psycopg2 is not a dependency)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("database URL must be a non-empty string")
    url = url.strip()
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def create_engine(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS, echo: bool = False) -> Engine:
    """An engine for `url`; nothing is created in the database (see `memory.migrations.migrate`)."""
    try:
        parsed = sa.engine.make_url(normalize_url(url))
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"invalid database URL {url!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, busy_timeout_ms, echo)
    if backend == "postgresql":
        # pre_ping: a long-running server outlives PostgreSQL restarts and idle-connection reaping.
        return sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite:/// or postgresql+psycopg://")


def _sqlite_engine(parsed: sa.URL, busy_timeout_ms: int, echo: bool) -> Engine:
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in database
    kwargs: dict[str, Any] = {}
    if in_memory:
        # One shared connection, or every thread would see its own empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif not database.startswith("file:"):
        path = Path(database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        make_private(path)
    engine = sa.create_engine(parsed, echo=echo, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it skips BEGIN before DDL and SELECT), so that a
        # migration's DDL and its version row commit or roll back together. SQLAlchemy's documented
        # recipe; `_on_begin` below emits the BEGIN instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if not in_memory:
                mode = _enter_wal(cur, busy_timeout_ms)
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"SQLite refused WAL journal mode (got {mode!r}) for {database}")
                # NORMAL is the documented safe pairing with WAL: no corruption, fewer fsyncs.
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # Deleted conversations and forgotten memories are overwritten on disk, not left in free pages.
            cur.execute("PRAGMA secure_delete=ON")
        finally:
            cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers ask for IMMEDIATE: they take the write lock up front and wait (busy_timeout) for it.
        # A DEFERRED transaction that reads and then writes fails at once with SQLITE_BUSY when
        # another writer got there first, and busy_timeout cannot help with that upgrade.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


PRIVATE_MODE = 0o600


def make_private(path: Path) -> None:
    """Create the database file as owner-only (0600), or narrow an existing one of ours to that.

    The database holds every conversation, password hash and key hash; the default umask made it 0644,
    readable by every account on the machine. SQLite creates the -wal and -shm files with the main
    file's permissions, so they follow; any left from an earlier run are narrowed here too. Files of
    another owner are left alone (we could not change them, and they are not ours to change).
    """
    fd = os.open(path, os.O_CREAT | os.O_RDONLY, PRIVATE_MODE)  # O_CREAT applies the mode to a new file
    os.close(fd)
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(p, PRIVATE_MODE)


def _enter_wal(cur: Any, busy_timeout_ms: int) -> str:
    """`PRAGMA journal_mode=WAL`, retried while another connection holds the file.

    Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "database is locked"
    at once there instead of calling the busy handler: two processes opening a new database together
    (server and training worker, or two test engines) hit it. WAL is stored in the file, so the
    retry usually finds it already set by the other connection.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            return cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction that commits on success and rolls back on any error."""
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so values are stored as naive UTC
    and marked UTC again on the way out. Naive datetimes are refused on the way in: guessing their
    zone is how timestamps silently shift by hours.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
