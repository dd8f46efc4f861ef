"""Two server processes sharing one PostgreSQL log, with python-socketio's
Redis manager carrying broadcasts between them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Client, Postgres, ServerProcess, free_port, log_of, migrate

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="chat-redis-"))
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


async def test_two_processes_share_log_names_and_broadcasts(postgres: Postgres, redis_url: str) -> None:
    url = postgres.create_database("multiproc")
    migrate(url)
    one = ServerProcess(url, CHAT_REDIS_URL=redis_url, CHAT_NODE_ID="one").start()
    two = ServerProcess(url, CHAT_REDIS_URL=redis_url, CHAT_NODE_ID="two").start()
    a = b = c = None
    try:
        a = await Client(one.url).connect()
        b = await Client(two.url).connect()
        await a.login("alice")
        await b.login("bobby")
        # A name online on one process is taken on the other too.
        c = await Client(two.url).connect()
        ack = await c.call("login", "alice")
        assert ack["error"] == "name_taken"
        await a.call("chat", "from one")
        await b.call("chat", "from two")
        for client in (a, b):
            await client.wait_for(lambda cl=client: len(cl.events("chat")) == 2)
            assert sorted(m["message"] for m in client.events("chat")) == ["from one", "from two"]
        # bobby joined on the other process: alice saw it through Redis.
        await a.wait_for(lambda: "bobby" in a.events("userJoined"))
        # Each process follows the shared log: both list both users, and a
        # newcomer on either gets the history both wrote.
        for client in (a, b):
            deadline = asyncio.get_running_loop().time() + 5
            while sorted(await client.call("onlineUsers")) != ["alice", "bobby"]:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
        d = await Client(two.url).connect()
        await d.login("dora")
        items = d.events("history")[0]["items"]
        assert sorted(i["message"] for i in items if i["kind"] == "chat") == ["from one", "from two"]
        await d.disconnect()
        await b.disconnect()
        await a.wait_for(lambda: a.events("userLeft") == ["dora", "bobby"])
    finally:
        for client in (a, b, c):
            if client is not None:
                await client.disconnect()
        await asyncio.to_thread(one.terminate)
        await asyncio.to_thread(two.terminate)
    log = await log_of(url)
    assert [e.position for e in log] == list(range(1, len(log) + 1))
    nodes = {e.event.name: e.event.node for e in log if e.type == "UserLoggedIn"}
    assert nodes == {"alice": "one", "bobby": "two", "dora": "two"}
