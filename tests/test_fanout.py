"""The direct fan-out path (chatserver/fanout.py) against a real server:
per-socket order, acks, engine.io pings, polling and upgrades, no
permessage-deflate, and slow or dead clients that must not hold up the rest."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
from typing import Any

import pytest
import sqlalchemy as sa

from chatserver.app import SIO
from chatserver.fanout import DirectSocket, FanoutManager, FanoutServer, ws_frame
from tests.support import Client, InProcessServer, running_server, settings_for


class RawClient:
    """A hand-rolled WebSocket / engine.io / Socket.IO client on a plain socket,
    to see the bytes the server sends and to misbehave (stop reading, ignore
    pings) in ways a library client will not."""

    def __init__(self, port: int, *, rcvbuf: int | None = None, offer_deflate: bool = False) -> None:
        self.port = port
        self.rcvbuf = rcvbuf
        self.offer_deflate = offer_deflate
        self.answer_pings = True
        self.pings = 0
        self.frames: list[tuple[int, int, bytes]] = []  # (first byte, opcode, payload)
        self.events: list[tuple[str, Any]] = []
        self.response_headers: dict[str, str] = {}
        self.closed = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=2**16)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.offer_deflate else ""
        self._writer.write(
            (
                "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode()
        status, *lines = head.strip().split("\r\n")
        assert " 101 " in status, head
        for line in lines:
            name, _, value = line.partition(":")
            self.response_headers[name.strip().lower()] = value.strip()
        return self

    def send_text(self, text: str) -> None:
        assert self._writer is not None
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x81, 0x80 | n))
        elif n < 65536:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._writer.write(head + mask + masked)

    async def read_frame(self) -> str | None:
        """The next text frame (None once the server closed); answers
        engine.io pings unless told not to."""
        assert self._reader is not None
        while True:
            try:
                b0, b1 = await self._reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self._reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self._reader.readexactly(8))
                assert not b1 & 0x80, "server frames are not masked"
                payload = await self._reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.closed = True
                return None
            opcode = b0 & 0x0F
            self.frames.append((b0, opcode, payload))
            if opcode == 0x8:
                self.closed = True
                return None
            text = payload.decode()
            if text == "2":
                self.pings += 1
                if self.answer_pings:
                    self.send_text("3")
                continue
            if text.startswith("42"):
                event, *args = json.loads(text[2:])
                self.events.append((event, args[0] if args else None))
            return text

    async def read_until(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if await self.read_frame() is None and not predicate():
                    raise AssertionError(f"connection closed; events: {self.events[-5:]}")

    async def connect_and_login(self, name: str) -> None:
        opened = await self.read_frame()
        assert opened is not None and opened.startswith("0{"), opened
        self.send_text("40")
        connected = await self.read_frame()
        assert connected is not None and connected.startswith("40"), connected
        self.send_text("42" + json.dumps(["login", name]))
        await self.read_until(lambda: ("userJoined", name) in self.events)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()


def port_of(server: InProcessServer) -> int:
    return server.settings.port


async def connect_all(url: str, n: int, **kwargs: Any) -> list[Client]:
    return list(await asyncio.gather(*(Client(url).connect(**kwargs) for _ in range(n))))


async def disconnect_all(clients: list[Client]) -> None:
    await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


def index_of(client: Client, event: str, data: Any) -> int:
    return next(i for i, (e, d) in enumerate(client.received) if e == event and d == data)


# -- the pieces ---------------------------------------------------------------


def test_ws_frame_lengths() -> None:
    assert ws_frame(b"42[]") == b"\x81\x0442[]"
    assert ws_frame(b"x" * 125)[:2] == b"\x81\x7d"
    assert ws_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert ws_frame(b"x" * 65535)[:4] == b"\x81\x7e\xff\xff"
    assert ws_frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
    assert ws_frame(b"\x01\x02", 0x2) == b"\x82\x02\x01\x02"


async def test_server_uses_the_fanout_pieces(server: InProcessServer) -> None:
    sio = server.app[SIO]
    assert isinstance(sio, FanoutServer) and isinstance(sio.manager, FanoutManager)
    c = await Client(server.url).connect()
    try:
        await c.login("alice")
        [sock] = sio.eio.sockets.values()
        assert type(sock) is DirectSocket and sock.direct
    finally:
        await c.disconnect()


async def test_permessage_deflate_is_declined(server: InProcessServer) -> None:
    raw = await RawClient(port_of(server), offer_deflate=True).open()
    try:
        assert "sec-websocket-extensions" not in raw.response_headers
        await raw.connect_and_login("rawuser")
        # RSV1 (compressed) is never set; every frame is FIN + text.
        assert raw.frames and all(b0 == 0x81 for b0, _, _ in raw.frames)
    finally:
        raw.close()


# -- order -------------------------------------------------------------------


async def test_order_under_concurrent_logins_and_senders(server: InProcessServer) -> None:
    clients = await connect_all(server.url, 12)
    names = [f"user{i:02d}" for i in range(12)]
    try:
        acks = await asyncio.gather(*(c.call("login", n) for c, n in zip(clients, names, strict=True)))
        assert all(a["ok"] for a in acks)
        for c in clients:
            await c.wait_for(lambda c=c: len(c.events("userJoined")) >= 1)
        for c, name in zip(clients, names, strict=True):
            await c.wait_for(lambda c=c, name=name: name in c.events("userJoined"))
            assert index_of(c, "welcome", c.events("welcome")[0]) < index_of(c, "userJoined", name)
        # Everyone logged in later than a client shows up after its own join.
        joined_order = [n for n in clients[0].events("userJoined")]
        for c in clients:
            mine = c.events("userJoined")
            assert mine == joined_order[len(joined_order) - len(mine):]

        senders, per_sender = clients[:4], 60
        # Fire-and-forget emits from four senders at once: no waiting in between.
        await asyncio.gather(
            *(s.emit("chat", f"{k}:{i}") for i in range(per_sender) for k, s in enumerate(senders))
        )
        total = len(senders) * per_sender
        for c in clients:
            await c.wait_for(lambda c=c: len(c.events("chat")) >= total, timeout=30)
            chats = c.events("chat")
            assert len(chats) == total
            positions = [m["position"] for m in chats]
            assert positions == sorted(positions) and len(set(positions)) == total
            for k in range(len(senders)):
                seq = [int(m["message"].split(":")[1]) for m in chats if m["message"].startswith(f"{k}:")]
                assert seq == list(range(per_sender)), (k, seq[:10])
        # Every client saw the same sequence.
        assert len({tuple(m["position"] for m in c.events("chat")) for c in clients}) == 1
    finally:
        await disconnect_all(clients)


async def test_acks_interleaved_with_broadcasts(server: InProcessServer) -> None:
    a, b = await connect_all(server.url, 2)
    try:
        await a.login("alice")
        await b.login("bobby")
        noise = asyncio.gather(*(b.emit("chat", f"b{i}") for i in range(40)))
        acks = [await a.call("chat", f"a{i}") for i in range(40)]
        await noise
        assert all(ack["ok"] for ack in acks)
        await b.wait_for(lambda: len(b.events("chat")) >= 80, timeout=20)
        by_message = {m["message"]: m["position"] for m in b.events("chat")}
        assert [ack["position"] for ack in acks] == [by_message[f"a{i}"] for i in range(40)]
        assert await a.call("onlineUsers") == ["alice", "bobby"]
    finally:
        await disconnect_all([a, b])


# -- heartbeat ----------------------------------------------------------------


async def test_pings_keep_idle_clients_connected(db_url: str) -> None:
    settings = settings_for(db_url, ping_interval=1, ping_timeout=1)
    async with running_server(settings) as srv:
        a = await Client(srv.url).connect()
        raw = await RawClient(srv.settings.port).open()
        reader: asyncio.Task[None] | None = None
        try:
            await a.login("alice")
            await raw.connect_and_login("rawuser")
            reader = asyncio.create_task(raw.read_until(lambda: False, timeout=60))
            await asyncio.sleep(4.5)  # four ping cycles and more
            assert raw.pings >= 3
            assert not raw.closed
            assert a.sio.connected
            ack = await a.call("chat", "still here")
            assert ack["ok"]
            await a.wait_for(lambda: "still here" in [m["message"] for m in a.events("chat")])
            assert "userLeft" not in [e for e, _ in a.received]
            assert any(e == "chat" and d["message"] == "still here" for e, d in raw.events)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, AssertionError):
                    await reader
            raw.close()
            await a.disconnect()


async def test_client_that_stops_answering_pings_is_dropped(db_url: str) -> None:
    settings = settings_for(db_url, ping_interval=1, ping_timeout=1)
    async with running_server(settings) as srv:
        observer = await Client(srv.url).connect()
        raw = await RawClient(srv.settings.port).open()
        try:
            await observer.login("watcher")
            await raw.connect_and_login("silent")
            raw.answer_pings = False
            started = time.monotonic()
            # Keep reading (it is not slow, only silent): the server sends an
            # engine.io CLOSE and closes the WebSocket.
            await raw.read_until(lambda: raw.closed, timeout=15)
            await observer.wait_for(lambda: "silent" in observer.events("userLeft"), timeout=10)
            assert time.monotonic() - started < 10
            texts = [p.decode() for _, op, p in raw.frames if op == 0x1]
            assert "1" in texts  # engine.io CLOSE before the WebSocket close
        finally:
            raw.close()
            await observer.disconnect()


# -- slow and stalled clients ---------------------------------------------------


async def test_stalled_client_is_dropped_and_does_not_hold_up_others(db_url: str) -> None:
    settings = settings_for(db_url, max_message_chars=50_000, max_packet_bytes=200_000)
    async with running_server(settings) as srv:
        srv.app[SIO].eio.max_buffer = 256 * 1024
        sender, observer = await connect_all(srv.url, 2)
        stalled = await RawClient(srv.settings.port, rcvbuf=4096).open()
        try:
            await sender.login("sender")
            await observer.login("observer")
            await stalled.connect_and_login("stalled")
            # From here on the raw client never reads again.
            body = "x" * 40_000
            sent = 0
            started = time.monotonic()
            while "stalled" not in observer.events("userLeft"):
                assert sent < 600, "the stalled client was never dropped"
                ack = await sender.call("chat", f"{sent}:{body}")
                assert ack["ok"], ack
                sent += 1
                # The others get every chat right away, stalled client or not.
                await observer.wait_for(lambda: len(observer.events("chat")) >= sent, timeout=5)
            elapsed = time.monotonic() - started
            assert elapsed < 60
            seq = [int(m["message"].split(":")[0]) for m in observer.events("chat")]
            assert seq == list(range(sent))
            await sender.wait_for(lambda: len(sender.events("chat")) >= sent)
            # The stalled client's leave was recorded like any disconnect.
            assert "stalled" not in await observer.call("onlineUsers")
            # Its engine.io socket is closed and gone.
            eio = srv.app[SIO].eio
            await observer.wait_for(lambda: len([s for s in eio.sockets.values() if not s.closed]) == 2)
        finally:
            stalled.close()
            await disconnect_all([sender, observer])


# -- polling and upgrades ------------------------------------------------------


async def test_polling_only_client_still_works(db_url: str) -> None:
    settings = settings_for(db_url, ping_interval=1, ping_timeout=1)
    async with running_server(settings) as srv:
        poller = Client(srv.url)
        ws = await Client(srv.url).connect()
        try:
            await poller.sio.connect(srv.url, transports=["polling"], wait_timeout=10)
            assert poller.sio.transport() == "polling"
            await poller.login("poller")
            await ws.login("wsuser")
            # A burst: more than the 16 packets python-engineio's client
            # accepts in one polling response (the server splits it).
            for i in range(40):
                await ws.emit("chat", f"w{i}")
            ack = await poller.call("chat", "from polling")
            assert ack["ok"]
            await poller.wait_for(lambda: len(poller.events("chat")) >= 41, timeout=20)
            await ws.wait_for(lambda: "from polling" in [m["message"] for m in ws.events("chat")])
            seq = [m["message"] for m in poller.events("chat") if m["message"].startswith("w")]
            assert seq == [f"w{i}" for i in range(40)]
            names = [e for e, _ in poller.received]
            assert names.index("welcome") < names.index("userJoined")
            [sock] = [s for s in srv.app[SIO].eio.sockets.values() if not s.upgraded]
            assert isinstance(sock, DirectSocket) and not sock.direct
        finally:
            await ws.disconnect()
            await poller.disconnect()


async def test_upgrade_from_polling_keeps_order(db_url: str) -> None:
    settings = settings_for(db_url, ping_interval=1, ping_timeout=1)
    async with running_server(settings) as srv:
        sender = await Client(srv.url).connect()
        clients = [Client(srv.url) for _ in range(6)]
        try:
            await sender.login("sender")
            # Chats keep flowing while the others connect over polling and
            # upgrade: whatever was queued for polling must arrive first.
            async def chatter() -> None:
                for i in range(150):
                    await sender.emit("chat", f"s{i}")
                    await asyncio.sleep(0.002)

            flow = asyncio.create_task(chatter())
            await asyncio.gather(
                *(c.sio.connect(srv.url, transports=["polling", "websocket"], wait_timeout=10) for c in clients)
            )
            await asyncio.gather(*(c.call("login", f"late{i}") for i, c in enumerate(clients)))
            await flow
            for i, c in enumerate(clients):
                await c.wait_for(lambda c=c: "s149" in [m["message"] for m in c.events("chat")], timeout=20)
                seq = [int(m["message"][1:]) for m in c.events("chat")]
                assert seq == list(range(seq[0], 150)), seq[:20]
                names = [e for e, _ in c.received]
                assert names.index("welcome") < names.index("userJoined")
                assert f"late{i}" in c.events("userJoined")
            deadline = time.monotonic() + 10
            while not all(c.sio.transport() == "websocket" for c in clients):
                assert time.monotonic() < deadline, [c.sio.transport() for c in clients]
                await asyncio.sleep(0.05)
            direct = [s for s in srv.app[SIO].eio.sockets.values() if isinstance(s, DirectSocket) and s.direct]
            assert len(direct) == 7
            ack = await clients[0].call("chat", "after upgrade")
            assert ack["ok"]
            for c in clients:
                await c.wait_for(lambda c=c: "after upgrade" in [m["message"] for m in c.events("chat")])
        finally:
            await disconnect_all([sender, *clients])


@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"]])
async def test_server_disconnect_reaches_the_client(db_url: str, transports: list[str]) -> None:
    settings = settings_for(db_url, ping_interval=1, ping_timeout=1)
    async with running_server(settings) as srv:
        c = Client(srv.url)
        await c.sio.connect(srv.url, transports=transports, wait_timeout=10)
        try:
            await c.login("alice")
            gone = asyncio.Event()
            c.sio.on("disconnect", lambda *_: gone.set())
            sio = srv.app[SIO]
            [sid] = list(sio.manager.rooms["/"][None].keys())
            await sio.disconnect(sid)
            await asyncio.wait_for(gone.wait(), 10)
        finally:
            await c.disconnect()


# -- the SQLite writer's own thread ----------------------------------------------


async def test_sqlite_writer_commits_in_its_thread_durably(db_url: str) -> None:
    import threading

    from chatserver.database import create_engine
    from chatserver.events import MessagePosted, NewEvent, UserJoined, UserLoggedIn, user_stream
    from chatserver.store import ConcurrencyError, EventStore
    from chatserver.writer import EventWriter

    read_engine = create_engine(db_url)
    writer_engine = create_engine(db_url, writer=True)
    threads: list[str] = []
    commits: list[list[int]] = []

    async def hook(conn: Any, stored: list[Any]) -> None:
        threads.append(threading.current_thread().name)
        pragmas = [
            (await conn.execute(sa.text(f"PRAGMA {name}"))).scalar_one()
            for name in ("journal_mode", "synchronous")
        ]
        assert pragmas == ["wal", 2]  # WAL, synchronous=FULL

    writer = EventWriter(
        EventStore(read_engine), writer_engine, in_transaction=[hook],
        on_commit=lambda stored: commits.append([s.position for s in stored]),
    )
    writer.start()
    try:
        stream = user_stream("alice")
        login = [
            NewEvent(stream, 1, UserLoggedIn("alice", "s1", "local")),
            NewEvent(stream, 2, UserJoined("alice")),
        ]
        first = writer.submit(login)
        chats = [writer.submit([NewEvent(stream, 3 + i, MessagePosted("alice", f"m{i}"))]) for i in range(5)]
        stored = await first
        await asyncio.gather(*chats)
        # One transaction for everything submitted in one loop turn, in its thread.
        assert writer.batches == 1 and commits == [[1, 2, 3, 4, 5, 6, 7]]
        assert threads and all(t.startswith("event-writer") for t in threads)
        # Committed before the future resolved: visible to another connection.
        async with read_engine.connect() as conn:
            count = (await conn.exec_driver_sql("SELECT count(*) FROM events")).scalar()
        assert count == 7 and stored[0].position == 1
        # A taken (stream, version) fails only the request that took it.
        taken = writer.submit([NewEvent(stream, 3, MessagePosted("alice", "again"))])
        fine = writer.submit([NewEvent(stream, 8, MessagePosted("alice", "next"))])
        with pytest.raises(ConcurrencyError):
            await taken
        assert [s.position for s in await fine] == [8]
    finally:
        await writer.close()
        await writer_engine.dispose()
        await read_engine.dispose()
