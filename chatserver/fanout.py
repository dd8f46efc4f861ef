"""Fan-out without a task per recipient: Socket.IO on WebSockets, written
straight to each socket's transport.

python-socketio's stock path costs an asyncio task per recipient per emit (its
client manager), then a queue and a writer task per socket (engine.io), then
one ``send`` syscall per packet. Here:

- ``FanoutManager.emit`` encodes a packet and its WebSocket frame once and
  appends the same bytes to every recipient's output buffer (a server frame is
  unmasked, so it is the same for everyone);
- ``DirectSocket`` (every engine.io socket of a ``FanoutServer``) sends every
  engine.io packet (events, acks, pings, close) through that buffer once the
  socket is on WebSocket, so nothing written directly can overtake a packet
  still queued: when a socket switches to direct writes (at the WebSocket
  handshake, or at the end of an upgrade from polling) what engine.io had
  queued is moved to the buffer first. Polling sockets keep engine.io's queue;
- ``_Flusher`` writes each socket's buffer with one ``transport.write`` per
  loop turn (everything sent to a socket in one turn is coalesced, in order);
- a socket whose unsent output passes ``max_buffer`` bytes (a client that
  stopped reading) is aborted and disconnected as if it had gone away; it
  never holds up delivery to anyone else, since nothing awaits its drain;
- the WebSocket is accepted without permessage-deflate: python-engineio's
  aiohttp driver accepts compression whenever a client offers it, which
  doubles the server's cost per delivery; Node's socket.io leaves it off too;
- incoming WebSocket messages are read by one loop per socket without a task
  and a ``wait_for`` per message (dead clients are found by engine.io's
  ping timeout, which closes the socket).

What a client sends is bounded before anything decodes it (see
``DirectSocket.admit``): every WebSocket frame (data or control) and every
packet of a polling POST counts against the socket's ``FrameBudget``; a frame
over budget is dropped undecoded (an ack it asked for answers
``rate_limited``), and a socket that keeps it up is disconnected. Binary
frames, engine.io binary packets, Socket.IO binary events and acks (whose
attachments python-socketio would buffer) and unknown packet types drop the
socket at once. Packets that do not decode (malformed or too deeply nested
JSON, an event that is not ``[name, ...]``) are refused with ``protocolError``
``bad_payload`` and count as refusals (``FanoutServer._handle_eio_message``).
A POST body over the packet cap is refused whether or not it says its length.
A socket's read loop yields to the event loop every few frames, so a burst of
buffered frames cannot keep other sockets waiting, and every event handler
task is counted, so a socket cannot have more than a burst of them running.
After a socket is dropped for what it sent, its address is in a penalty box
for a while (``FanoutEngineServer.penalize``): new sockets from there start
without a burst, and new connections are held to two a second, so a flooder
that reconnects each time gains little.

This depends on engine.io's internals (``AsyncSocket``'s queue, flags and
``_upgrade_websocket``; the server's ``_trigger_event``): pyproject.toml pins
python-engineio and python-socketio to exact versions, and
``tests/test_fanout.py`` covers ordering, pings, upgrades, acks and slow
clients.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import engineio
import orjson
import socketio
from aiohttp import WSMsgType, web
from engineio import async_socket, exceptions as eio_exceptions
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from . import protocol
from .logs import client_problem
from .metrics import STATS
from .ratelimit import ACCEPT, DROP, FrameBudget, TokenBucket
from .sockets import SocketIOPublisher

log = logging.getLogger(__name__)

# Unsent bytes one socket may have queued in user space (beyond what the
# kernel's socket buffer holds) before it is dropped as too slow.
DEFAULT_MAX_BUFFER = 4 * 1024 * 1024

# Most packets in one long-polling response: python-engineio's client refuses
# a payload of more than 16 packets; the rest wait for the next poll.
MAX_POLL_PACKETS = 16

_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PONG = 0xA
_CLOSE_POLICY = 1008  # RFC 6455: the message violates the server's policy

# A socket's read loop gives the event loop a turn after this many frames:
# aiohttp's receive() returns without suspending while frames are buffered.
YIELD_EVERY = 32

# Defaults of the frame budget when none is given (see Settings).
DEFAULT_FRAME_RATE = 400.0
DEFAULT_FRAME_BURST = 800
DEFAULT_FLOOD_GRACE = 2.0

# After a socket is dropped for what it sent, new sockets from its address
# start with this many tokens instead of a full burst, for this long: enough
# for a client's first few packets (connect, login, history), not a flood.
PENALIZED_START_TOKENS = 8
DEFAULT_PENALTY_SECONDS = 30.0
MAX_PENALIZED = 10_000  # addresses remembered at once
# ... and it may open only this many new connections a second (burst as
# many): each costs a handshake, a login and a leave, both stored durably.
PENALIZED_CONNECTS_PER_SECOND = 2.0


class _Penalty:
    __slots__ = ("until", "connects")

    def __init__(self, until: float, now: float) -> None:
        self.until = until
        self.connects = TokenBucket(PENALIZED_CONNECTS_PER_SECOND, int(PENALIZED_CONNECTS_PER_SECOND), now)


# The answer to an ack-requesting frame refused before it was decoded.
_RATE_LIMITED_ACK = orjson.dumps(
    [{"ok": False, "error": "rate_limited", "message": "too many messages; slow down"}]
).decode()
_MAX_ACK_ID_DIGITS = 20

# Socket.IO packet types a client may send (CONNECT, DISCONNECT, EVENT, ACK);
# the rest (CONNECT_ERROR, BINARY_EVENT, BINARY_ACK, anything else) drop it.
_SIO_CLIENT_TYPES = frozenset("0123")
# Event names python-socketio keeps for itself: a client emitting them would
# run the server's own connect/disconnect handlers.
_RESERVED_EVENTS = frozenset(("connect", "disconnect", "connect_error"))

def refused_ack(data: str) -> str | None:
    """The Socket.IO ACK packet answering ``rate_limited`` to a refused event
    that asked for an ack ('42<id>[...]', default namespace), found without
    decoding the event; None when it asked for none."""
    if data[:2] != "42":
        return None
    end = 2
    limit = min(len(data), 2 + _MAX_ACK_ID_DIGITS)
    while end < limit and data[end] in "0123456789":
        end += 1
    if end == 2 or end >= len(data) or data[end] != "[":
        return None
    return "3" + data[2:end] + _RATE_LIMITED_ACK


def ws_frame(payload: bytes, opcode: int = _OP_TEXT) -> bytes:
    """One unmasked, unfragmented, uncompressed WebSocket frame (RFC 6455)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def eio_frame(pkt: eio_packet.Packet) -> bytes:
    """The WebSocket frame that carries an engine.io packet."""
    encoded = pkt.encode()
    if isinstance(encoded, (bytes, bytearray)):
        return ws_frame(bytes(encoded), _OP_BINARY)
    return ws_frame(encoded.encode())


