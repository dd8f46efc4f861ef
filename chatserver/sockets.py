"""Socket.IO handlers: translate packets into commands and domain errors into
the protocol's answers.

Every refusal is both an event to the socket (``loginNameBad``,
``loginNameExists`` as in the seed, ``protocolError`` for everything else)
and, when the client asked for one, an acknowledgement ``{ok: false, error,
message}``. Successful commands acknowledge ``{ok: true, position, ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import socketio
from socketio.exceptions import ConnectionRefusedError

from . import protocol
from .auth import Claims, Tokens, TokenRefused
from .commands import Commands
from .config import Settings
from .database import DatabaseUnavailable
from .events import RoomCreated, RoomLeft, StoredEvent, UserBanned, UserKicked
from .domain import (
    BadPayload,
    DomainError,
    NameBad,
    NameTaken,
    NotAllowed,
    NotLoggedIn,
    RateLimited,
    ServerFailed,
)
from .logs import Throttle
from .metrics import STATS
from .moderation import Moderation
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

T = TypeVar("T")

# A replay page waits for the socket's unsent output to fall below these.
DRAINED_BYTES = 256 * 1024
DRAINED_PACKETS = 64
DRAIN_TIMEOUT = 30.0  # seconds a replay waits for a socket that does not read


def pending_output(sock: Any) -> tuple[int, int]:
    """(packets, bytes) an engine.io socket has not written yet."""
    packets = sock.queue.qsize() + len(getattr(sock, "_held", ()))
    pending_bytes = getattr(sock, "pending_bytes", None)
    return packets, pending_bytes() if pending_bytes is not None else 0


class FailureLog:
    """Commands that failed for a reason on the server's side (a database
    outage, say) are logged once per kind (event, exception type) and
    interval, with a count of the ones left out: an outage is one story, not
    one traceback per request. Kinds are few: the maps stay small."""

    INTERVAL = 10.0  # seconds

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._throttle = Throttle(self.INTERVAL)
        self._seen: set[tuple[str, type[BaseException]]] = set()

    def report(self, event: str, exc: BaseException) -> None:
        key = (event, type(exc))
        quiet = self._throttle.allow(key)
        if quiet is None:
            return
        also = f" ({quiet} more like it since the last report)" if quiet else ""
        # The traceback once per kind: the rest says only how often.
        first = key not in self._seen
        self._seen.add(key)
        self._log.error("%s failed: %s: %s%s", event, type(exc).__name__, exc, also, exc_info=first)


class SocketIOPublisher:
    """The service's publisher on a python-socketio server."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self.sio = sio

    async def send(self, sid: str, event: str, data: Any = None) -> None:
        await self.sio.emit(event, data, to=sid)

    async def broadcast(self, event: str, data: Any = None, *, to: list[str] | None = None, last: bool = False) -> None:
        await self.sio.emit(event, data, room=to if to is not None else protocol.LOBBY_ROOM)

    def enter(self, sid: str, rooms: list[str]) -> None:
        # The manager's synchronous form: nothing suspends before the socket
        # is in every room (the hand-off from a replay relies on it).
        for room in rooms:
            try:
                self.sio.manager.basic_enter_room(sid, "/", room)
            except (KeyError, ValueError):
                return  # the socket is gone

    def leave(self, sid: str, room: str) -> None:
        self.sio.manager.basic_leave_room(sid, "/", room)

    def sids_in(self, room: str) -> list[str]:
        return list(self.sio.manager.rooms.get("/", {}).get(room, {}))

    async def disconnect(self, sid: str) -> None:
        await self.sio.disconnect(sid)

    async def drained(self, sid: str) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while True:
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
            sock = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
            if sock is None or sock.closed:
                return False
            packets, pending = pending_output(sock)
            if packets <= DRAINED_PACKETS and pending <= DRAINED_BYTES:
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)

    def flush(self) -> None:
        pass  # python-socketio writes (or queues) every emit itself


