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

On PostgreSQL, appends submitted while a batch's BEGIN waits for the log's
lock (another process is appending) join that batch.

On a log several processes share, ``read_preceding`` reads in the same
transaction, under the log's lock, what the others appended before the batch
that this process has not seen yet; ``on_preceding`` gets it just before
``on_commit`` gets the batch, so delivery sends both in one write per socket
(and the follower need not read them separately). ``busy`` tells the
follower an append is on its way, and ``batch_done`` when it is over.

Every request fails alone. ``submit`` encodes its events (``store.encode``)
and refuses what cannot be stored there and then, so a batch holds only rows
an insert accepts. A batch that fails anyway for a reason that is not the
database being unavailable is retried one request at a time, so only the
culprit fails. When the database is unavailable each batch fails its
requests with ``DatabaseUnavailable`` and the writer carries on; the outage
is logged once when it starts and once when a batch commits again.

Commands have ids (``NewEvent.command_id``). A client-supplied id (one with a
"/") already in the log is not appended again: the request resolves to the
original events, marked ``duplicate``. The check runs inside the append
transaction, under the log's write lock, so two retries racing each other
(or two processes) cannot both append. When COMMIT fails so that its outcome
is unknown (the connection dropped), the writer looks the batch up before
answering: stored, it resolves as committed; not stored, it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .database import CommitFailed, DatabaseUnavailable, describe, driver_connection, is_unavailable
from .events import NewEvent, StoredEvent
from .metrics import STATS
from .sqlite_writer import SqliteWriterThread
from .store import BEGIN_LOCKED, ConcurrencyError, EncodedEvent, EventStore, UnencodableEvent, encode

log = logging.getLogger(__name__)

InTransaction = Callable[[AsyncConnection, list[StoredEvent]], Coroutine[Any, Any, None]]
OnCommit = Callable[[list[StoredEvent]], None]
# Reads, in an append's transaction, what other processes appended before
# the batch's first position that this process has not yet seen.
ReadPreceding = Callable[[AsyncConnection, int], Coroutine[Any, Any, list[StoredEvent]]]

__all__ = [
    "Appended",
    "CommitOutcomeUnknown",
    "ConcurrencyError",
    "DatabaseUnavailable",
    "EventWriter",
    "UnencodableEvent",
    "WriterClosed",
    "is_client_command",
]

# How long a batch whose COMMIT outcome is unknown waits for the database to
# answer the lookup before its requests fail. Long enough for a PostgreSQL
# restart or fail-over; the writer commits nothing else meanwhile, since
# later batches must not be published before it.
OUTCOME_TIMEOUT = 30.0


class WriterClosed(Exception):
    """The writer is shutting down and takes no more appends."""


class CommitOutcomeUnknown(DatabaseUnavailable):
    """COMMIT failed and the database did not answer the lookup in time: the
    events may or may not be stored."""


def is_client_command(command_id: str | None) -> bool:
    """Whether an id was supplied by a client (``"<sender>/<client id>"``):
    only those can come back in a retry, so only those are looked up."""
    return command_id is not None and "/" in command_id


class Appended(list[StoredEvent]):
    """What a request's future resolves to: its events as the log holds them.

    ``duplicate`` is True when the log already held the request's
    client-supplied command id (or an earlier request of the same batch had
    it): nothing was appended and these are the original events, which were
    handed to ``on_commit`` when they were stored; do not publish them again.
    """

    __slots__ = ("duplicate",)

    def __init__(self, events: Iterable[StoredEvent] = (), *, duplicate: bool = False) -> None:
        super().__init__(events)
        self.duplicate = duplicate


@dataclass(slots=True)
class _Request:
    rows: list[EncodedEvent]
    command_id: str | None
    future: asyncio.Future[Appended] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(slots=True)
