"""The single writer: group commit of appends that arrive together.

Callers ``submit`` synchronously (so the order of submission is the order of
the log) and await the returned future. One task drains everything pending
into one transaction, commits (fsync once for the lot), then hands the stored
events to ``on_commit`` before any future resolves: what is emitted is built
from committed events, in position order.

On a SQLite file the batch's transaction runs in one thread of its own on a
plain ``sqlite3`` connection (same pragmas: WAL, synchronous=FULL, BEGIN
IMMEDIATE), the same async store and projection code driven to its end
there: one hand-off per batch instead of a thread hop per statement through
aiosqlite. Their statements are compiled once and run on the driver itself
(see ``_ThreadConnection``). Elsewhere (PostgreSQL) the async engine does
the work.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from . import database
from .events import NewEvent, StoredEvent
from .store import ConcurrencyError, EventStore

log = logging.getLogger(__name__)

InTransaction = Callable[[AsyncConnection, list[StoredEvent]], Coroutine[Any, Any, None]]
OnCommit = Callable[[list[StoredEvent]], None]


class WriterClosed(Exception):
    """The writer is shutting down and takes no more appends."""


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

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise sa.exc.InvalidRequestError(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]


class _ThreadConnection:
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


def _run_sql(db: sqlite3.Connection, sql: str) -> None:
    try:
        db.execute(sql)
    except sqlite3.Error as exc:
        raise _translate(sql, (), exc) from exc


def _run_to_end(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends (its awaits are ``_ThreadConnection``'s)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("an append step waited on the event loop; it cannot run in the writer thread")


def _sqlite_file_engine(engine: AsyncEngine) -> sa.Engine | None:
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
    # The same pragmas as the async writer engine; the writer thread issues
    # BEGIN IMMEDIATE itself.
    database._configure_sqlite(types.SimpleNamespace(sync_engine=sync), begin=None)  # type: ignore[arg-type]
    return sync


@dataclass(slots=True)
class _Request:
    events: Sequence[NewEvent]
    future: asyncio.Future[list[StoredEvent]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EventWriter:
    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        *,
        in_transaction: Sequence[InTransaction] = (),
        on_commit: OnCommit | None = None,
        max_batch: int = 512,
    ) -> None:
        self._store = store
        self._engine = engine
        self._in_transaction = list(in_transaction)
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._pending: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._thread_engine: sa.Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._thread_db: sa.PoolProxiedConnection | None = None
        self._prepared: dict[Any, _Prepared] = {}
        self.batches = 0  # commits made, for tests and benchmarks

    def start(self) -> None:
        self._thread_engine = _sqlite_file_engine(self._engine)
        if self._thread_engine is not None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-writer")
        self._task = asyncio.create_task(self._run(), name="event-writer")

    def submit(self, events: Sequence[NewEvent]) -> asyncio.Future[list[StoredEvent]]:
        if self._closed:
            raise WriterClosed("the server is shutting down")
        request = _Request(events)
        self._pending.append(request)
        self._wakeup.set()
        return request.future

    async def append(self, events: Sequence[NewEvent]) -> list[StoredEvent]:
        return await self.submit(events)

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._thread is not None and self._thread_engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._thread_close)
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let appends submitted in this same loop turn join the batch.
            await asyncio.sleep(0)
            batch = self._pending[: self._max_batch]
            del self._pending[: len(batch)]
            try:
                await self._commit(batch)
            except Exception:  # pragma: no cover - the loop must survive anything
                log.exception("event writer failed a batch")

    async def _commit(self, batch: list[_Request]) -> None:
        try:
            stored = await self._transaction([e for r in batch for e in r.events])
        except ConcurrencyError:
            if len(batch) == 1:
                self._fail(batch[0], ConcurrencyError("stream version taken"))
                return
            # Someone in the batch lost a race: retry one by one so only the
            # losers fail.
            for request in batch:
                await self._commit([request])
            return
        except Exception as exc:
            log.exception("append failed")
            for request in batch:
                self._fail(request, exc)
            return
        if self._on_commit is not None:
            self._on_commit(stored)
        offset = 0
        for request in batch:
            n = len(request.events)
            if not request.future.done():
                request.future.set_result(stored[offset : offset + n])
            offset += n
        self.batches += 1

    async def _transaction(self, events: list[NewEvent]) -> list[StoredEvent]:
        if self._thread is not None:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._thread_transaction, events)
        async with self._engine.begin() as conn:
            stored = await self._store.append(conn, events)
            for hook in self._in_transaction:
                await hook(conn, stored)
        return stored

    def _thread_transaction(self, events: list[NewEvent]) -> list[StoredEvent]:
        assert self._thread_engine is not None
        if self._thread_db is None:
            # Opened in the writer thread and kept for the writer's life.
            self._thread_db = self._thread_engine.raw_connection()
        db = cast(sqlite3.Connection, self._thread_db.driver_connection)
        conn: Any = _ThreadConnection(db, self._thread_engine.dialect, self._prepared)
        _run_sql(db, "BEGIN IMMEDIATE")
        try:
            stored = _run_to_end(self._store.append(conn, events))
            for hook in self._in_transaction:
                _run_to_end(hook(conn, stored))
            _run_sql(db, "COMMIT")
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        return stored

    def _thread_close(self) -> None:
        if self._thread_db is not None:
            self._thread_db.close()
            self._thread_db = None
        if self._thread_engine is not None:
            self._thread_engine.dispose()

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
