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
from collections.abc import Iterable
from typing import Any

import engineio
import orjson
import socketio
from aiohttp import WSMsgType, web
from engineio import async_socket, exceptions as eio_exceptions
from engineio import packet as eio_packet

from . import protocol
from .logs import client_problem
from .metrics import STATS
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

    def _adopt(self, flusher: _Flusher, max_buffer: int) -> None:
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

    # -- the WebSocket transport ------------------------------------------
    async def _upgrade_websocket(self, environ: dict[str, Any]) -> Any:
        if self.upgraded:
            raise OSError("Socket has been upgraded already")
        request: web.Request = environ["aiohttp.request"]
        # compress=False: no permessage-deflate, whatever the client offers.
        ws = web.WebSocketResponse(max_msg_size=self.server.max_http_buffer_size, compress=False)
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
            if not ws.closed:
                await ws.close()
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)

    async def _read_loop(self, ws: web.WebSocketResponse) -> None:
        on_message = self.server.handlers.get("message")
        while True:
            msg = await ws.receive()
            if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                return  # CLOSE, CLOSING, CLOSED, ERROR
            data = msg.data
            if self.closed:
                return
            try:
                if on_message is not None and isinstance(data, str) and data[:1] == "4":
                    # The common case, a message: straight to Socket.IO.
                    await on_message(self.sid, data[1:])
                else:
                    await self.receive(eio_packet.Packet(encoded_packet=data))
            except eio_exceptions.UnknownPacketError:
                pass
            except eio_exceptions.SocketIsClosedError:
                return
            except Exception:
                log.exception("engine.io socket %s: error handling a message", self.sid)


class FanoutEngineServer(engineio.AsyncServer):
    """engine.io server whose sockets are ``DirectSocket``s."""

    def __init__(self, *args: Any, max_buffer: int = DEFAULT_MAX_BUFFER, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.async_mode != "aiohttp":
            raise ValueError("the fan-out engine needs async_mode='aiohttp'")
        self.max_buffer = max_buffer
        self.flusher = _Flusher()

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "connect":
            # Fired right after engine.io creates the socket and queues its
            # OPEN packet, before anything else can send to it.
            sock = self.sockets.get(args[0])
            if sock is not None and type(sock) is async_socket.AsyncSocket:
                sock.__class__ = DirectSocket
                sock._adopt(self.flusher, self.max_buffer)
        return await super()._trigger_event(event, *args, **kwargs)


class FanoutServer(socketio.AsyncServer):
    """python-socketio server on ``FanoutEngineServer`` (aiohttp only)."""

    def __init__(self, *args: Any, max_buffer: int = DEFAULT_MAX_BUFFER, **kwargs: Any) -> None:
        self._max_buffer = max_buffer
        super().__init__(*args, **kwargs)

    def _engineio_server_class(self) -> Any:
        max_buffer = self._max_buffer

        class _Engine(FanoutEngineServer):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, max_buffer=max_buffer, **kwargs)

        return _Engine


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

    async def broadcast(self, event: str, data: Any = None, *, last: bool = False) -> None:
        await self.manager.emit(event, data, "/", room=protocol.LOBBY_ROOM, write_now=last)

    def flush(self) -> None:
        self.manager.server.eio.flusher.flush()
