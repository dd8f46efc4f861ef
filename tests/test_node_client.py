"""The tutorial's client protocol spoken by Node's real socket.io-client 4.x,
with its default transports (long-polling upgraded to WebSocket)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.support import ROOT, Client, InProcessServer

SCRIPT = Path(__file__).parent / "node" / "seed_client.js"


async def run_seed_client(url: str, name: str, message: str, peers: int = 0) -> list[dict]:
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "socket.io-client").exists():
        pytest.fail("node and `npm ci` (socket.io-client) are needed")
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), url, name, message, str(peers),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (out, err)
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_seed_client_logs_in_and_chats(server: InProcessServer) -> None:
    events = await run_seed_client(server.url, "nodey", "hello <from> node")
    names = [e["event"] for e in events]
    assert names == ["welcome", "userJoined", "onlineUsers", "chat", "transport"]
    assert events[1]["data"] == "nodey"
    assert events[2]["data"] == ["nodey"]
    assert events[3]["data"]["sender"] == "nodey"
    assert events[3]["data"]["message"] == "hello <from> node"
    assert events[4]["data"] == "websocket"  # the polling session was upgraded


async def test_seed_client_and_python_client_talk(server: InProcessServer) -> None:
    py = await Client(server.url).connect()
    try:
        await py.login("pyuser")
        node_task = asyncio.create_task(run_seed_client(server.url, "nodey", "hi py", peers=1))
        await py.wait_for(lambda: "nodey" in py.events("userJoined"))
        await py.wait_for(lambda: any(m["message"] == "hi py" for m in py.events("chat")))
        await py.call("chat", "hi node")
        events = await node_task
        chats = [(e["data"]["sender"], e["data"]["message"]) for e in events if e["event"] == "chat"]
        assert chats == [("nodey", "hi py"), ("pyuser", "hi node")]
        await py.wait_for(lambda: "nodey" in py.events("userLeft"))
    finally:
        await py.disconnect()


async def test_seed_client_taken_name(server: InProcessServer) -> None:
    py = await Client(server.url).connect()
    try:
        await py.login("taken")
        events = await run_seed_client(server.url, "taken", "never sent")
        assert events == [{"event": "loginNameExists", "data": "taken"}]
    finally:
        await py.disconnect()
