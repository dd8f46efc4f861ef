"""Hostile frames against a real server: floods, binary frames and
attachments, unknown packet types, JSON that does not decode, oversized
packets on both transports. Each is refused or drops the offender only;
others keep chatting, and the server logs no traceback or error for any."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support import Client, InProcessServer, running_server, settings_for


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


class RawSocket:
    """engine.io and Socket.IO done by hand over aiohttp's WebSocket client,
    so a test can send what no library client would."""

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> None:
        self.session = session
        self.url = url
        self.headers = headers or {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.texts: list[str] = []
        self.close_code: int | None = None

    async def open(self) -> RawSocket:
        self.ws = await self.session.ws_connect(f"{self.url}/socket.io/?EIO=4&transport=websocket", headers=self.headers)
        opened = await self.next_text()
        assert opened is not None and opened.startswith("0{"), opened
        await self.ws.send_str("40")
        connected = await self.next_text()
        assert connected is not None and connected.startswith("40"), connected
        return self

    async def next_text(self, timeout: float = 10.0) -> str | None:
        """The next text frame (engine.io pings answered); None once closed."""
        assert self.ws is not None
        while True:
            msg = await self.ws.receive(timeout)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.close_code = self.ws.close_code
                return None
            if msg.data == "2":
                await self.ws.send_str("3")
                continue
            self.texts.append(msg.data)
            return msg.data

    async def until(self, predicate: Any, timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                text = await self.next_text(timeout)
                assert text is not None, f"closed; got {self.texts[-5:]}"
                if predicate(text):
                    return text

    async def closed(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the connection within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.next_text(timeout) is not None:
                    pass
        except TimeoutError:
            return False
        return True

    async def send(self, text: str) -> None:
        assert self.ws is not None
        await self.ws.send_str(text)

    async def login(self, name: str) -> None:
        await self.send(f'4290{json.dumps(["login", name])}')
        ack = await self.until(lambda t: t.startswith("4390"))
        assert json.loads(ack[4:])[0]["ok"], ack

    def events(self, name: str) -> list[Any]:
        out = []
        for text in self.texts:
            if text.startswith("42["):
                event, *args = json.loads(text[2:])
                if event == name:
                    out.append(args[0] if args else None)
        return out

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def watcher(server: InProcessServer, name: str = "watch") -> Client:
    client = await Client(server.url).connect()
    await client.login(name)
    return client


# -- floods ---------------------------------------------------------------


async def test_flooder_is_dropped_while_another_user_chats(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(db_url, rate_per_second=50, rate_burst=100)
    async with running_server(settings) as srv:
        innocent = await watcher(srv, "alice")
        flooder = await RawSocket(session, srv.url).open()
        try:
            await flooder.login("flood")
            frame = '42["chat","spam"]'
            sent = 0

            async def flood() -> None:
                nonlocal sent
                ws = flooder.ws
                assert ws is not None
                try:
                    while sent < 50_000 and not ws.closed:
                        await ws.send_str(frame)
                        sent += 1
                except (ConnectionError, aiohttp.ClientConnectionResetError):
                    pass  # the server hung up

            flooding = asyncio.create_task(flood())
            acks = [await innocent.call("chat", f"hello {i}") for i in range(20)]
            assert all(ack["ok"] for ack in acks), acks
            assert await flooder.closed(10)
            await innocent.wait_for(lambda: "flood" in innocent.events("userLeft"))
            await asyncio.wait_for(flooding, 10)
            assert sent > 2 * settings.rate_burst  # it did flood
            # The flooder's chats that got in are a bounded trickle.
            spam = [c for c in innocent.events("chat") if c["message"] == "spam"]
            assert len(spam) <= settings.rate_burst + 2 * settings.rate_per_second
            assert (await innocent.call("chat", "still fine"))["ok"]
        finally:
            await flooder.close()
            await innocent.disconnect()
    assert_no_errors_logged(caplog)


async def test_short_burst_over_budget_is_refused_with_acks_not_dropped(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # Frame budget 20/s, burst 40: 60 calls at once lose some, and each lost
    # one still gets an answer, but the socket stays.
    settings = settings_for(db_url, rate_per_second=10, rate_burst=20)
    async with running_server(settings) as srv:
        raw = await RawSocket(session, srv.url).open()
        try:
            await raw.login("burst")
            for i in range(60):
                await raw.send(f'42{100 + i}["onlineUsers"]')
            acks: dict[int, Any] = {}
            while len(acks) < 60:
                text = await raw.until(lambda t: t.startswith("43"))
                digits = text[2:5]
                acks[int(digits)] = json.loads(text[5:])[0]
            refused = [a for a in acks.values() if isinstance(a, dict)]
            assert refused and all(a["error"] == "rate_limited" for a in refused)
            await asyncio.sleep(1.5)  # the bucket refills
            await raw.send('42999["onlineUsers"]')
            text = await raw.until(lambda t: t.startswith("43999"))
            assert json.loads(text[5:])[0] == ["burst"]
        finally:
            await raw.close()
    assert_no_errors_logged(caplog)


async def test_websocket_ping_flood_is_counted(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # WebSocket control frames count too (aiohttp would answer them unseen).
    settings = settings_for(db_url, rate_per_second=10, rate_burst=20)
    async with running_server(settings) as srv:
        raw = await RawSocket(session, srv.url).open()
        try:
            assert raw.ws is not None
            with pytest.raises((ConnectionResetError, aiohttp.ClientConnectionResetError)):
                for _ in range(5_000):
                    await raw.ws.ping(b"x")
                raise ConnectionResetError("not dropped yet")
            assert await raw.closed(5)
        finally:
            await raw.close()
    assert_no_errors_logged(caplog)


# -- binary and unknown packets --------------------------------------------


async def test_binary_frame_drops_the_socket(
    server: InProcessServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    watch = await watcher(server)
    raw = await RawSocket(session, server.url).open()
    try:
        await raw.login("binny")
        assert raw.ws is not None
        await raw.ws.send_bytes(b"\x04\x00\x01binary")
        assert await raw.closed(5)
        assert raw.close_code == 1008
        await watch.wait_for(lambda: "binny" in watch.events("userLeft"))
        assert await watch.call("onlineUsers") == ["watch"]
    finally:
        await raw.close()
        await watch.disconnect()
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    "packet",
    [
        '451-["chat",{"_placeholder":true,"num":0}]',  # BINARY_EVENT: an attachment would follow
        '461-0[{"_placeholder":true,"num":0}]',  # BINARY_ACK
        '421-["chat",{"_placeholder":true,"num":0}]',  # attachments announced on a plain event
        '44{"message":"x"}',  # CONNECT_ERROR is the server's
        "47",  # no such Socket.IO type
        "4x",
        "7",  # no such engine.io type
        "x",
        "bBAUGBw==",  # an engine.io binary packet in base64
    ],
)
async def test_forbidden_packets_drop_the_socket(
    server: InProcessServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, packet: str
) -> None:
    watch = await watcher(server)
    raw = await RawSocket(session, server.url).open()
    try:
        await raw.login("evil")
        await raw.send(packet)
        assert await raw.closed(5), f"{packet!r} did not drop the socket"
        await watch.wait_for(lambda: "evil" in watch.events("userLeft"))
    finally:
        await raw.close()
        await watch.disconnect()
    assert_no_errors_logged(caplog)


# -- packets that do not decode --------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        "42" + "[" * 5000 + "]" * 5000,  # nested past Python's recursion limit
        '42["chat",',  # malformed
        "42" + "1" * 120 + '["chat","x"]',  # an ack id beyond python-socketio's limit
        '42{"chat":"x"}',  # not [name, ...]
        "42[]",
        "42[1,2]",
        '42["disconnect"]',  # python-socketio's own handler names
        '42["connect",{}]',
        "43[]",  # an ack without an id or a callback waiting
        '43"x"',
    ],
)
async def test_undecodable_packets_are_refused_with_bad_payload(
    server: InProcessServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, packet: str
) -> None:
    raw = await RawSocket(session, server.url).open()
    try:
        await raw.login("carol")
        await raw.send(packet)
        if packet.startswith("42"):
            notice = await raw.until(lambda t: t.startswith('42["protocolError"'))
            assert json.loads(notice[2:])[1] == {
                "event": None,
                "code": "bad_payload",
                "message": json.loads(notice[2:])[1]["message"],
            }
        # Still connected, still logged in, still the only carol.
        await raw.send('4291["onlineUsers"]')
        ack = await raw.until(lambda t: t.startswith("4391"))
        assert json.loads(ack[4:]) == [["carol"]]
    finally:
        await raw.close()
    assert_no_errors_logged(caplog)


async def test_bad_payload_notice_at_most_once_a_second_and_acks_answered(
    server: InProcessServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    raw = await RawSocket(session, server.url).open()
    try:
        await raw.login("dave")
        for i in range(10):
            await raw.send(f'42{500 + i}{{"not":"a list"}}')
        await raw.send('42600["onlineUsers"]')
        await raw.until(lambda t: t.startswith("43600"))
        acks = [json.loads(t[5:])[0] for t in raw.texts if t.startswith("435")]
        assert len(acks) == 10 and all(a["error"] == "bad_payload" for a in acks)
        assert 1 <= len(raw.events("protocolError")) <= 2  # at most one a second
        caplog.set_level(logging.WARNING)
    finally:
        await raw.close()
    warnings = [r for r in caplog.records if "bad packet" in r.getMessage()]
    assert len(warnings) <= 2  # one line a second per kind, not one per frame
    assert_no_errors_logged(caplog)


async def test_a_stream_of_bad_packets_ends_in_a_drop(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(db_url, rate_per_second=10, rate_burst=20)
    async with running_server(settings) as srv:
        raw = await RawSocket(session, srv.url).open()
        try:
            with pytest.raises((ConnectionResetError, aiohttp.ClientConnectionResetError)):
                for _ in range(5_000):
                    await raw.send('42["chat",')
                raise ConnectionResetError("not dropped yet")
            assert await raw.closed(5)
        finally:
            await raw.close()
    assert_no_errors_logged(caplog)


# -- the packet size cap, on both transports --------------------------------


async def test_websocket_message_over_the_cap_drops_the_socket(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(settings_for(db_url, max_packet_bytes=4096)) as srv:
        raw = await RawSocket(session, srv.url).open()
        try:
            await raw.send('42["chat","' + "y" * 5000 + '"]')
            assert await raw.closed(5)
            assert raw.close_code == 1009  # message too big
        finally:
            await raw.close()
    assert_no_errors_logged(caplog)


class Polling:
    """An engine.io long-polling session by hand."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.base = f"{url}/socket.io/?EIO=4&transport=polling"
        self.sid = ""

    async def open(self) -> Polling:
        async with self.session.get(self.base) as resp:
            body = await resp.text()
        assert body.startswith("0{"), body
        self.sid = json.loads(body[1:])["sid"]
        assert await self.post("40") == 200
        assert (await self.get()).startswith("40")
        return self

    async def post(self, data: Any, **kwargs: Any) -> int:
        async with self.session.post(f"{self.base}&sid={self.sid}", data=data, **kwargs) as resp:
            await resp.read()
            return resp.status

    async def get(self) -> str:
        async with self.session.get(f"{self.base}&sid={self.sid}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return await resp.text()

    async def gone(self) -> bool:
        async with self.session.get(f"{self.base}&sid={self.sid}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status == 400


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_polling_post_over_the_cap_is_refused(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, chunked: bool
) -> None:
    async with running_server(settings_for(db_url, max_packet_bytes=4096)) as srv:
        poll = await Polling(session, srv.url).open()
        body = ('42["chat","' + "y" * 5000 + '"]').encode()
        if chunked:

            async def pieces() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 1000):
                    yield body[i : i + 1000]

            status = await poll.post(pieces())
        else:
            status = await poll.post(body)
        assert status == 400
        assert await poll.gone()
    assert_no_errors_logged(caplog)


async def test_polling_counts_every_packet_of_a_post(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(db_url, rate_per_second=10, rate_burst=20)
    async with running_server(settings) as srv:
        watch = await watcher(srv)
        poll = await Polling(session, srv.url).open()
        assert await poll.post('42["login","pollr"]') == 200
        await watch.wait_for(lambda: "pollr" in watch.events("userJoined"))
        # 2,000 packets in one body, well under the size cap: engine.io's own
        # payload decoder would refuse more than 16 with a traceback.
        assert await poll.post("\x1e".join(['42["onlineUsers"]'] * 2000)) == 400
        assert await poll.gone()
        await watch.wait_for(lambda: "pollr" in watch.events("userLeft"))
        await watch.disconnect()
    assert_no_errors_logged(caplog)


async def test_polling_binary_and_unknown_packets_drop_the_socket(
    server: InProcessServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    for packet in ("bBAUGBw==", '451-["chat",{"_placeholder":true,"num":0}]', "9"):
        poll = await Polling(session, server.url).open()
        assert await poll.post(packet) == 400, packet
        assert await poll.gone()
    assert_no_errors_logged(caplog)



async def test_running_events_per_socket_are_bounded(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # While the database is locked by someone else, chats cannot finish:
    # the socket may have a burst of them running, and is answered
    # rate_limited for more instead of piling up tasks.
    import sqlite3

    settings = settings_for(db_url, rate_per_second=0, frame_rate_per_second=1000, frame_burst=20)
    async with running_server(settings) as srv:
        raw = await RawSocket(session, srv.url).open()
        path = db_url.split("///", 1)[1]
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            await raw.login("busy")
            blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
            for i in range(35):
                await raw.send(f'42{100 + i}["chat","m{i}"]')
                await asyncio.sleep(0.005)  # within the frame budget's rate
            refused: set[int] = set()
            async with asyncio.timeout(5):
                while len(refused) < 15:
                    text = await raw.until(lambda t: t.startswith("43"))
                    assert json.loads(text[5:])[0]["error"] == "rate_limited", text
                    refused.add(int(text[2:5]))
            blocker.execute("ROLLBACK")
            stored: set[int] = set()
            async with asyncio.timeout(15):
                while len(stored) < 20:
                    text = await raw.until(lambda t: t.startswith("43"))
                    assert json.loads(text[5:])[0]["ok"], text
                    stored.add(int(text[2:5]))
            assert stored == set(range(100, 120)) and refused == set(range(120, 135))
        finally:
            blocker.close()
            await raw.close()
    assert_no_errors_logged(caplog)


async def test_after_a_drop_new_sockets_from_that_address_get_no_burst_and_few_connects(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # A flooder that reconnects each time it is dropped must not get a fresh
    # burst with every connection; it still gets the steady rate.
    settings = settings_for(db_url, rate_per_second=10, rate_burst=20)  # frames: 20/s, burst 40

    async with running_server(settings) as srv:
        before = await RawSocket(session, srv.url).open()
        await before.login("early")
        assert all(isinstance(a, list) for a in await burst_of_calls(before, 100, 15))
        await before.close()
        flooder = await flood_until_dropped(session, srv.url)
        after = await RawSocket(session, srv.url).open()
        try:
            await after.login("later")
            answers = await burst_of_calls(after, 100, 15)
            refused = [a for a in answers if isinstance(a, dict)]
            assert len(refused) >= 5 and all(a["error"] == "rate_limited" for a in refused)
            assert after.ws is not None and not after.ws.closed  # refused, not dropped
            # And new connections from there are held to a couple a second.
            statuses = []
            for _ in range(4):
                async with session.get(f"{srv.url}/socket.io/?EIO=4&transport=polling") as resp:
                    statuses.append(resp.status)
            assert 429 in statuses, statuses
        finally:
            await after.close()
            await flooder.close()
    assert_no_errors_logged(caplog)


async def burst_of_calls(raw: RawSocket, first_id: int, n: int) -> list[Any]:
    """n onlineUsers calls at once; their answers (a list when served)."""
    for i in range(n):
        await raw.send(f'42{first_id + i}["onlineUsers"]')
    answers = []
    while len(answers) < n:
        text = await raw.until(lambda t: t.startswith("43"))
        answers.append(json.loads(text[5:])[0])
    return answers


async def flood_until_dropped(session: aiohttp.ClientSession, url: str, **headers: str) -> RawSocket:
    flooder = RawSocket(session, url, headers)
    await flooder.open()
    with pytest.raises((ConnectionResetError, aiohttp.ClientConnectionResetError)):
        for _ in range(5_000):
            await flooder.send('42["chat","spam"]')
        raise ConnectionResetError("not dropped yet")
    assert await flooder.closed(5)
    await flooder.close()
    return flooder


async def test_the_penalty_follows_the_forwarded_client_and_can_be_off(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # Behind a reverse proxy on this host (a loopback peer), the client is
    # the last X-Forwarded-For address: one client's drop does not cost the
    # others their burst.
    settings = settings_for(db_url, rate_per_second=10, rate_burst=20)
    async with running_server(settings) as srv:
        await flood_until_dropped(session, srv.url, **{"X-Forwarded-For": "203.0.113.9, 10.0.0.1"})
        other = await RawSocket(session, srv.url, {"X-Forwarded-For": "10.0.0.2"}).open()
        same = await RawSocket(session, srv.url, {"X-Forwarded-For": "10.0.0.1"}).open()
        try:
            await other.login("other")
            assert all(isinstance(a, list) for a in await burst_of_calls(other, 100, 15))
            await same.login("same")
            assert any(isinstance(a, dict) for a in await burst_of_calls(same, 100, 15))
        finally:
            await other.close()
            await same.close()
    async with running_server(settings_for(db_url, rate_per_second=10, rate_burst=20, flood_penalty_seconds=0)) as srv:
        await flood_until_dropped(session, srv.url)
        again = await RawSocket(session, srv.url).open()
        try:
            await again.login("again")
            assert all(isinstance(a, list) for a in await burst_of_calls(again, 100, 15))
        finally:
            await again.close()
    assert_no_errors_logged(caplog)
