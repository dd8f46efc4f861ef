"""Engines for the one database URL that picks the backend.

SQLite gets WAL and durable (synchronous=FULL) commits; SQLAlchemy, not the
sqlite3 driver, emits BEGIN so that transactions mean what they say, and the
writer's engine begins with BEGIN IMMEDIATE so concurrent writers (another
process, the rebuild command) queue on SQLite's lock instead of failing late.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


class DatabaseNotMigrated(Exception):
    """The schema is missing: the operator must run `alembic upgrade head`."""


class DatabaseUnavailable(Exception):
    """The database cannot be opened or reached."""


class CommitFailed(Exception):
    """COMMIT itself raised: the transaction may be stored or not. ``result``
    is what the transaction's body returned, to look its outcome up."""

    def __init__(self, result: Any, error: BaseException) -> None:
        super().__init__(f"COMMIT failed: {describe(error)}")
        self.result = result
        self.error = error


# Errors that say the database cannot work right now, whatever was asked of
# it (as opposed to a request it refused): PostgreSQL SQLSTATE classes
# connection exception, insufficient resources (disk full, too many
# connections), operator intervention (shutdown, restart) and system error
# (I/O); SQLite's primary result codes of the same kinds.
_PG_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
_SQLITE_UNAVAILABLE = frozenset(
    {
        "SQLITE_BUSY",  # the busy timeout ran out ("database is locked")
        "SQLITE_LOCKED",
        "SQLITE_FULL",
        "SQLITE_IOERR",
        "SQLITE_CANTOPEN",
        "SQLITE_READONLY",
        "SQLITE_NOMEM",
        "SQLITE_CORRUPT",
        "SQLITE_NOTADB",
        "SQLITE_PROTOCOL",
        "SQLITE_NOLFS",
    }
)


def is_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) means the database is unavailable:
    down, unreachable, out of space or locked, rather than refusing one
    request's statements."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DatabaseUnavailable | OSError | sa.exc.TimeoutError | sa.exc.DisconnectionError):
            return True
        if isinstance(exc, sa.exc.DBAPIError):
            if exc.connection_invalidated:
                return True
            exc = exc.orig
            continue
        if isinstance(exc, sqlite3.Error):
            name = getattr(exc, "sqlite_errorname", "") or ""
            return "_".join(name.split("_")[:2]) in _SQLITE_UNAVAILABLE
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate:
            return sqlstate[:2] in _PG_UNAVAILABLE_CLASSES
        exc = exc.__cause__
    return False


def describe(exc: BaseException) -> str:
    """One line for the log: the driver's error, not SQLAlchemy's statement
    and parameters (a batch's parameters are users' messages)."""
    while isinstance(exc, sa.exc.DBAPIError | CommitFailed):
        inner = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc.error
        if inner is None:
            break
        exc = inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def driver_connection(conn: AsyncConnection) -> Any:
    """The driver's own connection under ``conn`` (asyncpg's, on
    PostgreSQL), found without I/O: for the few statements every append runs,
    which SQLAlchemy's execution machinery would cost several times over."""
    sync = conn.sync_connection
    if sync is None:
        raise sa.exc.InvalidRequestError("the connection is not started")
    return sync.connection.driver_connection


def driver_in_transaction(conn: Any) -> Any:
    """asyncpg's connection under ``conn`` (an ``AsyncConnection`` on
    PostgreSQL) once a transaction has begun on it, else None: the caller
    then goes through SQLAlchemy, whose first statement begins one. (The
    writer begins its own; SQLAlchemy begins lazily.)"""
    if not isinstance(conn, AsyncConnection) or conn.dialect.name != "postgresql":
        return None
    driver = driver_connection(conn)
    return driver if driver.is_in_transaction() else None


def is_sqlite(url: str | sa.URL) -> bool:
    return sa.make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, writer: bool = False, **kwargs: Any) -> AsyncEngine:
    sqlite = is_sqlite(url)
    options: dict[str, Any] = {
        "json_serializer": _json_dumps,
        "json_deserializer": orjson.loads,
    }
    if sqlite and writer:
        if "poolclass" not in kwargs:
            # One connection: appends have one writer (see writer.py).
            options.update(pool_size=1, max_overflow=0)
    elif not sqlite:
        # A restart of the server breaks every pooled connection; without a
        # ping the first request to use one fails although the server is
        # back (the pool only then discards the rest). The cost: one round
        # trip per checkout.
        options.update(pool_pre_ping=True)
    if sqlite and not writer:
        # Reads run in autocommit (each statement sees one WAL snapshot), so
        # a read is one round trip to aiosqlite's thread, not BEGIN, the
        # query and a ROLLBACK when the connection goes back to the pool.
        options.update(pool_reset_on_return=None)
    options.update(kwargs)
    engine = create_async_engine(url, **options)
    if sqlite:
        _configure_sqlite(engine, begin="BEGIN IMMEDIATE" if writer else None)
    return engine


def _configure_sqlite(engine: AsyncEngine, *, begin: str | None) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    if begin is None:
        return

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


def _schema(conn: sa.Connection) -> tuple[set[str], set[str]]:
    inspector = sa.inspect(conn)
    tables = set(inspector.get_table_names())
    columns = {c["name"] for c in inspector.get_columns("events")} if "events" in tables else set()
    return tables, columns


async def check_migrated(engine: AsyncEngine) -> None:
    """Raise DatabaseNotMigrated unless the schema alembic creates is there."""
    try:
        async with engine.connect() as conn:
            names, event_columns = await conn.run_sync(_schema)
    except (OSError, sa.exc.DBAPIError) as exc:
        raise DatabaseUnavailable(f"cannot open the database: {exc}") from exc
    missing = {"alembic_version", "events", "node_leases", "online_users", "projection_positions", "resume_tokens"} - names
    if missing:
        raise DatabaseNotMigrated(
            "the database has no chat schema (missing: "
            + ", ".join(sorted(missing))
            + "); run `alembic upgrade head` first"
        )
    if "command_id" not in event_columns:
        # Migration 0003: the writer stores every event's command id.
        raise DatabaseNotMigrated("the database schema is older than this server; run `alembic upgrade head`")
