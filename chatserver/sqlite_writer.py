"""The SQLite writer thread: the writer's transactions on a SQLite file, run
one at a time on one ``sqlite3`` connection in a thread of their own.

One hand-off per batch instead of a thread hop per statement through
aiosqlite. The connection has the writer engine's pragmas (WAL,
synchronous=FULL) and each transaction begins with BEGIN IMMEDIATE. The body
is the same async append code the PostgreSQL path awaits, driven to its end
here: its awaits are ``ThreadConnection``'s, which never suspend. Its
statements are compiled once and run on the driver itself: SQLAlchemy's
execution machinery cost several times what SQLite spends on these small
statements, all of it holding the GIL while the event loop waits to fan out.
"""

from __future__ import annotations

import asyncio
import sqlite3
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from . import database

_T = TypeVar("_T")


class _Prepared:
    """A statement compiled once for SQLite: its SQL text and, for each
    positional parameter, the caller's key, the bind processor SQLAlchemy
    would apply (JSON, DateTime) and the value of a bind the caller does not
    pass (a literal inside the statement)."""

    __slots__ = ("binds", "sql")

    def __init__(self, statement: sa.ClauseElement, keys: Sequence[str], dialect: sa.Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
        if not compiled.positional or compiled.positiontup is None:
            raise RuntimeError("the SQLite dialect compiles positional parameters")
        self.sql = str(compiled)
        self.binds = [
            (
                name,
                compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect),
                compiled.binds[name].effective_value,
            )
            for name in compiled.positiontup
        ]

    def row(self, parameters: Mapping[str, Any]) -> tuple[Any, ...]:
        values = []
        for name, process, default in self.binds:
            value = parameters.get(name, default)
            values.append(value if process is None else process(value))
        return tuple(values)


class _Result:
    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self._rows

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise sa.exc.InvalidRequestError(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]


class ThreadConnection:
    """What the append path uses of an ``AsyncConnection``, on the writer
    thread's sqlite3 connection: its awaits never suspend.

    Statements are compiled once and run on the DB-API cursor. SQLAlchemy's
    execution machinery costs several times what SQLite spends on these
    small statements, and the thread holds the GIL all that while, which
    delays the event loop's fan-out. Results are the driver's plain values:
    the append path reads back integers only.
    """

    def __init__(self, db: sqlite3.Connection, dialect: sa.Dialect, prepared: dict[Any, _Prepared]) -> None:
        self._db = db
        self._dialect = dialect
        self._prepared = prepared

    async def execute(self, statement: sa.ClauseElement, parameters: Any = None) -> _Result:
        many = isinstance(parameters, list)
        rows: list[Mapping[str, Any]] = parameters if many else [parameters or {}]
        keys = tuple(rows[0]) if rows else ()
        key = (statement, keys)
        prepared = self._prepared.get(key)
        if prepared is None:
            if len(self._prepared) >= _MAX_PREPARED:
                self._prepared.clear()
            # The statement itself is part of the key: kept alive, its id is never reused.
            prepared = self._prepared[key] = _Prepared(statement, keys, self._dialect)
        values = [prepared.row(row) for row in rows]
        try:
            if many:
                cursor = self._db.executemany(prepared.sql, values)
            else:
                cursor = self._db.execute(prepared.sql, values[0])
            fetched = cursor.fetchall() if cursor.description is not None else []
        except sqlite3.Error as exc:
            raise _translate(prepared.sql, values, exc) from exc
        return _Result(fetched, cursor.rowcount)


_MAX_PREPARED = 64


def _translate(sql: str, parameters: Any, exc: sqlite3.Error) -> sa.exc.StatementError:
    """The SQLAlchemy exception the async path would raise (IntegrityError...)."""
    return sa.exc.DBAPIError.instance(sql, parameters, exc, sqlite3.Error)


_BROKEN = frozenset({"SQLITE_IOERR", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL", "SQLITE_NOMEM"})


def _broken_connection(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, sqlite3.Error):
            name = getattr(exc, "sqlite_errorname", "") or ""
            return "_".join(name.split("_")[:2]) in _BROKEN
        exc = exc.__cause__
    return False


def _run_sql(db: sqlite3.Connection, sql: str) -> None:
    try:
        db.execute(sql)
    except sqlite3.Error as exc:
        raise _translate(sql, (), exc) from exc


def _run_to_end(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends (its awaits are ``ThreadConnection``'s)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("an append step waited on the event loop; it cannot run in the writer thread")


def sqlite_file_engine(engine: AsyncEngine) -> sa.Engine | None:
    """A sync pysqlite engine on the same SQLite file, configured like the
    writer's async engine; None when ``engine`` is not a SQLite file."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or "mode=memory" in str(url):
        return None
    sync = sa.create_engine(
        url.set(drivername="sqlite+pysqlite"),
        poolclass=sa.pool.QueuePool,
        pool_size=1,
        max_overflow=0,
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
    )
    # The same pragmas as the async writer engine; the thread issues BEGIN
    # IMMEDIATE itself.
    database._configure_sqlite(types.SimpleNamespace(sync_engine=sync), begin=None)  # type: ignore[arg-type]
    return sync


class SqliteWriterThread:
    """Runs transaction bodies on one sqlite3 connection, in one thread."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-writer")
        self._db: sa.PoolProxiedConnection | None = None
        self._prepared: dict[Any, _Prepared] = {}

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> SqliteWriterThread | None:
        """One on the same file as ``engine``; None unless it is a SQLite file."""
        sync = sqlite_file_engine(engine)
        return None if sync is None else cls(sync)

    async def transaction(self, body: Callable[[Any], Coroutine[Any, Any, _T]]) -> _T:
        """``body(conn)`` in one committed transaction; rolled back if it raises."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, body)

    def _run(self, body: Callable[[Any], Coroutine[Any, Any, _T]]) -> _T:
        if self._db is None:
            # Opened in the thread and kept for the writer's life.
            self._db = self._engine.raw_connection()
        db = cast(sqlite3.Connection, self._db.driver_connection)
        conn = ThreadConnection(db, self._engine.dialect, self._prepared)
        try:
            _run_sql(db, "BEGIN IMMEDIATE")
            try:
                result = _run_to_end(body(conn))
            except BaseException:
                self._rollback(db)
                raise
            try:
                _run_sql(db, "COMMIT")
            except Exception as exc:
                # SQLite rolls back a COMMIT that fails (or leaves the
                # transaction open, and this rolls it back); the caller still
                # looks the outcome up: a failed fsync can leave a commit
                # record in the WAL that later readers honour.
                self._rollback(db)
                raise database.CommitFailed(result, exc) from exc
        except Exception as exc:
            if _broken_connection(exc):
                # After an I/O error the connection is not trusted again: the
                # next transaction opens a fresh one. (A full disk or a busy
                # timeout leaves it sound, and keeps its settings.)
                self._drop()
            raise
        return result

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            try:
                db.rollback()
            except sqlite3.Error:
                pass  # the connection is dropped by the caller if unusable

    def _drop(self) -> None:
        if self._db is not None:
            try:
                self._db.invalidate()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass
            self._db = None

    async def run_statement(self, sql: str) -> list[tuple[Any, ...]]:
        """One statement on the writer's own connection, outside any
        transaction, in its thread: for per-connection settings (``PRAGMA
        max_page_count`` in the full-disk tests) and diagnostics."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._statement, sql)

    def _statement(self, sql: str) -> list[tuple[Any, ...]]:
        if self._db is None:
            self._db = self._engine.raw_connection()
        db = cast(sqlite3.Connection, self._db.driver_connection)
        return db.execute(sql).fetchall()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._engine.dispose()
