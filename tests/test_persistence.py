"""Stops, restarts and SIGKILL: the log keeps what clients were told, and a
restart closes the sessions the dead process left open."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp

from chatserver import projections
from chatserver.database import create_engine
from chatserver.store import EventStore
from tests.support import (
    ROOT,
    Client,
    ServerProcess,
    log_of,
    migrated_sqlite,
    sqlite_url,
)


async def persisted_online(db_url: str) -> list[str]:
    engine = create_engine(db_url)
    try:
        return (await projections.load(engine)).names()
    finally:
        await engine.dispose()


async def test_stop_and_start_keeps_the_log(tmp_path: Path) -> None:
    db = migrated_sqlite(tmp_path)
    srv = ServerProcess(db).start()
    try:
        a = await Client(srv.url).connect()
        await a.login("alice")
        for i in range(5):
            assert (await a.call("chat", f"m{i}"))["ok"]
        await a.disconnect()
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/socket.io/socket.io.js"):
                async with http.get(srv.url + path) as page:
                    assert page.status == 200
        await asyncio.sleep(0.3)
    finally:
        assert srv.terminate() == 0
    # The access log keeps HTTP requests, not Socket.IO's transport requests.
    access = [line for line in srv.output().splitlines() if "aiohttp.access" in line]
    assert any('"GET / HTTP/1.1" 200' in line for line in access), srv.output()
    assert any('"GET /socket.io/socket.io.js HTTP/1.1" 200' in line for line in access), access
    assert not any("/socket.io/?" in line for line in access), access
    before = await log_of(db)
    assert [e.type for e in before] == ["UserLoggedIn", "UserJoined"] + ["MessagePosted"] * 5 + ["UserLeft"]
    srv2 = ServerProcess(db).start()
    try:
        b = await Client(srv2.url).connect()
        await b.login("bobby")
        ack = await b.call("chat", "after restart")
        assert ack["position"] == len(before) + 3
        await b.disconnect()
        await asyncio.sleep(0.3)
    finally:
        srv2.terminate()
    after = await log_of(db)
    assert after[: len(before)] == before
    assert [e.position for e in after] == list(range(1, len(after) + 1))


async def test_graceful_stop_records_leaves_of_connected_users(tmp_path: Path) -> None:
    db = migrated_sqlite(tmp_path)
    srv = ServerProcess(db).start()
    a = await Client(srv.url).connect()
    await a.login("alice")
    # In a thread: the client must keep running to answer the server's close.
    assert await asyncio.to_thread(srv.terminate) == 0
    await a.disconnect()
    log = await log_of(db)
    assert log[-1].type == "UserLeft"
    assert await persisted_online(db) == []


async def test_sigkill_loses_nothing_a_client_was_told(tmp_path: Path) -> None:
    db = migrated_sqlite(tmp_path)
    srv = ServerProcess(db).start()
    watcher = await Client(srv.url).connect()
    senders = [await Client(srv.url).connect() for _ in range(3)]
    acked: list[int] = []
    stop = asyncio.Event()
    try:
        await watcher.login("watch")
        for i, s in enumerate(senders):
            await s.login(f"snd{i}")

        async def chatter(i: int, s: Client) -> None:
            k = 0
            while not stop.is_set():
                try:
                    ack = await s.call("chat", f"{i}-{k}", timeout=2)
                except Exception:
                    return
                if ack.get("ok"):
                    acked.append(ack["position"])
                k += 1

        tasks = [asyncio.create_task(chatter(i, s)) for i, s in enumerate(senders)]
        await watcher.wait_event("chat", count=60, timeout=20)
        srv.kill()  # SIGKILL mid-stream
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        srv.kill()
        for c in (watcher, *senders):
            await c.disconnect()
    received = {m["position"] for m in watcher.events("chat")}
    log = await log_of(db)
    positions = {e.position: e for e in log}
    assert received and acked
    assert received <= positions.keys()
    assert set(acked) <= positions.keys()
    for p in received:
        assert positions[p].type == "MessagePosted"
    # The killed run left four sessions open.
    assert sorted(await persisted_online(db)) == ["snd0", "snd1", "snd2", "watch"]

    srv2 = ServerProcess(db).start()
    try:
        c = await Client(srv2.url).connect()
        await c.login("fresh")
        assert await c.call("onlineUsers") == ["fresh"]
        # The ghosts' names are free again.
        d = await Client(srv2.url).connect()
        await d.login("watch")
        await d.disconnect()
        await c.disconnect()
        await asyncio.sleep(0.3)
    finally:
        srv2.terminate()
    log2 = await log_of(db)
    closed = [e for e in log2[len(log) :] if e.type == "UserLeft" and e.event.reason == "server restart"]
    assert sorted(e.event.name for e in closed) == ["snd0", "snd1", "snd2", "watch"]
    assert [e.position for e in log2] == list(range(1, len(log2) + 1))
    assert await persisted_online(db) == []
    engine = create_engine(db)
    try:
        assert (await projections.fold(EventStore(engine))).names() == []
    finally:
        await engine.dispose()


def test_unmigrated_database_gives_a_clear_message(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "empty.db")
    result = subprocess.run(
        [sys.executable, "-m", "chatserver"],
        cwd=ROOT,
        env={"CHAT_DATABASE_URL": db, "PORT": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "alembic upgrade head" in result.stderr
    assert "Traceback" not in result.stderr
