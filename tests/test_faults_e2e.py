"""Database faults under a real server and real clients: chats get not_stored
(never a false ok), nothing acknowledged is lost, no leave is lost, and the
server serves again by itself once the database is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from chatserver.events import MessagePosted, UserLeft
from tests.support import Client, Postgres, fill_disk, log_of, migrated_sqlite, running_server, settings_for


async def chat_until(client: Client, text: str, ok: bool, timeout: float = 20.0) -> dict[str, Any]:
    """Send ``text`` until its ack says ``ok`` (the same client id each time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        # Long enough for a chat queued behind a commit whose outcome the
        # writer is still looking up (up to 30 s while the database is down).
        ack = await client.call("chat", text, {"id": f"retry-{text[:30]}"}, timeout=45)
        if ack["ok"] is ok:
            return dict(ack)
        assert asyncio.get_running_loop().time() < deadline, ack
        await asyncio.sleep(0.1)


@pytest.mark.postgres
async def test_postgres_restart_under_load_loses_nothing_acknowledged(
    postgres: Postgres, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # When the stop lands during a COMMIT, the writer looks its outcome up
    # for up to 30 s, and "during" waits behind it: a lease shorter than that
    # would have the process stop serving its sockets (as it must when its
    # database is gone that long), which is not what this test is about.
    settings = settings_for(pg_url, rate_per_second=10_000.0, rate_burst=10_000, node_lease_seconds=120.0)
    async with running_server(settings) as srv:
        alice, bobby = await Client(srv.url).connect(), await Client(srv.url).connect()
        await alice.login("alice")
        await bobby.login("bobby")
        acked: list[str] = []
        refused: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            i = 0
            while not stop.is_set():
                text = f"load{i}"
                i += 1
                ack = await alice.call("chat", text, timeout=45)
                (acked if ack["ok"] else refused).append(text)
                if not ack["ok"]:
                    assert ack["error"] in ("not_stored", "server_error"), ack
                    await asyncio.sleep(0.02)

        loader = asyncio.create_task(load())
        down = False
        try:
            await asyncio.sleep(0.3)
            down = True
            await asyncio.to_thread(postgres.stop_server)
            # While it is down: chats are refused, and a leave fails to store.
            await chat_until(bobby, "during", ok=False)
            await bobby.disconnect()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(postgres.start_server)
            down = False
            # Back by itself: the same clients chat again, and the leave lost
            # during the outage reaches everyone.
            await chat_until(alice, "after", ok=True)
            await alice.wait_for(lambda: "bobby" in alice.events("userLeft"), timeout=20)
        finally:
            if down:  # leave the shared cluster running for the other tests
                await asyncio.to_thread(postgres.start_server)
            stop.set()
            with contextlib.suppress(Exception):
                await loader
            await alice.disconnect()
        assert acked and refused
    log = await log_of(pg_url)
    stored = [e.event.message for e in log if isinstance(e.event, MessagePosted)]
    # Every acknowledged chat is in the log, once; what was refused was not stored
    # (the retried "after" once, whatever the outcome of its earlier tries).
    assert all(stored.count(text) == 1 for text in acked)
    assert stored.count("after") == 1
    assert "during" not in stored
    assert not set(refused) & set(stored)
    leaves = [e.event for e in log if isinstance(e.event, UserLeft) and e.event.name == "bobby"]
    assert [x.reason for x in leaves] == ["disconnected"]
    # The outage is told once, not once per request.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) <= 2, [r.getMessage() for r in tracebacks]


async def test_sqlite_on_a_full_disk_refuses_and_recovers(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_url = migrated_sqlite(small_disk)
    async with running_server(settings_for(db_url)) as srv:
        alice, bobby = await Client(srv.url).connect(), await Client(srv.url).connect()
        await alice.login("alice")
        await bobby.login("bobby")
        assert (await alice.call("chat", "before"))["ok"]
        filler = await asyncio.to_thread(fill_disk, small_disk)
        # Full: a chat is refused, never a false ok; a leave fails to store.
        big = "x" * 1900
        refused = await chat_until(alice, big, ok=False)
        assert refused["error"] == "not_stored"
        await bobby.disconnect()
        await asyncio.sleep(0.3)
        filler.unlink()
        # Space again: the server goes on by itself, the leave is stored.
        await chat_until(alice, "after", ok=True)
        await alice.wait_for(lambda: "bobby" in alice.events("userLeft"), timeout=20)
        await alice.disconnect()
    log = await log_of(db_url)
    stored = [e.event.message for e in log if isinstance(e.event, MessagePosted)]
    assert stored.count("before") == 1 and stored.count("after") == 1
    leaves = [e.event for e in log if isinstance(e.event, UserLeft) and e.event.name == "bobby"]
    assert [x.reason for x in leaves] == ["disconnected"]
