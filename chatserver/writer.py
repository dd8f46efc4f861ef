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
aiosqlite. Elsewhere (PostgreSQL) the async engine does the work.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import database
from .events import NewEvent, StoredEvent
from .store import ConcurrencyError, EventStore

log = logging.getLogger(__name__)

InTransaction = Callable[[AsyncConnection, list[StoredEvent]], Awaitable[None]]
OnCommit = Callable[[list[StoredEvent]], None]


class WriterClosed(Exception):
    """The writer is shutting down and takes no more appends."""


_T = TypeVar("_T")


class _ThreadConnection:
    """What the append path uses of an ``AsyncConnection``, over a sync
    ``Connection`` in the writer's thread: its awaits never suspend."""

    def __init__(self, conn: sa.Connection) -> None:
        self.sync_connection = conn
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return self.sync_connection.execute(statement, parameters, **kwargs)

    async def exec_driver_sql(self, statement: str, parameters: Any = None, **kwargs: Any) -> Any:
        return self.sync_connection.exec_driver_sql(statement, parameters, **kwargs)


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
    # The same pragmas and BEGIN IMMEDIATE as the async writer engine.
    database._configure_sqlite(types.SimpleNamespace(sync_engine=sync), begin="BEGIN IMMEDIATE")  # type: ignore[arg-type]
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
            await asyncio.get_running_loop().run_in_executor(self._thread, self._thread_engine.dispose)
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
        with self._thread_engine.begin() as sync_conn:
            conn: Any = _ThreadConnection(sync_conn)
            stored = _run_to_end(self._store.append(conn, events))
            for hook in self._in_transaction:
                _run_to_end(hook(conn, stored))
        return stored

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