class _Flusher:
    """Sockets with pending output; each is written once per loop turn."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[DirectSocket] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, sock: DirectSocket) -> None:
        self._dirty.append(sock)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for sock in dirty:
            sock._flush()


class DirectSocket(async_socket.AsyncSocket):
    """An engine.io socket that, once on WebSocket, writes frames itself.

    ``FanoutEngineServer`` turns every socket it creates into one of these
    before anything can send to it (the class is set on the instance when
    engine.io fires ``connect``; the queue and flags are engine.io's own).
    """

    # engine.io's own, declared for the type checker
    connected: bool

    # set by _adopt()
    direct: bool
    _out: list[bytes]
    _dirty: bool
    _dead: bool
    _ws: web.WebSocketResponse | None
    _transport: asyncio.Transport | None
    _flusher: _Flusher
    _max_buffer: int
    _closer: asyncio.Task[None] | None
    _held: list[eio_packet.Packet]
    budget: FrameBudget
    dropped: str | None
    last_notice: float
    peer: str | None

    def _adopt(self, flusher: _Flusher, max_buffer: int, budget: FrameBudget) -> None:
        self.direct = False
        self._out = []
        self._dirty = False
        self._dead = False
        self._ws = None
        self._transport = None
        self._flusher = flusher
        self._max_buffer = max_buffer
        self._closer = None
        self._held = []
        self.budget = budget
        self.dropped = None  # why the server dropped it, once it did
        self.last_notice = float("-inf")  # the last bad_payload notice
        self.peer = None  # the client's address, for the penalty box

    # -- output ------------------------------------------------------------
    def write_frame(self, frame: bytes, now: bool = False) -> None:
        """Queue one WebSocket frame behind everything sent before (direct
        mode); with ``now``, write it at once if nothing is queued ahead."""
        if self._dead:
            return
        if now and not self._out:
            self._write(frame)
            return
        self._out.append(frame)
        if not self._dirty:
            self._dirty = True
            self._flusher.mark(self)

    def _flush(self) -> None:
        self._dirty = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._write(data)

    def pending_bytes(self) -> int:
        """Bytes sent to this socket and not yet handed to the kernel."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0
        return buffered + sum(len(frame) for frame in self._out)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if self._dead or transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self._max_buffer:
            self._overflow(transport)

    def _overflow(self, transport: asyncio.Transport) -> None:
        STATS.drop("slow")
        client_problem(
            "slow_socket",
            "engine.io socket %s: more than %d bytes unsent, dropping it as too slow",
            self.sid,
            self._max_buffer,
            sid=self.sid,
        )
        self._dead = True
        # The reader sees the connection lost, and the socket closes as if the
        # client had gone away (disconnect handlers run as usual).
        transport.abort()

    async def send(self, pkt: eio_packet.Packet) -> None:
        if self.direct:
            if not self.closed:
                self.write_frame(eio_frame(pkt))
            return
        await super().send(pkt)

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        was_open = not self.closed and not self.closing
        await super().close(wait=wait, abort=abort, reason=reason)
        if was_open and self.direct and not abort and self._ws is not None and self._closer is None:
            # The server closed it (ping timeout, disconnect()): the CLOSE
            # packet is in the buffer; send it, then close the WebSocket,
            # which also ends this socket's read loop.
            self._closer = asyncio.ensure_future(self._close_ws())

    async def _close_ws(self) -> None:
        self._flush()
        ws = self._ws
        if ws is not None and not ws.closed:
            try:
                await ws.close()
            except Exception:  # pragma: no cover - the peer is gone anyway
                log.debug("closing the websocket of %s failed", self.sid, exc_info=True)

    def _go_direct(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        """Switch to direct writes, moving what engine.io queued to the buffer
        first (no await in between, so nothing can slip past)."""
        self._ws = ws
        self._transport = transport
        self.direct = True
        held, self._held = self._held, []
        for pkt in held:
            self.write_frame(eio_frame(pkt))
        while True:
            try:
                pkt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.queue.task_done()
            if pkt is not None:
                self.write_frame(eio_frame(pkt))

    # -- long polling ------------------------------------------------------
    async def poll(self) -> list[eio_packet.Packet]:
        if self._held:
            packets, self._held = self._held[:MAX_POLL_PACKETS], self._held[MAX_POLL_PACKETS:]
            return packets
        packets = await super().poll()
        if len(packets) > MAX_POLL_PACKETS:
            packets, self._held = packets[:MAX_POLL_PACKETS], packets[MAX_POLL_PACKETS:]
        return packets

    # -- what the client sends ---------------------------------------------
    def admit(self, data: str) -> tuple[bool, str | None]:
        """Count one incoming frame against the budget, before decoding it:
        (handle it?, an ack to send for it when refused)."""
        verdict = self.budget.frame(time.monotonic())
        if verdict == ACCEPT:
            return True, None
        if verdict == DROP:
            self.drop(
                "flood",
                f"over its frame budget ({self.budget.rate:g}/s, burst {self.budget.burst:g}); "
                f"{self.budget.refused} frames refused",
            )
            return False, None
        return False, refused_ack(data)

    def drop(self, kind: str, detail: str) -> None:
        """Disconnect a client that broke the rules. On WebSocket the
        connection is closed at once (no more of its frames are read; a
        close frame says why when it fits); the socket then closes as if the
        client had gone, and its user leaves through the usual path."""
        if self.dropped is not None:
            return
        self.dropped = kind
        STATS.drop(kind)
        client_problem(kind, "engine.io socket %s dropped: %s", self.sid, detail, sid=self.sid)
        penalize = getattr(self.server, "penalize", None)
        if penalize is not None:
            penalize(self.peer)
        transport = self._transport
        if not self.direct or transport is None:
            return  # polling: handle_post_request closes it
        self._flush()
        self._dead = True
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() == 0:
            reason = struct.pack("!H", _CLOSE_POLICY) + kind.encode()
            transport.write(ws_frame(reason, _OP_CLOSE))
            transport.close()  # flushes the close frame; reads nothing more
        else:
            transport.abort()

    async def _dispatch(self, on_message: Callable[[str, str], Awaitable[Any]] | None, data: str) -> None:
        """Handle one admitted engine.io packet; only the types a client may
        send get further than their first character."""
        head = data[:1]
        if head == "4":
            if on_message is not None:
                await on_message(self.sid, data[1:])
        elif head == "3":
            await self.receive(eio_packet.Packet(eio_packet.PONG))
        elif head == "1":
            await self.receive(eio_packet.Packet(eio_packet.CLOSE))
        elif head in ("2", "5", "6"):
            pass  # ping, upgrade, noop: nothing for a server to do
        elif head == "b":
            self.drop("binary", "an engine.io binary packet")
        else:
            self.drop("unknown_packet", f"an engine.io packet of type {head[:1]!r}")

    # -- long polling input --------------------------------------------------
    async def handle_post_request(self, environ: dict[str, Any]) -> None:
        """engine.io's, with the size cap applied to every body (also one
        sent without a Content-Length) and each packet counted."""
        cap = self.server.max_http_buffer_size
        body = await _read_capped(environ, cap)
        if body is None:
            self.drop("too_large", f"a POST body over {cap} bytes")
        else:
            try:
                text = body.decode()
            except UnicodeDecodeError:
                self.drop("bad_frame", "a POST body that is not UTF-8")
            else:
                await self._receive_payload(text)
        if self.dropped is not None:
            await self.close(wait=False, reason=self.server.reason.SERVER_DISCONNECT)
            raise eio_exceptions.EngineIOError(self.dropped)

    async def _receive_payload(self, text: str) -> None:
        if not text:
            return
        if text.startswith("d="):  # a JSONP form post
            text = urllib.parse.parse_qs(text).get("d", [""])[0]
        on_message = self.server.handlers.get("message")
        for data in text.split("\x1e"):
            handle, ack = self.admit(data)
            if handle:
                await self._dispatch(on_message, data)
            elif ack is not None:
                await self.send(eio_packet.Packet(eio_packet.MESSAGE, ack))
            if self.dropped is not None or self.closed:
                return

    # -- the WebSocket transport ------------------------------------------
    async def _upgrade_websocket(self, environ: dict[str, Any]) -> Any:
        if self.upgraded:
            raise OSError("Socket has been upgraded already")
        request: web.Request = environ["aiohttp.request"]
        # compress=False: no permessage-deflate, whatever the client offers.
        # autoping=False: a WebSocket ping is a frame like any other, counted
        # by the read loop (aiohttp would answer every one unseen).
        ws = web.WebSocketResponse(
            max_msg_size=self.server.max_http_buffer_size, compress=False, autoping=False
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:  # pragma: no cover - the client left mid-handshake
            return ws
        await self._run_websocket(ws, transport)
        return ws

    async def _receive_text(self, ws: web.WebSocketResponse) -> str | None:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            return msg.data
        return None

    async def _run_websocket(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        if self.connected:
            # An upgrade from polling: probe, release the pending poll, switch.
            self.upgrading = True
            probe = await self._receive_text(ws)
            if probe != "2probe":
                self.upgrading = False
                await ws.close()
                return
            await ws.send_str("3probe")
            await self.queue.put(eio_packet.Packet(eio_packet.NOOP))
            upgrade = await self._receive_text(ws)
            if upgrade != "5":
                self.upgrading = False
                await ws.close()
                return
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True
        self._go_direct(ws, transport)
        try:
            await self._read_loop(ws)
        finally:
            self._flush()
            self._dead = True
            if not ws.closed and self.dropped is None:
                await ws.close()
            reason = self.server.reason
            await self.close(
                wait=False,
                abort=True,
                reason=reason.TRANSPORT_CLOSE if self.dropped is None else reason.SERVER_DISCONNECT,
            )

    async def _read_loop(self, ws: web.WebSocketResponse) -> None:
        on_message = self.server.handlers.get("message")
        unyielded = 0
        while True:
            msg = await ws.receive()
            kind = msg.type
            if self.closed or self.dropped is not None:
                return
            unyielded += 1
            if unyielded >= YIELD_EVERY:
                # Whether or not receive() suspended, others get a turn.
                unyielded = 0
                await asyncio.sleep(0)
                if self.closed or self.dropped is not None:
                    return
            if kind is WSMsgType.TEXT:
                data: str = msg.data
            elif kind is WSMsgType.PING or kind is WSMsgType.PONG:
                if self.admit("")[0] and kind is WSMsgType.PING:
                    self.write_frame(ws_frame(msg.data, _OP_PONG))
                continue
            elif kind is WSMsgType.BINARY:
                self.drop("binary", "a binary WebSocket frame")
                return
            else:
                if kind is WSMsgType.ERROR:
                    client_problem("bad_frame", "engine.io socket %s: %s", self.sid, ws.exception())
                return  # CLOSE, CLOSING, CLOSED, ERROR
            handle, ack = self.admit(data)
            if not handle:
                if ack is not None:
                    self.write_frame(ws_frame(("4" + ack).encode()))
                if self.dropped is not None:
                    return
                continue
            try:
                await self._dispatch(on_message, data)
            except eio_exceptions.SocketIsClosedError:
                return
            except Exception:
                # Client mistakes are refused without raising; this is ours.
                log.exception("engine.io socket %s: error handling a message", self.sid)
            if self.dropped is not None:
                return


def _peer_address(environ: Any) -> str | None:
    request = environ.get("aiohttp.request") if isinstance(environ, dict) else None
    return peer_of(request) if isinstance(request, web.Request) else None


def peer_of(request: web.Request) -> str | None:
    """The client's address, for the penalty box. engine.io's aiohttp
    driver puts 127.0.0.1 in REMOTE_ADDR whatever the peer, so this asks the
    request. A peer on loopback is taken to be a reverse proxy on this host
    (the server listens on 127.0.0.1 by default): the last address it added
    to X-Forwarded-For is the client's. Only local processes can reach a
    loopback peer, so nobody else can forge that header here."""
    remote = request.remote
    if remote in ("127.0.0.1", "::1"):
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            last = forwarded.rsplit(",", 1)[-1].strip()
            if last:
                return last
    return remote


async def _read_capped(environ: dict[str, Any], cap: int) -> bytes | None:
    """A request body of at most ``cap`` bytes, or None when it is longer
    (then no more of it than cap + 1 bytes is read)."""
    declared = environ.get("CONTENT_LENGTH")
    if declared:
        try:
            if int(declared) > cap:
                return None
        except ValueError:
            return None
    stream = environ["wsgi.input"]
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(cap + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)


class FanoutEngineServer(engineio.AsyncServer):
    """engine.io server whose sockets are ``DirectSocket``s."""

    def __init__(
        self,
        *args: Any,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        frame_rate: float = DEFAULT_FRAME_RATE,
        frame_burst: int = DEFAULT_FRAME_BURST,
        flood_grace: float = DEFAULT_FLOOD_GRACE,
        penalty_seconds: float = DEFAULT_PENALTY_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.async_mode != "aiohttp":
            raise ValueError("the fan-out engine needs async_mode='aiohttp'")
        self.max_buffer = max_buffer
        self.frame_rate = frame_rate
        self.frame_burst = frame_burst
        self.flood_grace = flood_grace
        self.penalty_seconds = penalty_seconds
        self.flusher = _Flusher()
        # Peer address -> its penalty (until when, and its connection bucket).
        self._penalized: dict[str, _Penalty] = {}

    def penalize(self, peer: str | None) -> None:
        """A socket from ``peer`` was dropped for what it sent: for a while,
        new sockets from there get the budget's rate but not its burst. A
        flooder that reconnects each time it is dropped would otherwise get a
        fresh burst (hundreds of accepted chats) with every connection."""
        if peer is None or self.penalty_seconds <= 0:
            return
        now = time.monotonic()
        if len(self._penalized) >= MAX_PENALIZED:
            self._penalized = {p: t for p, t in self._penalized.items() if t.until > now}
            if len(self._penalized) >= MAX_PENALIZED:
                self._penalized.pop(next(iter(self._penalized)))
        penalty = self._penalized.pop(peer, None)  # re-inserted last: the oldest go first
        if penalty is None:
            penalty = _Penalty(now + self.penalty_seconds, now)
        else:
            penalty.until = now + self.penalty_seconds
        self._penalized[peer] = penalty

    def _penalty(self, peer: str | None, now: float) -> _Penalty | None:
        penalty = self._penalized.get(peer) if peer is not None else None
        if penalty is not None and penalty.until <= now:
            del self._penalized[peer]  # type: ignore[arg-type]
            return None
        return penalty

    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        request = args[0] if args else None
        if self._penalized and isinstance(request, web.Request) and "sid" not in request.query:
            # A new connection from an address just dropped for flooding:
            # refused before any handshake work beyond the steady rate.
            now = time.monotonic()
            peer = peer_of(request)
            penalty = self._penalty(peer, now)
            if penalty is not None and not penalty.connects.take(now):
                client_problem("penalized", "refused a new connection from %s (recently dropped)", peer)
                return web.Response(status=429, text="too many connections; slow down")
        return await super().handle_request(*args, **kwargs)

    def _new_budget(self, peer: str | None) -> FrameBudget:
        now = time.monotonic()
        budget = FrameBudget(self.frame_rate, self.frame_burst, self.flood_grace, now)
        if self._penalty(peer, now) is not None:
            budget.start_with(PENALIZED_START_TOKENS)
        return budget

    def _log_error_once(self, message: str, message_key: str) -> None:
        # engine.io logs each kind of refused request (a foreign origin, an
        # unknown session, a bad transport) as an ERROR once, then at INFO:
        # these are the client's mistakes, worth a warning a second at most.
        client_problem(f"engineio-{message_key}", "engine.io refused a request: %s", message)

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "connect":
            # Fired right after engine.io creates the socket and queues its
            # OPEN packet, before anything else can send to it.
            sock = self.sockets.get(args[0])
            if sock is not None and type(sock) is async_socket.AsyncSocket:
                sock.__class__ = DirectSocket
                peer = _peer_address(args[1]) if len(args) > 1 else None
                sock._adopt(self.flusher, self.max_buffer, self._new_budget(peer))
                sock.peer = peer
        return await super()._trigger_event(event, *args, **kwargs)


class FanoutServer(socketio.AsyncServer):
    """python-socketio server on ``FanoutEngineServer`` (aiohttp only).

    Incoming packets are checked before python-socketio sees them (see
    ``_handle_eio_message``), and each socket may have at most
    ``frame_burst`` event handlers running at once: python-socketio runs
    every event in a task of its own (``async_handlers``, kept so that one
    slow command, such as a chat waiting for its commit, does not hold up
    the socket's next one), and without a bound a client could pile up
    tasks faster than a stalled database finishes them."""

    def __init__(
        self,
        *args: Any,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        frame_rate: float = DEFAULT_FRAME_RATE,
        frame_burst: int = DEFAULT_FRAME_BURST,
        flood_grace: float = DEFAULT_FLOOD_GRACE,
        penalty_seconds: float = DEFAULT_PENALTY_SECONDS,
        **kwargs: Any,
    ) -> None:
        self._engine_options: dict[str, Any] = dict(
            max_buffer=max_buffer,
            frame_rate=frame_rate,
            frame_burst=frame_burst,
            flood_grace=flood_grace,
            penalty_seconds=penalty_seconds,
        )
        self.max_running_events = max(frame_burst, 1)
        self._running: dict[str, int] = {}
        self._event_tasks: set[asyncio.Task[Any]] = set()
        super().__init__(*args, **kwargs)

    def _engineio_server_class(self) -> Any:
        options = self._engine_options

        class _Engine(FanoutEngineServer):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **options, **kwargs)

        return _Engine

    def _direct_socket(self, eio_sid: str) -> DirectSocket | None:
        sock = self.eio.sockets.get(eio_sid)
        return sock if type(sock) is DirectSocket else None

    def _drop(self, eio_sid: str, kind: str, detail: str) -> None:
        sock = self._direct_socket(eio_sid)
        if sock is not None:
            sock.drop(kind, detail)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """python-socketio's dispatch, refusing what this server never uses
        before it is decoded or buffered, and a packet that does not decode
        without an exception escaping (a traceback per bad frame was a way
        to fill the log)."""
        if not isinstance(data, str):
            self._drop(eio_sid, "binary", "a binary Socket.IO packet")
            return
        head = data[:1]
        if head not in _SIO_CLIENT_TYPES:
            kind = "binary" if head in ("5", "6") else "unknown_packet"
            self._drop(eio_sid, kind, f"a Socket.IO packet of type {head!r}")
            return
        try:
            pkt = self.packet_class(encoded_packet=data)
        except (ValueError, RecursionError):
            # Malformed or too deeply nested JSON, a bad id or namespace.
            await self._bad_payload(eio_sid, None, "the packet is not valid Socket.IO JSON")
            return
        if pkt.attachment_count:
            self._drop(eio_sid, "binary", "a Socket.IO packet announcing binary attachments")
            return
        kind = pkt.packet_type
        if kind == sio_packet.EVENT:
            args = pkt.data
            if not (isinstance(args, list) and args and isinstance(args[0], str)) or args[0] in _RESERVED_EVENTS:
                await self._bad_payload(eio_sid, pkt, "an event is [name, ...args] with a name of our protocol")
                return
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, args)
        elif kind == sio_packet.ACK:
            if not isinstance(pkt.data, list):
                await self._bad_payload(eio_sid, None, "an ack carries a list of arguments")
                return
            await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == sio_packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        else:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)

    async def _bad_payload(self, eio_sid: str, pkt: Any, message: str) -> None:
        """Refuse a packet that did not decode into something we handle: it
        counts as a refused frame, the client is told (at most once a second)
        and an ack it asked for says so."""
        client_problem("bad_payload", "engine.io socket %s: bad packet: %s", eio_sid, message)
        now = time.monotonic()
        sock = self._direct_socket(eio_sid)
        namespace = (pkt.namespace if pkt is not None else None) or "/"
        if pkt is not None and pkt.id is not None:
            error = {"ok": False, "error": "bad_payload", "message": message}
            await self._send_packet(eio_sid, self.packet_class(sio_packet.ACK, namespace=namespace, id=pkt.id, data=[error]))
        if sock is not None:
            if sock.budget.refusal(now) == DROP:
                sock.drop("flood", f"kept sending bad packets ({sock.budget.refused} refused)")
                return
            if now - sock.last_notice < 1.0:
                return
            sock.last_notice = now
        if self.manager.sid_from_eio_sid(eio_sid, namespace) is None:
            return  # not connected to the namespace: nobody to tell
        notice = {"event": None, "code": "bad_payload", "message": message}
        await self._send_packet(
            eio_sid, self.packet_class(sio_packet.EVENT, namespace=namespace, data=[protocol.PROTOCOL_ERROR, notice])
        )

    async def _handle_event(self, eio_sid: str, namespace: str | None, id: int | None, data: list[Any]) -> None:
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if not self.manager.is_connected(sid, namespace):
            return
        if not self.async_handlers:
            await self._handle_event_internal(self, sid, eio_sid, data, namespace, id)
            return
        running = self._running.get(eio_sid, 0)
        if running >= self.max_running_events:
            # The handlers have not kept up (a stalled database, say): refuse
            # rather than queue without bound.
            client_problem("busy", "engine.io socket %s: %d events still running, refusing more", eio_sid, running)
            sock = self._direct_socket(eio_sid)
            if sock is not None and sock.budget.refusal(time.monotonic()) == DROP:
                sock.drop("flood", f"{running} events still running and more coming")
                return
            if id is not None:
                ack = orjson.loads(_RATE_LIMITED_ACK)
                await self._send_packet(eio_sid, self.packet_class(sio_packet.ACK, namespace=namespace, id=id, data=ack))
            return
        self._running[eio_sid] = running + 1
        task = asyncio.ensure_future(self._handle_event_internal(self, sid, eio_sid, data, namespace, id))
        self._event_tasks.add(task)
        task.add_done_callback(partial(self._event_done, eio_sid))

    def _event_done(self, eio_sid: str, task: asyncio.Task[Any]) -> None:
        self._event_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Handlers answer every client mistake; this is a bug of ours.
            log.error("engine.io socket %s: an event handler failed", eio_sid, exc_info=exc)
        left = self._running.get(eio_sid, 0) - 1
        if left > 0:
            self._running[eio_sid] = left
        else:
            self._running.pop(eio_sid, None)


class FanoutManager(socketio.AsyncManager):
    """Client manager that encodes an emit once and writes it to every
    recipient without a task per recipient."""

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        write_now: bool = False,
        **kwargs: Any,
    ) -> None:
        """``write_now``: the caller emits nothing more this turn, so a
        recipient with nothing queued gets the frame at once instead of at
        the flush (writes to a socket are still one per turn otherwise)."""
        if callback is not None:
            # Every recipient needs its own ack id: the stock path.
            await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                               callback=callback, to=to, **kwargs)
            return
        room = to or room
        if namespace not in self.rooms:
            return
        if isinstance(data, tuple):
            args = [event, *data]
        elif data is None:
            args = [event]
        else:
            args = [event, data]
        try:
            body = orjson.dumps(args)
        except TypeError:
            # Binary attachments (or something orjson cannot encode): stock path.
            await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, to=to, **kwargs)
            return
        prefix = b"42" if namespace == "/" else b"42" + namespace.encode() + b","
        payload = prefix + body
        # Recipients are taken before anything can suspend.
        recipients = self._recipients(namespace, room, skip_sid)
        if not recipients:
            return
        frame = ws_frame(payload)
        # Counted per broadcast, not per recipient: the hot loop stays as is.
        STATS.deliveries += len(recipients)
        STATS.delivery_bytes += len(recipients) * len(frame)
        sockets = self.server.eio.sockets
        slow: list[Any] = []
        for eio_sid in recipients:
            sock = sockets.get(eio_sid)
            if sock is None:
                continue
            if type(sock) is DirectSocket and sock.direct:
                if not sock.closed:
                    sock.write_frame(frame, write_now)
            else:
                slow.append(sock)
        if slow:
            text = payload[1:].decode()  # engine.io adds its own "4"
            for sock in slow:
                if not sock.closed:
                    await sock.send(eio_packet.Packet(eio_packet.MESSAGE, text))

    def _recipients(self, namespace: str, room: Any, skip_sid: Any) -> list[str]:
        ns = self.rooms.get(namespace, {})
        if room is not None and not isinstance(room, str) and isinstance(room, Iterable):
            merged: dict[str, str] = {}
            for r in room:
                members = ns.get(r)
                if members:
                    merged.update(members)
            members_map: Any = merged
        else:
            members_map = ns.get(room)
            if not members_map:
                return []
        if skip_sid is None:
            return list(members_map.values())
        skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        return [eio for sid, eio in members_map.items() if sid not in skip]


class FanoutPublisher(SocketIOPublisher):
    """The service's publisher on a ``FanoutManager``: emits go straight to
    the manager (no per-call logging and argument shuffling of ``sio.emit``)."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        super().__init__(sio)
        self.manager = sio.manager

    async def send(self, sid: str, event: str, data: Any = None) -> None:
        await self.manager.emit(event, data, "/", room=sid)

    async def broadcast(self, event: str, data: Any = None, *, to: list[str] | None = None, last: bool = False) -> None:
        room: Any = protocol.LOBBY_ROOM if to is None else to[0] if len(to) == 1 else to
        await self.manager.emit(event, data, "/", room=room, write_now=last)

    def flush(self) -> None:
        self.manager.server.eio.flusher.flush()
