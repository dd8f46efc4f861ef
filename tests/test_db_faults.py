"""Database faults at the writer: a COMMIT whose answer is lost, PostgreSQL
stopped and started again under load, a SQLite file on a full disk, SQLite's
write lock held elsewhere. Requests fail with DatabaseUnavailable (never a
false success), nothing acknowledged is lost, the same writer commits again
once the database is back, and the log tells the outage once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from chatserver.database import create_engine
from chatserver.events import MessagePosted, NewEvent, StoredEvent, user_stream
from chatserver.store import EventStore
from chatserver.writer import Appended, CommitOutcomeUnknown, DatabaseUnavailable, EventWriter
from tests.support import Postgres, fill_disk, migrated_sqlite


def chat(name: str, version: int, text: str, command_id: str | None = None) -> NewEvent:
    return NewEvent(user_stream(name), version, MessagePosted(sender=name, message=text), command_id)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


class CuttingProxy:
    """TCP between the writer and PostgreSQL on 127.0.0.1. Armed, it cuts the
    connection that sends COMMIT: "after" forwards the COMMIT first (the
    server commits, the client never hears back), "before" drops it."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self.armed: str | None = None
        self.refusing = False  # new connections are closed at once
        self.cuts = 0
        self.port = 0

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._links:
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            if self.refusing:
                client_w.transport.abort()
                return
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target_port)
            try:
                await asyncio.gather(self._up(client_r, client_w, server_w), self._down(server_r, client_w))
            finally:
                client_w.transport.abort()
                server_w.transport.abort()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(task)

    async def _up(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, server_w: asyncio.StreamWriter) -> None:
        while data := await client_r.read(65536):
            if self.armed is not None and b"COMMIT" in data:
                mode, self.armed = self.armed, None
                self.cuts += 1
                client_w.transport.abort()  # the client hears nothing more
                if mode == "after":
                    server_w.write(data)
                    await server_w.drain()
                    server_w.close()  # the COMMIT, then end of stream
                    with contextlib.suppress(ConnectionError):
                        await server_w.wait_closed()
                raise ConnectionResetError("cut")
            server_w.write(data)
            await server_w.drain()
        server_w.close()

    @staticmethod
    async def _down(server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        while data := await server_r.read(65536):
            client_w.write(data)
            await client_w.drain()
        client_w.close()


@pytest.fixture
async def proxied(postgres: Postgres, pg_url: str) -> AsyncIterator[tuple[CuttingProxy, EventStore, str]]:
    proxy = await CuttingProxy(postgres.port).start()
    read_engine = create_engine(pg_url)
    try:
        yield proxy, EventStore(read_engine), pg_url.replace(f":{postgres.port}/", f":{proxy.port}/")
    finally:
        await read_engine.dispose()
        await proxy.stop()


@pytest.mark.postgres
async def test_a_commit_whose_answer_is_lost_is_looked_up_and_reported_stored(
    proxied: tuple[CuttingProxy, EventStore, str], caplog: pytest.LogCaptureFixture
) -> None:
    proxy, store, url = proxied
    engine = create_engine(url, writer=True)
    commits: list[list[StoredEvent]] = []
    writer = EventWriter(store, engine, on_commit=commits.append)
    writer.start()
    try:
        await writer.append([chat("ann", 1, "first", "ann/1")])
        proxy.armed = "after"
        stored = await writer.append([chat("ann", 2, "lost answer", "ann/2")])
        assert proxy.cuts == 1
        # The client retries the chat it got no answer for.
        retry = await writer.append([chat("ann", 3, "lost answer", "ann/2")])
        later = await writer.append([chat("ann", 3, "later", "ann/3")])
    finally:
        await writer.close()
        await engine.dispose()
    assert [(e.position, e.command_id) for e in stored] == [(2, "ann/2")]
    assert not stored.duplicate
    assert retry.duplicate and [e.position for e in retry] == [2]
    assert [e.position for e in later] == [3]
    assert [(e.position, e.command_id) for e in await store.read_all()] == [(1, "ann/1"), (2, "ann/2"), (3, "ann/3")]
    # Published once, in order, though the commit's answer never came.
    assert [[e.position for e in batch] for batch in commits] == [[1], [2], [3]]
    assert logged(caplog, "the lookup found them stored") == 1
    assert tracebacks(caplog) == []


@pytest.mark.postgres
async def test_a_connection_lost_before_commit_is_looked_up_and_reported_not_stored(
    proxied: tuple[CuttingProxy, EventStore, str], caplog: pytest.LogCaptureFixture
) -> None:
    proxy, store, url = proxied
    engine = create_engine(url, writer=True)
    commits: list[list[StoredEvent]] = []
    writer = EventWriter(store, engine, on_commit=commits.append)
    writer.start()
    try:
        await writer.append([chat("bob", 1, "first", "bob/1")])
        proxy.armed = "before"
        with pytest.raises(DatabaseUnavailable) as failed:
            await writer.append([chat("bob", 2, "never committed", "bob/2")])
        assert not isinstance(failed.value, CommitOutcomeUnknown)
        assert proxy.cuts == 1
        assert [e.position for e in await store.read_all()] == [1]
        # The retry is not a duplicate: the first try is not in the log.
        retry = await writer.append([chat("bob", 2, "never committed", "bob/2")])
    finally:
        await writer.close()
        await engine.dispose()
    assert not retry.duplicate and [e.position for e in retry] == [2]
    assert [(e.position, e.command_id) for e in await store.read_all()] == [(1, "bob/1"), (2, "bob/2")]
    assert [[e.position for e in batch] for batch in commits] == [[1], [2]]
    assert logged(caplog, "they are not stored") == 1
    assert tracebacks(caplog) == []


@pytest.mark.postgres
async def test_an_outcome_nobody_can_tell_fails_after_the_deadline(
    proxied: tuple[CuttingProxy, EventStore, str], caplog: pytest.LogCaptureFixture
) -> None:
    proxy, store, url = proxied
    engine = create_engine(url, writer=True)
    writer = EventWriter(store, engine, outcome_timeout=1.0)
    writer.start()
    try:
        await writer.append([chat("cat", 1, "first")])
        proxy.armed = "after"
        proxy.refusing = True  # and the database stays out of reach
        with pytest.raises(CommitOutcomeUnknown):
            await writer.append([chat("cat", 2, "maybe", "cat/2")])
        proxy.refusing = False
        # Back: the writer goes on, and the stored-or-not chat is found on retry.
        retry = await writer.append([chat("cat", 3, "maybe", "cat/2")])
    finally:
        await writer.close()
        await engine.dispose()
    assert retry.duplicate and [e.position for e in retry] == [2]
    assert logged(caplog, "outcome unknown") == 1
    assert tracebacks(caplog) == []


class Load:
    """Chats submitted steadily by a few tasks; remembers every answer."""

    def __init__(self, writer: EventWriter) -> None:
        self.writer = writer
        self.acked: list[StoredEvent] = []
        self.failed: list[tuple[str, BaseException]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._count = 0

    def start(self, senders: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._send(i)) for i in range(senders)]

    async def _send(self, sender: int) -> None:
        while not self._stop.is_set():
            self._count += 1
            name = f"s{sender}n{self._count}"
            # Half with client ids (looked up in the batch), half server ids.
            command_id = f"{name}/1" if self._count % 2 else f"cmd{self._count}"
            try:
                stored: Appended = await self.writer.submit([chat(name, 1, f"m{self._count}", command_id)])
            except Exception as exc:  # noqa: BLE001 - every answer is recorded
                self.failed.append((user_stream(name), exc))
                await asyncio.sleep(0.01)
            else:
                self.acked.extend(stored)
                await asyncio.sleep(0.002)

    async def acked_at_least(self, n: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.acked) < n:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def check_log_against_answers(load: Load, log: list[StoredEvent]) -> None:
    by_position = {e.position: e for e in log}
    for acked in load.acked:
        assert by_position[acked.position].stream == acked.stream, "an acknowledged event is missing"
        assert by_position[acked.position].event == acked.event
    streams = {e.stream for e in log}
    assert [s for s, _ in load.failed if s in streams] == [], "a request reported failed is in the log"
    assert [e.position for e in log] == list(range(1, len(log) + 1))


@pytest.mark.postgres
async def test_postgres_stopped_and_started_under_load(
    postgres: Postgres, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    read_engine = create_engine(pg_url)
    writer_engine = create_engine(pg_url, writer=True)
    store = EventStore(read_engine)
    writer = EventWriter(store, writer_engine)
    writer.start()
    load = Load(writer)
    load.start()
    try:
        await load.acked_at_least(30)
        assert await store.head() > 0  # the reader's pool holds a connection too
        await asyncio.to_thread(postgres.stop_server)
        try:
            # Down for a while under load. Requests fail as they come, unless
            # the stop cut a COMMIT: then the writer waits for the lookup's
            # answer and later requests wait behind it.
            failed_before = len(load.failed)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while len(load.failed) < failed_before + 10:
                        await asyncio.sleep(0.01)
        finally:
            await asyncio.to_thread(postgres.start_server)
        acked_while_down = len(load.acked)
        # The same writer, engines and pools serve again by themselves.
        await load.acked_at_least(acked_while_down + 30)
    finally:
        await load.stop()
        await writer.close()
        await writer_engine.dispose()
    try:
        log = await store.read_all()
    finally:
        await read_engine.dispose()
    # None failed only if the stop cut a COMMIT that the lookup found stored.
    assert load.failed or logged(caplog, "the lookup found them stored") == 1
    assert all(isinstance(exc, DatabaseUnavailable) for _, exc in load.failed)
    check_log_against_answers(load, log)
    assert logged(caplog, "database unavailable") == 1
    assert logged(caplog, "database available again after") == 1
    assert tracebacks(caplog) == []


async def fill_until_refused(load: Load) -> None:
    async with asyncio.timeout(20):
        while not load.failed:
            await asyncio.sleep(0.01)


async def test_sqlite_full_disk_by_page_limit(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = EventStore(create_engine(db_url))
    writer_engine = create_engine(db_url, writer=True)
    writer = EventWriter(store, writer_engine)
    writer.start()
    thread = writer.sqlite_thread
    assert thread is not None
    load = Load(writer)
    try:
        await writer.append([chat("first", 1, "x" * 2000)])
        ((pages,),) = await thread.run_statement("PRAGMA page_count")
        # The writer's connection may not grow the file past a few more pages.
        await thread.run_statement(f"PRAGMA max_page_count = {pages + 3}")
        load.start()
        await fill_until_refused(load)
        failing = len(load.failed)
        async with asyncio.timeout(10):
            while len(load.failed) < failing + 20:
                await asyncio.sleep(0.01)
        acked_when_full = len(load.acked)
        # Room again: the same writer commits by itself.
        await thread.run_statement("PRAGMA max_page_count = 1073741823")
        await load.acked_at_least(acked_when_full + 20)
    finally:
        await load.stop()
        await writer.close()
        await writer_engine.dispose()
    try:
        log = await store.read_all()
    finally:
        await store.engine.dispose()
    assert all(isinstance(exc, DatabaseUnavailable) for _, exc in load.failed)
    assert "full" in str(load.failed[0][1])
    check_log_against_answers(load, log)
    assert logged(caplog, "database unavailable") == 1
    assert logged(caplog, "database available again after") == 1
    assert tracebacks(caplog) == []


async def test_sqlite_file_on_a_full_disk(small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = migrated_sqlite(small_disk)
    store = EventStore(create_engine(url))
    writer_engine = create_engine(url, writer=True)
    writer = EventWriter(store, writer_engine)
    writer.start()
    load = Load(writer)
    try:
        await writer.append([chat("first", 1, "x")])
        filler = fill_disk(small_disk)
        load.start()
        await fill_until_refused(load)
        failing = len(load.failed)
        async with asyncio.timeout(10):
            while len(load.failed) < failing + 20:
                await asyncio.sleep(0.01)
        acked_when_full = len(load.acked)
        filler.unlink()
        await load.acked_at_least(acked_when_full + 20)
    finally:
        await load.stop()
        await writer.close()
        await writer_engine.dispose()
    try:
        log = await store.read_all()
    finally:
        await store.engine.dispose()
    assert all(isinstance(exc, DatabaseUnavailable) for _, exc in load.failed)
    check_log_against_answers(load, log)
    # What a reader of the file sees after the writer has gone agrees too.
    with sqlite3.connect(sa.make_url(url).database or "") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM events").fetchone() == (len(log),)
    assert logged(caplog, "database unavailable") == 1
    assert logged(caplog, "database available again after") == 1
    assert tracebacks(caplog) == []


async def test_sqlite_write_lock_held_elsewhere(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Another process holds SQLite's write lock past the busy timeout: the
    # batches fail as unavailable (not retried one by one, not a traceback
    # each) and the writer commits once the lock is released.
    store = EventStore(create_engine(db_url))
    writer_engine = create_engine(db_url, writer=True)
    writer = EventWriter(store, writer_engine)
    writer.start()
    thread = writer.sqlite_thread
    assert thread is not None
    other = sqlite3.connect(sa.make_url(db_url).database or "", isolation_level=None)
    try:
        await writer.append([chat("first", 1, "x")])
        await thread.run_statement("PRAGMA busy_timeout = 50")
        other.execute("BEGIN IMMEDIATE")
        results = await asyncio.gather(
            *(writer.submit([chat(f"u{i}", 1, "locked out")]) for i in range(5)), return_exceptions=True
        )
        more = await asyncio.gather(writer.submit([chat("v", 1, "still locked")]), return_exceptions=True)
        other.execute("ROLLBACK")
        after = await writer.append([chat("w", 1, "free again")])
    finally:
        other.close()
        await writer.close()
        await writer_engine.dispose()
    try:
        log = await store.read_all()
    finally:
        await store.engine.dispose()
    assert all(isinstance(r, DatabaseUnavailable) and "locked" in str(r) for r in [*results, *more])
    assert [e.position for e in after] == [2]
    assert [e.stream for e in log] == ["user-first", "user-w"]
    assert logged(caplog, "database unavailable") == 1
    assert logged(caplog, "database available again after 2 failed batches") == 1
    assert tracebacks(caplog) == []