class _Outcome:
    """What one batch's transaction did: the events it appended (the fresh
    requests', in order), and for each duplicate request (by index in the
    batch) its original events or the index of the request it copies."""

    fresh: list[int]
    stored: list[StoredEvent]
    originals: dict[int, list[StoredEvent]]
    copies: dict[int, int]
    # Other processes' events just before ``stored`` (see ``read_preceding``).
    preceding: list[StoredEvent] = field(default_factory=list)


class EventWriter:
    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        *,
        in_transaction: Sequence[InTransaction] = (),
        on_commit: OnCommit | None = None,
        read_preceding: ReadPreceding | None = None,
        on_preceding: OnCommit | None = None,
        max_batch: int = 512,
        outcome_timeout: float = OUTCOME_TIMEOUT,
    ) -> None:
        self._store = store
        self._engine = engine
        self._in_transaction = list(in_transaction)
        self._on_commit = on_commit
        self._read_preceding = read_preceding
        self._on_preceding = on_preceding
        self._max_batch = max_batch
        self._outcome_timeout = outcome_timeout
        self._pending: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._sqlite: SqliteWriterThread | None = None
        self._conn: AsyncConnection | None = None  # kept between batches (PostgreSQL)
        self._failed_batches = 0  # in the current outage
        self._committing = False
        # Called after every batch, committed or not (the follower's cue).
        self.batch_done: Callable[[], None] = lambda: None
        self.batches = 0  # commits made, for tests and benchmarks

    @property
    def sqlite_thread(self) -> SqliteWriterThread | None:
        """The SQLite writer thread, once started on a SQLite file."""
        return self._sqlite

    def start(self) -> None:
        self._sqlite = SqliteWriterThread.for_engine(self._engine)
        self._task = asyncio.create_task(self._run(), name="event-writer")

    def busy(self) -> bool:
        """Whether a batch is pending or committing (``batch_done`` follows)."""
        return self._committing or bool(self._pending)

    def submit(self, events: Sequence[NewEvent]) -> asyncio.Future[Appended]:
        """Queue one command's events for the next batch.

        Raises, before queueing anything: ``UnencodableEvent`` for an event
        no database could store, ``ValueError`` when the events carry
        different command ids, ``WriterClosed`` when shutting down. The
        future resolves to ``Appended`` or fails with ``ConcurrencyError``
        (a stream version was taken), ``DatabaseUnavailable`` (not stored:
        the database was unavailable; ``CommitOutcomeUnknown`` when even the
        lookup after a lost COMMIT got no answer) or another error that
        this request alone caused.
        """
        if self._closed:
            raise WriterClosed("the server is shutting down")
        rows = [encode(e) for e in events]
        ids = {r.command_id for r in rows}
        if len(ids) > 1:
            raise ValueError("the events of one command carry one command id")
        request = _Request(rows, ids.pop() if ids else None)
        self._pending.append(request)
        self._wakeup.set()
        return request.future

    async def append(self, events: Sequence[NewEvent]) -> Appended:
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
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await _close_quietly(conn)

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
            self._committing = True
            try:
                await self._commit(batch)
            except Exception as exc:  # pragma: no cover - the loop must survive anything
                log.exception("event writer failed a batch")
                for request in batch:
                    self._fail(request, exc)
            finally:
                self._committing = False
                self.batch_done()

    async def _commit(self, batch: list[_Request], *, retry: bool = False) -> None:
        started = time.perf_counter()
        try:
            outcome = await self._transaction(batch, join=not retry)
        except CommitFailed as lost:
            resolved = await self._resolve(batch, lost)
            if resolved is None:
                return
            outcome = resolved
        except Exception as exc:
            if is_unavailable(exc):
                self._outage(exc)
                for request in batch:
                    self._fail(request, _chained(DatabaseUnavailable(f"database unavailable: {describe(exc)}"), exc))
                return
            if len(batch) > 1:
                # Someone in the batch lost a race, or made the transaction
                # fail in a way encoding did not foresee: one by one, so only
                # the culprits fail.
                for request in batch:
                    await self._commit([request], retry=True)
                return
            if not isinstance(exc, ConcurrencyError):
                log.error("append of one command failed: %s", describe(exc), exc_info=exc)
            self._fail(batch[0], exc)
            return
        STATS.commit_seconds.observe(time.perf_counter() - started)
        self._committed(batch, outcome)

    def _committed(self, batch: list[_Request], outcome: _Outcome) -> None:
        if self._failed_batches:
            log.warning("database available again after %d failed batches", self._failed_batches)
            self._failed_batches = 0
        if outcome.preceding and self._on_preceding is not None:
            self._on_preceding(outcome.preceding)
        if outcome.stored and self._on_commit is not None:
            self._on_commit(outcome.stored)
        results: dict[int, Appended] = {}
        offset = 0
        for index in outcome.fresh:
            n = len(batch[index].rows)
            results[index] = Appended(outcome.stored[offset : offset + n])
            offset += n
        for index, original in outcome.originals.items():
            results[index] = Appended(original, duplicate=True)
        for index, first in outcome.copies.items():
            results[index] = Appended(results[first], duplicate=True)
        for index, request in enumerate(batch):
            if not request.future.done():
                request.future.set_result(results[index])
        self.batches += 1

    def _outage(self, exc: BaseException) -> None:
        STATS.database_errors += 1
        self._failed_batches += 1
        if self._failed_batches == 1:
            log.error("database unavailable: %s", describe(exc))

    async def _resolve(self, batch: list[_Request], lost: CommitFailed) -> _Outcome | None:
        """The outcome of a batch whose COMMIT failed, looked up; None when
        the requests were failed (not stored, or no answer in time)."""
        outcome: _Outcome = lost.result
        if not outcome.stored:
            # Only duplicates: nothing was to be written, the answer stands.
            return outcome
        self._outage(lost.error)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._outcome_timeout
        delay = 0.05
        while True:
            try:
                remaining = max(deadline - loop.time(), 0.001)
                held = await asyncio.wait_for(self._holds(outcome.stored), remaining)
                break
            except Exception as exc:  # noqa: BLE001 - any failure here means "ask again"
                if loop.time() + delay >= deadline:
                    log.error(
                        "outcome unknown: COMMIT of %d event(s) at positions %d-%d failed (%s) and the database "
                        "did not answer the lookup within %.0f s (%s); their requests fail",
                        len(outcome.stored), outcome.stored[0].position, outcome.stored[-1].position,
                        describe(lost.error), self._outcome_timeout, describe(exc),
                    )
                    for request in batch:
                        unknown = CommitOutcomeUnknown("the database did not say whether the events were stored")
                        self._fail(request, _chained(unknown, lost.error))
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if held:
            log.warning(
                "COMMIT of %d event(s) failed (%s) but the lookup found them stored",
                len(outcome.stored), describe(lost.error),
            )
            return outcome
        # Once per outage, like the outage itself: a full disk fails every COMMIT.
        log.log(
            logging.WARNING if self._failed_batches == 1 else logging.DEBUG,
            "COMMIT of %d event(s) failed (%s) and they are not stored", len(outcome.stored), describe(lost.error),
        )
        for request in batch:
            self._fail(request, _chained(DatabaseUnavailable(f"not stored: {describe(lost.error)}"), lost.error))
        return None

    async def _holds(self, stored: list[StoredEvent]) -> bool:
        if self._sqlite is not None:
            return await self._sqlite.transaction(partial(self._store.holds, stored=stored))
        async with self._engine.begin() as conn:
            # Waits out the lost transaction if the server still runs it.
            await self._store.wait_for_writers(conn)
            return await self._store.holds(conn, stored)

    async def _transaction(self, batch: list[_Request], *, join: bool) -> _Outcome:
        """``join``: appends submitted while BEGIN waits may join ``batch``
        (never a retry's: they would pass the rest of the batch retried)."""
        if self._sqlite is not None:
            return await self._sqlite.transaction(partial(self._append, batch))
        conn, driver = await self._begin()
        # Appends submitted while BEGIN waited for the log's lock (another
        # process held it) join this batch: one commit instead of two.
        if join and self._pending and len(batch) < self._max_batch:
            joining = self._pending[: self._max_batch - len(batch)]
            del self._pending[: len(joining)]
            batch.extend(joining)
        try:
            outcome = await self._append(batch, conn)
        except BaseException as exc:
            try:
                await driver.execute("ROLLBACK")
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                await self._drop_connection()
            if driver.is_closed():
                await self._drop_connection()
                if not is_unavailable(exc) and isinstance(exc, Exception):
                    raise DatabaseUnavailable(f"connection lost: {describe(exc)}") from exc
            raise
        try:
            await driver.execute("COMMIT")
        except BaseException as exc:
            await self._drop_connection()
            if is_unavailable(exc) or driver.is_closed():
                # The server may have committed before the connection went:
                # only a lookup can tell.
                raise CommitFailed(outcome, exc) from exc
            raise
        return outcome

    async def _begin(self) -> tuple[AsyncConnection, Any]:
        """BEGIN on the writer's own connection, kept from one batch to the
        next (PostgreSQL). SQLAlchemy runs it in autocommit mode: the
        transaction is begun and ended here on asyncpg's connection, so a
        batch pays no pool checkout, ping or SQLAlchemy round of its own for
        BEGIN and COMMIT. A kept connection the server dropped meanwhile (a
        restart) fails at BEGIN, before anything is sent: then once more on a
        fresh one."""
        while True:
            if self._conn is not None and (self._conn.closed or self._conn.invalidated):
                await self._drop_connection()
            kept = self._conn is not None
            if self._conn is None:
                conn = await self._engine.connect()
                try:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                except BaseException:
                    await _close_quietly(conn)
                    raise
                self._conn = conn
            conn = self._conn
            driver = driver_connection(conn)
            try:
                # BEGIN and the log's lock in one round trip.
                await driver.execute(BEGIN_LOCKED)
                return conn, driver
            except Exception:
                await self._drop_connection()
                if not kept:
                    raise

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.invalidate()
            except Exception:  # noqa: BLE001 - a dropped connection may fail to close
                pass
            await _close_quietly(conn)

    async def _append(self, batch: list[_Request], conn: AsyncConnection) -> _Outcome:
        # The log's lock is held: BEGIN took it (BEGIN IMMEDIATE on SQLite,
        # BEGIN_LOCKED on PostgreSQL).
        # Under the lock: no other append can store one of these ids between
        # this lookup and the commit.
        client_ids = {r.command_id for r in batch if r.command_id is not None and is_client_command(r.command_id)}
        originals_by_id = await self._store.commands(conn, client_ids) if client_ids else {}
        fresh: list[int] = []
        originals: dict[int, list[StoredEvent]] = {}
        copies: dict[int, int] = {}
        first_of: dict[str, int] = {}
        for index, request in enumerate(batch):
            command_id = request.command_id
            if command_id is not None and command_id in client_ids:
                if command_id in originals_by_id:
                    originals[index] = originals_by_id[command_id]
                    continue
                if command_id in first_of:
                    copies[index] = first_of[command_id]
                    continue
                first_of[command_id] = index
            fresh.append(index)
        stored = await self._store.append(conn, [row for i in fresh for row in batch[i].rows], locked=True)
        preceding: list[StoredEvent] = []
        if stored:
            for hook in self._in_transaction:
                await hook(conn, stored)
            if self._read_preceding is not None:
                preceding = await self._read_preceding(conn, stored[0].position)
        return _Outcome(fresh, stored, originals, copies, preceding)

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)


async def _close_quietly(conn: AsyncConnection) -> None:
    try:
        await conn.close()
    except Exception:  # noqa: BLE001 - a dropped connection may fail to close
        pass


def _chained(error: Exception, cause: BaseException) -> Exception:
    # One instance per request: a shared one would gather every awaiter's traceback.
    error.__cause__ = cause
    return error
