"""Races and hostile clients against the session lifecycle, with a real server.

Each case here was reproduced against the server before the lifecycle was made
explicit: a name squatted by a login that committed for a socket that had
gone, a second resume with the same token retiring the first, a resume
replaying the whole log in one go, a leave lost for good.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatserver.app import SERVICE, SIO
from chatserver.domain import decide_login
from chatserver.events import LEFT_SESSION_LOST, LEFT_TAKEN_OVER, UserLeft
from chatserver.store import StreamHead
from tests.support import Client, InProcessServer, log_of, running_server, settings_for


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def log_until(database_url: str, done: Any, timeout: float = 5.0) -> list[Any]:
    """The log once ``done(log)`` holds (leaves are stored after the socket closed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        log = await log_of(database_url)
        if done(log) or asyncio.get_running_loop().time() > deadline:
            return log
        await asyncio.sleep(0.05)


async def online_names(client: Client) -> list[str]:
    return list(await client.call("onlineUsers"))


async def wait_online(client: Client, expected: list[str], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (names := await online_names(client)) != expected:
        assert asyncio.get_running_loop().time() < deadline, names
        await asyncio.sleep(0.05)


class RawSocket:
    """A Socket.IO client written as raw WebSocket frames, so that several
    packets can leave in one burst."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws

    @classmethod
    async def connect(cls, url: str) -> RawSocket:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
        opened = await ws.receive_str()
        assert opened.startswith("0"), opened
        await ws.send_str("40")
        connected = await ws.receive_str()
        assert connected.startswith("40"), connected
        return cls(session, ws)

    async def send(self, *packets: str) -> None:
        for packet in packets:
            await self.ws.send_str(packet)

    async def wait_for(self, prefix: str, timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"socket closed: {msg}")
                if msg.data == "2":
                    await self.ws.send_str("3")
                elif msg.data.startswith(prefix):
                    return str(msg.data)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def test_a_login_racing_its_sockets_disconnect_never_squats_the_name(
    server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = await Client(server.url).connect()
    await watcher.login("watcher")
    try:
        for i in range(20):
            name = f"squat{i}"
            a = await RawSocket.connect(server.url)
            b = await RawSocket.connect(server.url)
            await a.send(f'42["login","{name}"]')
            await a.wait_for('42["welcome"')
            # In one burst: A leaves; B asks for A's name and leaves.
            await a.send("41")
            await b.send(f'42["login","{name}"]', "41")
            await a.close()
            await b.close()
        # Nobody is connected under those names: none may stay online...
        await wait_online(watcher, ["watcher"])
        # ...and every one of them is free to log in again.
        for i in range(20):
            c = await Client(server.url).connect()
            try:
                await c.login(f"squat{i}")
            finally:
                await c.disconnect()
    finally:
        await watcher.disconnect()

    def last_types(log: list[Any]) -> list[str]:
        return [[e.type for e in log if e.stream == f"user-squat{i}"][-1] for i in range(20)]

    # The last logins' leaves are stored after their sockets closed.
    log = await log_until(server.settings.database_url, lambda log: set(last_types(log)) == {UserLeft.type})
    # Logins and leaves alternate: nobody was left online.
    assert set(last_types(log)) == {UserLeft.type}, last_types(log)
    no_tracebacks(caplog)


async def test_two_resumes_with_one_token_take_over_once(
    server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    for round_ in range(8):
        name = f"twin{round_}"
        a = await Client(server.url).connect()
        ack = await a.login(name)
        token = a.events("welcome")[0]["resumeToken"]
        b, c = await Client(server.url).connect(), await Client(server.url).connect()
        try:
            request = {"token": token, "lastPosition": ack["position"]}
            acks = await asyncio.gather(b.call("resume", request), c.call("resume", request))
            winners = [(client, r) for client, r in zip((b, c), acks, strict=True) if r["ok"]]
            losers = [(client, r) for client, r in zip((b, c), acks, strict=True) if not r["ok"]]
            assert len(winners) == 1 and len(losers) == 1, acks
            winner, loser = winners[0][0], losers[0][0]
            assert losers[0][1]["error"] in ("invalid_token", "name_busy"), losers[0][1]
            # The winner is in and can chat; the loser is not logged in.
            assert (await winner.call("chat", "still here"))["ok"]
            refused = await loser.call("chat", "me too")
            assert refused["error"] == "not_logged_in"
            # The original socket was taken over and disconnected.
            await a.wait_for(lambda: not a.sio.connected)
        finally:
            for client in (a, b, c):
                if client.sio.connected:
                    await client.disconnect()

        def leaves_of(log: list[Any], name: str = name) -> list[str]:
            return [e.event.reason for e in log if e.stream == f"user-{name}" and isinstance(e.event, UserLeft)]

        # One takeover leave, then the winner's own leave at its disconnect.
        log = await log_until(server.settings.database_url, lambda log: len(leaves_of(log)) >= 2)
        assert leaves_of(log) == [LEFT_TAKEN_OVER, "disconnected"]
    no_tracebacks(caplog)


async def test_a_resume_that_missed_too_much_is_refused(tmp_path: Path, db_url: str) -> None:
    settings = settings_for(db_url, resume_max_gap=20)
    async with running_server(settings) as srv:
        a = await Client(srv.url).connect()
        ack = await a.login("alice")
        token = a.events("welcome")[0]["resumeToken"]
        await a.disconnect()
        b = await Client(srv.url).connect()
        await b.login("bobby")
        for i in range(25):
            assert (await b.call("chat", f"m{i}"))["ok"]
        c = await Client(srv.url).connect()
        try:
            refused = await c.call("resume", {"token": token, "lastPosition": ack["position"]})
            assert refused["ok"] is False and refused["error"] == "resume_gap_too_large", refused
            [failed] = await c.wait_event("resumeFailed")
            assert failed["code"] == "resume_gap_too_large"
            # The way back is a login, with history.
            await c.login("alice")
            assert c.events("history")
        finally:
            await c.disconnect()
            await b.disconnect()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_long_replay_arrives_whole_in_pages(transport: str, db_url: str) -> None:
    settings = settings_for(
        db_url, rate_per_second=100_000.0, rate_burst=100_000, ping_interval=1.0, ping_timeout=2.0
    )
    async with running_server(settings) as srv:
        a = await Client(srv.url).connect()
        ack = await a.login("alice")
        token = a.events("welcome")[0]["resumeToken"]
        await a.disconnect()
        b = await Client(srv.url).connect()
        await b.login("bobby")
        for i in range(1200):
            await b.emit("chat", f"m{i}")
        await b.wait_for(lambda: len(b.events("chat")) == 1200, timeout=60)
        c = Client(srv.url)
        await c.sio.connect(
            srv.url,
            transports=[transport],
            wait_timeout=10,
            auth={"resumeToken": token, "lastPosition": ack["position"]},
        )
        try:
            await c.wait_for(lambda: len(c.events("chat")) == 1200, timeout=60)
            assert [m["message"] for m in c.events("chat")] == [f"m{i}" for i in range(1200)]
            positions = [m["position"] for m in c.events("chat")]
            assert positions == sorted(set(positions))
            # Live after the replay, exactly once.
            await b.emit("chat", "live")
            await c.wait_for(lambda: len(c.events("chat")) == 1201)
            assert c.events("chat")[-1]["message"] == "live"
        finally:
            await c.disconnect()
            await b.disconnect()


async def test_session_left_open_with_no_socket_is_closed_by_reconciliation(db_url: str) -> None:
    settings = settings_for(db_url, reconcile_interval=0.2)
    async with running_server(settings) as srv:
        service = srv.app[SERVICE]
        # A login of this process that no socket holds: what a lost leave
        # (a bug, a fault) would leave behind.
        orphan = decide_login(
            "orphan", StreamHead(0, None), session=f"{service.sessions.instance}-lost", node=settings.node_id
        )
        await service.writer.append(orphan)
        watcher = await Client(srv.url).connect()
        try:
            await watcher.login("watcher")
            assert "orphan" in await online_names(watcher)
            await wait_online(watcher, ["watcher"], timeout=5)
            # The name is free again.
            assert (await watcher.call("history"))["ok"]
        finally:
            await watcher.disconnect()
        log = await log_of(db_url)
        leaves = [e.event for e in log if isinstance(e.event, UserLeft) and e.event.name == "orphan"]
        assert [x.reason for x in leaves] == [LEFT_SESSION_LOST]


async def test_flooded_logins_for_one_name_admit_exactly_one(server: InProcessServer) -> None:
    clients = [await Client(server.url).connect() for _ in range(12)]
    try:
        acks: list[Any] = await asyncio.gather(*(c.call("login", "popular") for c in clients))
        assert sum(1 for a in acks if a["ok"]) == 1, acks
        assert all(a["error"] == "name_taken" for a in acks if not a["ok"])
    finally:
        for c in clients:
            await c.disconnect()


async def test_a_replay_to_a_socket_that_does_not_read_stays_bounded(db_url: str) -> None:
    settings = settings_for(db_url, rate_per_second=100_000.0, rate_burst=100_000)
    async with running_server(settings) as srv:
        a = await Client(srv.url).connect()
        ack = await a.login("alice")
        token = a.events("welcome")[0]["resumeToken"]
        await a.disconnect()
        b = await Client(srv.url).connect()
        await b.login("bobby")
        for i in range(1000):
            await b.emit("chat", f"m{i}")
        await b.wait_for(lambda: len(b.events("chat")) == 1000, timeout=60)
        # A polling client that resumes and then never polls again.
        async with aiohttp.ClientSession() as http:
            base = f"{srv.url}/socket.io/?EIO=4&transport=polling"
            async with http.get(base) as r:
                opened = await r.text()
            sid = opened[opened.index('"sid":"') + 7 :].split('"')[0]
            auth = '40{"resumeToken":"%s","lastPosition":%d}' % (token, ack["position"])
            async with http.post(f"{base}&sid={sid}", data=auth) as r:
                assert r.status == 200
            await asyncio.sleep(1.0)
            eio_socket = srv.app[SIO].eio.sockets[sid]
            queued = eio_socket.queue.qsize()
            # One page at most waits for the reader, not the whole gap.
            assert 0 < queued <= 300, queued
            # Everyone else is served meanwhile.
            c = await Client(srv.url).connect()
            try:
                await c.login("carol")
                page = await c.call("history", {"limit": 5})
                assert page["ok"] and len(page["items"]) == 5
            finally:
                await c.disconnect()
        await b.disconnect()