class SocketHandlers:
    def __init__(
        self,
        settings: Settings,
        service: Commands,
        tokens: Tokens | None = None,
        moderation: Moderation | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        # Accounts mode: every socket's token claims, and the timer that
        # ends the socket when its token expires.
        self.tokens = tokens
        self.moderation = moderation
        self._claims: dict[str, Claims] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self.sio: socketio.AsyncServer | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._last_rate_error: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures = FailureLog(log)

    def register(self, sio: socketio.AsyncServer) -> None:
        self.sio = sio
        sio.on("connect", self.on_connect)
        sio.on(protocol.KICK, self.on_kick)
        sio.on(protocol.BAN, self.on_ban)
        sio.on(protocol.REAUTH, self.on_reauth)
        sio.on("disconnect", self.on_disconnect)
        sio.on(protocol.LOGIN, self.on_login)
        sio.on(protocol.CHAT, self.on_chat)
        sio.on(protocol.ONLINE_USERS, self.on_online_users)
        sio.on(protocol.RESUME, self.on_resume)
        sio.on(protocol.HISTORY, self.on_history)
        sio.on(protocol.CREATE_ROOM, self.on_create_room)
        sio.on(protocol.JOIN_ROOM, self.on_join_room)
        sio.on(protocol.LEAVE_ROOM, self.on_leave_room)
        sio.on(protocol.LIST_ROOMS, self.on_list_rooms)
        sio.on(protocol.ROOM_MEMBERS, self.on_room_members)
        sio.on(protocol.CONVERSATIONS, self.on_conversations)
        sio.on(protocol.MARK_READ, self.on_mark_read)
        sio.on(protocol.UPLOAD_TOKEN, self.on_upload_token)

    @property
    def accounts_mode(self) -> bool:
        return self.tokens is not None

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        if self.tokens is not None:
            try:
                claims, _account = await self.tokens.check(auth.get("token") if isinstance(auth, dict) else None)
            except TokenRefused as exc:
                # connect_error: message for any client, {message, code} as data.
                raise ConnectionRefusedError(
                    exc.message, {"message": exc.message, "code": exc.code}
                ) from None
            self._claims[sid] = claims
            delay = max(0.0, claims.expires - time.time())
            self._expiry[sid] = asyncio.get_running_loop().call_later(
                delay, self.end, sid, "token_expired", "the access token expired; sign in again"
            )
        self._buckets[sid] = TokenBucket(
            self.settings.rate_per_second, self.settings.rate_burst, time.monotonic()
        )
        self.service.connect(sid)
        if isinstance(auth, dict) and "resumeToken" in auth:
            # After the handshake: nothing may reach the socket before it.
            task = asyncio.create_task(
                self.on_resume(sid, {"token": auth.get("resumeToken"), "lastPosition": auth.get("lastPosition")})
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def on_disconnect(self, sid: str, *_reason: Any) -> None:
        timer = self._expiry.pop(sid, None)
        if timer is not None:
            timer.cancel()
        self._claims.pop(sid, None)
        self._buckets.pop(sid, None)
        self._last_rate_error.pop(sid, None)
        self.service.disconnect(sid)

    async def on_login(self, sid: str, *args: Any) -> dict[str, Any]:
        name = args[0] if args else None
        if self.tokens is not None:
            claims = self._claims.get(sid)
            if claims is None:
                # The socket's token just ended (expired, revoked, kicked).
                return self._refuse(sid, protocol.LOGIN, NotLoggedIn("the socket's token has ended"))
            # Accounts mode: the name is the account's, whatever was typed.
            name = claims.name
        try:
            stored = await self._call(sid, protocol.LOGIN, lambda: self.service.login(sid, name))
        except NameBad as exc:
            self.service.reply(sid, protocol.LOGIN_NAME_BAD, name)
            return protocol.ack_error(exc)
        except NameTaken as exc:
            self.service.reply(sid, protocol.LOGIN_NAME_EXISTS, name)
            return protocol.ack_error(exc)
        except DomainError as exc:
            return self._refuse(sid, protocol.LOGIN, exc)
        return {"ok": True, **protocol.welcome_payload(stored)}

    async def on_resume(self, sid: str, *args: Any) -> dict[str, Any]:
        STATS.replay_requests += 1
        request = args[0] if len(args) == 1 else None
        try:
            if not isinstance(request, dict):
                raise BadPayload("resume takes an object {token, lastPosition}")
            stored = await self._call(
                sid,
                protocol.RESUME,
                lambda: self.service.resume(
                    sid, request.get("token"), request.get("lastPosition"), account=self._account_of(sid)
                ),
            )
        except DomainError as exc:
            # Every refusal, ResumeRefused or not, sends the client back to login.
            self.service.reply(sid, protocol.RESUME_FAILED, {"code": exc.code, "message": exc.message})
            return protocol.ack_error(exc)
        return {"ok": True, **protocol.welcome_payload(stored)}

    async def on_history(self, sid: str, *args: Any) -> dict[str, Any]:
        STATS.history_requests += 1
        try:
            if len(args) > 1:
                raise BadPayload("history takes one object {before, limit}")
            page = await self._call(sid, protocol.HISTORY, lambda: self.service.history(sid, args[0] if args else None))
        except DomainError as exc:
            return self._refuse(sid, protocol.HISTORY, exc)
        return {"ok": True, **page}

    async def on_chat(self, sid: str, *args: Any) -> dict[str, Any]:
        try:
            # The seed sends the message alone; a client may add {id} so that
            # a retry of the same chat is stored once, and {room} or {to} to
            # send it to a room or to one user.
            if len(args) == 1:
                options: Any = {}
            elif len(args) == 2 and isinstance(args[1], dict):
                options = args[1]
            else:
                raise BadPayload("chat takes the message and optionally {id, room, to, attachments}")
            stored = await self._call(
                sid, protocol.CHAT, lambda: self.service.chat(sid, args[0], options.get("id"), options)
            )
        except DomainError as exc:
            return self._refuse(sid, protocol.CHAT, exc)
        return protocol.ack_stored(stored)

    # -- rooms, private conversations ---------------------------------------------
    async def on_create_room(self, sid: str, *args: Any) -> dict[str, Any]:
        async def create() -> dict[str, Any]:
            stored = await self.service.create_room(sid, self._one(protocol.CREATE_ROOM, args))
            event = stored.event
            assert isinstance(event, RoomCreated)
            return {"room": event.room, "topic": event.topic, "position": stored.position}

        return await self._request(sid, protocol.CREATE_ROOM, create)

    async def on_join_room(self, sid: str, *args: Any) -> dict[str, Any]:
        async def join() -> dict[str, Any]:
            room, stored = await self.service.join_room(sid, self._one(protocol.JOIN_ROOM, args))
            return {"room": room, "position": stored.position if stored is not None else None}

        return await self._request(sid, protocol.JOIN_ROOM, join)

    async def on_leave_room(self, sid: str, *args: Any) -> dict[str, Any]:
        async def leave() -> dict[str, Any]:
            stored = await self.service.leave_room(sid, self._one(protocol.LEAVE_ROOM, args))
            event = stored.event
            assert isinstance(event, RoomLeft)
            return {"room": event.room, "position": stored.position}

        return await self._request(sid, protocol.LEAVE_ROOM, leave)

    async def on_list_rooms(self, sid: str, *args: Any) -> dict[str, Any]:
        async def rooms() -> dict[str, Any]:
            return self.service.list_rooms(sid, self._one(protocol.LIST_ROOMS, args, optional=True))

        return await self._request(sid, protocol.LIST_ROOMS, rooms)

    async def on_room_members(self, sid: str, *args: Any) -> dict[str, Any]:
        async def members() -> dict[str, Any]:
            return self.service.room_members(sid, self._one(protocol.ROOM_MEMBERS, args))

        return await self._request(sid, protocol.ROOM_MEMBERS, members)

    async def on_conversations(self, sid: str, *args: Any) -> dict[str, Any]:
        async def conversations() -> dict[str, Any]:
            self._none(protocol.CONVERSATIONS, args)
            return await self.service.conversations(sid)

        return await self._request(sid, protocol.CONVERSATIONS, conversations)

    async def on_mark_read(self, sid: str, *args: Any) -> dict[str, Any]:
        async def mark() -> dict[str, Any]:
            return await self.service.mark_read(sid, self._one(protocol.MARK_READ, args))

        return await self._request(sid, protocol.MARK_READ, mark)

    async def on_upload_token(self, sid: str, *args: Any) -> dict[str, Any]:
        async def token() -> dict[str, Any]:
            self._none(protocol.UPLOAD_TOKEN, args)
            return await self.service.upload_token(sid)

        return await self._request(sid, protocol.UPLOAD_TOKEN, token)

    # -- accounts mode -------------------------------------------------------------
    def _account_of(self, sid: str) -> str | None:
        if self.tokens is None:
            return None
        claims = self._claims.get(sid)
        if claims is None:  # pragma: no cover - the handshake refused it
            raise BadPayload("no account on this socket")
        return claims.name

    async def on_kick(self, sid: str, *args: Any) -> dict[str, Any]:
        async def kick() -> dict[str, Any]:
            if self.moderation is None:
                raise NotAllowed("there are no admins in open mode")
            stored = await self.moderation.kick(self._account_of(sid), self._one(protocol.KICK, args))
            return {"name": stored.event.name, "position": stored.position}  # type: ignore[union-attr]

        return await self._request(sid, protocol.KICK, kick)

    async def on_ban(self, sid: str, *args: Any) -> dict[str, Any]:
        async def ban() -> dict[str, Any]:
            if self.moderation is None:
                raise NotAllowed("there are no admins in open mode")
            stored = await self.moderation.ban(self._account_of(sid), self._one(protocol.BAN, args))
            event = stored.event
            assert isinstance(event, UserBanned)
            return {"name": event.name, "until": event.until, "position": stored.position}

        return await self._request(sid, protocol.BAN, ban)

    async def on_reauth(self, sid: str, *args: Any) -> dict[str, Any]:
        """A newer token (POST /api/sessions/refresh) for a live socket, so a
        session outlives one token without a reconnect: the socket then ends
        at the new token's expiry."""

        async def reauth() -> dict[str, Any]:
            if self.tokens is None:
                raise NotAllowed("there are no tokens in open mode")
            request = self._one(protocol.REAUTH, args)
            current = self._claims.get(sid)
            try:
                claims, _account = await self.tokens.check(request.get("token"))
            except TokenRefused as exc:
                raise BadPayload(f"{exc.code}: {exc.message}") from None
            if current is None or claims.name != current.name:
                raise NotAllowed("the token is another account's")
            if self._claims.get(sid) is not current:
                raise NotLoggedIn("the socket's token has ended")
            self._claims[sid] = claims
            timer = self._expiry.pop(sid, None)
            if timer is not None:
                timer.cancel()
            self._expiry[sid] = asyncio.get_running_loop().call_later(
                max(0.0, claims.expires - time.time()), self.end, sid, "token_expired", "the access token expired; sign in again"
            )
            return {"expiresIn": max(0, int(claims.expires - time.time()))}

        return await self._request(sid, protocol.REAUTH, reauth)

    def moderated(self, stored: StoredEvent) -> None:
        """Every process applies kicks and bans from the log: its own
        sockets of that account end."""
        event = stored.event
        if isinstance(event, UserKicked):
            code, message = "kicked", f"you were kicked by {event.by}"
        elif isinstance(event, UserBanned):
            code, message = "banned", f"you were banned by {event.by} until {event.until}"
        else:
            return
        for sid, claims in list(self._claims.items()):
            if claims.name == event.name:
                self.end(sid, code, message)

    def revoked(self, jti: str | None, name: str | None) -> None:
        """A token was revoked (sign-out) or every token of an account was
        (password change): this process's sockets using them end now; other
        processes find theirs at their next ``sweep_revoked``."""
        for sid, claims in list(self._claims.items()):
            if claims.jti == jti or claims.name == name:
                self._end_revoked(sid)

    def _end_revoked(self, sid: str) -> None:
        self.end(sid, "token_revoked", "the access token was revoked; sign in again")

    async def sweep_revoked(self) -> None:
        """End the sockets whose token the database now says is revoked (a
        sign-out or password change served by another process)."""
        if self.tokens is None or not self._claims:
            return
        live = list(self._claims.items())
        invalid = await self.tokens.accounts.no_longer_valid([(c.jti, c.name, c.issued) for _sid, c in live])
        for sid, claims in live:
            if claims.jti in invalid and self._claims.get(sid) is claims:
                self._end_revoked(sid)

    async def sweep_revoked_forever(self, interval: float) -> None:
        interval = max(interval, 0.1)  # never a busy loop, whatever the setting
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_revoked()
            except Exception as exc:  # the database may be away for a while: told once per interval
                self._failures.report("checking the sockets' tokens", exc)

    def end(self, sid: str, code: str, message: str) -> None:
        """Tell the socket why (protocolError), then disconnect it; its user
        leaves as on any disconnect."""
        timer = self._expiry.pop(sid, None)
        if timer is not None:
            timer.cancel()
        if self._claims.pop(sid, None) is None or self.sio is None:
            return  # already ended
        sio = self.sio

        async def close() -> None:
            with contextlib.suppress(Exception):
                await sio.emit(protocol.PROTOCOL_ERROR, {"event": None, "code": code, "message": message}, to=sid)
            await sio.disconnect(sid)

        task = asyncio.create_task(close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _none(event: str, args: tuple[Any, ...]) -> None:
        if args and args[0] is not None:
            raise BadPayload(f"{event} takes no arguments")

    @staticmethod
    def _one(event: str, args: tuple[Any, ...], *, optional: bool = False) -> Any:
        if len(args) > 1 or (not args and not optional):
            raise BadPayload(f"{event} takes one object")
        value = args[0] if args else None
        if value is not None and not isinstance(value, dict):
            raise BadPayload(f"{event} takes one object")
        return value

    async def _request(self, sid: str, event: str, handle: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """An extension's request: its answer acknowledged ``{ok: true, ...}``,
        its refusal as every refusal is."""
        try:
            answer = await self._call(sid, event, handle)
        except DomainError as exc:
            return self._refuse(sid, event, exc)
        return {"ok": True, **answer}

    async def on_online_users(self, sid: str, *_args: Any) -> list[str] | dict[str, Any]:
        try:
            self._throttle(sid)
            return self.service.online_users(sid)
        except DomainError as exc:
            return self._refuse(sid, protocol.ONLINE_USERS, exc)

    async def _call(self, sid: str, event: str, command: Callable[[], Awaitable[T]]) -> T:
        """Throttle, run a command, and turn a surprise into a clear refusal:
        a failing database must not leave a client without an answer."""
        self._throttle(sid)
        try:
            return await command()
        except DomainError:
            raise
        except DatabaseUnavailable as exc:
            # The writer has said so in the log, once per outage.
            raise ServerFailed("the database is unavailable right now; try again") from exc
        except Exception as exc:
            self._failures.report(event, exc)
            raise ServerFailed("the server could not handle this right now; try again") from exc

    def _throttle(self, sid: str) -> None:
        bucket = self._buckets.get(sid)
        if bucket is not None and not bucket.take(time.monotonic()):
            raise RateLimited("too many messages; slow down")

    def _refuse(self, sid: str, event: str, exc: DomainError) -> dict[str, Any]:
        if isinstance(exc, RateLimited):
            # One notice a second is enough for a flooding client.
            now = time.monotonic()
            if now - self._last_rate_error.get(sid, 0.0) < 1.0:
                return protocol.ack_error(exc)
            self._last_rate_error[sid] = now
        self.service.reply(sid, protocol.PROTOCOL_ERROR, protocol.error_payload(event, exc))
        return protocol.ack_error(exc)
