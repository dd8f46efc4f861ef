"""The SQLite writer thread: transactions on the sqlite3 driver, in a thread
of their own, with the statements SQLAlchemy would have run."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chatserver.database import create_engine
from chatserver.sqlite_writer import SqliteWriterThread
from chatserver.store import events_table

HEAD = sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0))


def row(position: int, stream: str = "user-ann", version: int | None = None) -> dict[str, Any]:
    return {
        "position": position,
        "stream": stream,
        "version": position if version is None else version,
        "type": "MessagePosted",
        "payload": {"sender": "ann", "message": f"m{position}", "room": "lobby"},
        "recorded_at": datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
    }


@pytest.fixture
async def writer_thread(db_url: str) -> AsyncIterator[SqliteWriterThread]:
    engine = create_engine(db_url, writer=True)
    thread = SqliteWriterThread.for_engine(engine)
    assert thread is not None
    try:
        yield thread
    finally:
        await thread.close()
        await engine.dispose()


def stored_rows(db_url: str) -> list[tuple[Any, ...]]:
    path = Path(sa.make_url(db_url).database or "")
    with sqlite3.connect(path) as db:
        return db.execute("SELECT position, stream, version, payload, recorded_at FROM events ORDER BY position").fetchall()


def test_only_a_sqlite_file_gets_a_thread() -> None:
    assert SqliteWriterThread.for_engine(create_engine("sqlite+aiosqlite:///:memory:")) is None
    assert SqliteWriterThread.for_engine(create_engine("postgresql+asyncpg://u@127.0.0.1:1/db")) is None


async def test_commits_in_its_thread_what_sqlalchemy_would_store(writer_thread: SqliteWriterThread, db_url: str) -> None:
    seen: dict[str, Any] = {}

    async def body(conn: Any) -> int:
        seen["thread"] = threading.current_thread().name
        head = (await conn.execute(HEAD)).scalar_one()  # a literal bind: coalesce(..., 0)
        await conn.execute(events_table.insert(), [row(head + 1), row(head + 2)])  # executemany
        await conn.execute(events_table.insert(), row(head + 3))  # one row
        return int((await conn.execute(HEAD)).scalar_one())

    assert await writer_thread.transaction(body) == 3
    assert seen["thread"].startswith("event-writer")
    # The async engine reads the rows back as it wrote them itself.
    read = create_engine(db_url)
    try:
        async with read.connect() as conn:
            back = (await conn.execute(sa.select(events_table).order_by(events_table.c.position))).all()
    finally:
        await read.dispose()
    assert [(r.position, r.payload["message"]) for r in back] == [(1, "m1"), (2, "m2"), (3, "m3")]
    assert back[0].recorded_at.replace(tzinfo=UTC) == row(1)["recorded_at"]
    assert stored_rows(db_url)[0][3:] == ('{"sender":"ann","message":"m1","room":"lobby"}', "2026-01-02 03:04:05.600000")


async def test_a_failing_body_stores_nothing_and_the_next_one_commits(
    writer_thread: SqliteWriterThread, db_url: str
) -> None:
    async def conflict(conn: Any) -> None:
        await conn.execute(events_table.insert(), [row(1), row(2, version=1)])  # (stream, version) taken

    with pytest.raises(sa.exc.IntegrityError):
        await writer_thread.transaction(conflict)

    async def broken(conn: Any) -> None:
        await conn.execute(events_table.insert(), row(1))
        raise RuntimeError("the body fails after an insert")

    with pytest.raises(RuntimeError):
        await writer_thread.transaction(broken)
    assert stored_rows(db_url) == []

    async def fine(conn: Any) -> None:
        await conn.execute(events_table.insert(), row(1))

    await writer_thread.transaction(fine)
    assert [r[0] for r in stored_rows(db_url)] == [1]


async def test_a_body_that_waits_on_the_loop_is_refused(writer_thread: SqliteWriterThread) -> None:
    async def waits(conn: Any) -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="cannot run in the writer thread"):
        await writer_thread.transaction(waits)
