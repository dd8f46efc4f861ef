"""The single writer: group commit of appends that arrive together.

Callers ``submit`` synchronously (so the order of submission is the order of
the log) and await the returned future. One task drains everything pending
into one transaction, commits (fsync once for the lot), then hands the stored
events to ``on_commit`` before any future resolves: what is emitted is built
from committed events, in position order.

On a SQLite file the batch's transaction runs in the SQLite writer thread
(``sqlite_writer``); elsewhere (PostgreSQL) the async engine does the work.
Both run the same append body: the store's append, then the in-transaction
hooks (the persisted projections).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .events import NewEvent, StoredEvent
from .metrics import STATS
from .sqlite_writer import SqliteWriterThread
from .store import ConcurrencyError, EventStore

log = logging.getLogger(__name__)

InTransaction = Callable[[AsyncConnection, list[StoredEvent]], Coroutine[Any, Any, None]]
OnCommit = Callable[[list[StoredEvent]], None]


class WriterClosed(Exception):
    """The writer is shutting down and takes no more appends."""


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
        self._sqlite: SqliteWriterThread | None = None
        self.batches = 0  # commits made, for tests and benchmarks

    def start(self) -> None:
        self._sqlite = SqliteWriterThread.for_engine(self._engine)
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
        if self._sqlite is not None:
            await self._sqlite.close()
            self._sqlite = None

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
        started = time.perf_counter()
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
            STATS.database_errors += 1
            log.exception("append failed")
            for request in batch:
                self._fail(request, exc)
            return
        STATS.commit_seconds.observe(time.perf_counter() - started)
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
        if self._sqlite is not None:
            return await self._sqlite.transaction(partial(self._append, events))
        async with self._engine.begin() as conn:
            return await self._append(events, conn)

    async def _append(self, events: list[NewEvent], conn: AsyncConnection) -> list[StoredEvent]:
        stored = await self._store.append(conn, events)
        for hook in self._in_transaction:
            await hook(conn, stored)
        return stored

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
