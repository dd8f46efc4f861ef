"""The chat service: commands in, events appended, emits out, in log order.

Handlers call ``login``/``resume``/``chat``/``online_users``/``history``/
``disconnect``. Each command is decided by ``domain`` and appended through
the single ``EventWriter``. When a batch commits, ``_committed`` marks the
sessions it concerns and queues the stored events on the outbox; one
dispatcher task applies them to the live projections and hands them to the
publisher, one after the other, so every socket receives packets in the order
they were produced (a reply queued behind a broadcast stays behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from . import domain, projections, protocol
from .config import Settings
from .events import (
    LEFT_DISCONNECTED,
    LEFT_SERVER_RESTART,
    LEFT_SERVER_SHUTDOWN,
    LEFT_TAKEN_OVER,
    VISIBLE_TYPES,
    MessagePosted,
    NewEvent,
    StoredEvent,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    user_stream,
)
from .projections import OnlineUsers, RecentHistory
from .store import ConcurrencyError, EventStore, StreamHead
from .writer import EventWriter

log = logging.getLogger(__name__)

RESUME_ATTEMPTS = 3
EMPTY_STREAM = StreamHead(0, None)
USER_PREFIX = user_stream("")
FOLLOW_INTERVAL = 0.2  # seconds between looks at the shared log when idle


class Publisher(Protocol):
    """Where emits go; the socket layer implements it.

    ``enter_lobby`` must not suspend before the socket is in the room, and
    ``broadcast`` must take its recipients before it first suspends: the
    hand-off from a replay to live delivery relies on both.
    """

    async def send(self, sid: str, event: str, data: Any = None) -> None: ...

    async def broadcast(self, event: str, data: Any = None, *, last: bool = False) -> None:
        """``last``: nothing more is emitted before ``flush``, so it may be
        written at once."""

    async def enter_lobby(self, sid: str) -> None: ...

    async def disconnect(self, sid: str) -> None: ...

    def flush(self) -> None:
        """Write what the emits so far queued, now rather than at the end of
        the loop turn (a no-op where emits are written at once)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Session:
    """A login of one socket, from the login command to its leave."""

    sid: str
    name: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    version: int = 0  # last version appended (or submitted) to the user's stream
    active: bool = False  # its login is committed and it has not left
    gone: bool = False  # its socket disconnected
    resume_after: int | None = None  # replay from here instead of sending history


@dataclass(eq=False)
class Connection:
    sid: str
    session: Session | None = None


class ChatService:
    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        writer_factory: Callable[..., EventWriter],
        publisher: Publisher,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.online = OnlineUsers()
        self.recent = RecentHistory(settings.history_size)
        self._history_items = protocol.HistoryItems(settings.history_size)
        self.writer = writer_factory(in_transaction=[projections.save], on_commit=self._committed)
        self._connections: dict[str, Connection] = {}
        self._claims: dict[str, Session] = {}  # name -> session holding it here
        self._by_session: dict[str, Session] = {}
        self._leaving: dict[str, asyncio.Future[Any]] = {}
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        # The position of the last event the dispatcher has published.
        self._dispatched = 0
        self._first_visible_position: int | None = None
        # User stream heads as this process knows them (see login).
        self._heads: dict[str, StreamHead] = {}
        # The position the live projections (online, recent) have applied.
        self._applied = 0
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self, writer_engine: AsyncEngine) -> None:
        """Load the projections, close the sessions a crash left open, start."""
        view = await projections.load(self.store.engine)
        if view.position < await self.store.head():
            # Written by something that did not maintain it: fold it again.
            view = await projections.rebuild(self.store, writer_engine)
        self.online = view
        self.writer.start()
        ghosts = [u for u in view.users() if u.node == self.settings.node_id]
        for ghost in ghosts:
            head = await self.store.stream_head(user_stream(ghost.name))
            await self.writer.append([domain.decide_leave(ghost.name, head.version + 1, LEFT_SERVER_RESTART)])
        # Nobody is connected yet to be told of those leaves: apply them only.
        while not self._outbox.empty():
            _kind, stored = self._outbox.get_nowait()
            self.online.apply_all(stored)
        if ghosts:
            log.info("closed %d session(s) left open by the previous run", len(ghosts))
        self.recent.apply_all(await self.store.latest(limit=self.settings.history_size, types=VISIBLE_TYPES))
        # Every user stream's head, so logins of known-offline names skip a read.
        self._heads = {
            stream: StreamHead(version, UserJoined.type if stream[len(USER_PREFIX) :] in self.online else UserLeft.type)
            for stream, version in (await self.store.stream_versions(USER_PREFIX)).items()
        }
        self._dispatched = self._applied = await self.store.head()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="outbox-dispatcher")
        if self.settings.redis_url:
            # Other processes share the log: keep the live views in step.
            self._poller = asyncio.create_task(self._poll_log(), name="log-follower")

    async def close_sessions(self, reason: str = LEFT_SERVER_SHUTDOWN) -> None:
        """Record the leave of every logged-in socket (graceful shutdown)."""
        sessions = [c.session for c in self._connections.values() if c.session and c.session.active]
        for session in sessions:
            session.gone = True
        await asyncio.gather(*(self._leave(s, reason) for s in sessions))

    async def stop(self) -> None:
        for task in [*self._catch_ups.values(), *([self._poller] if self._poller else [])]:
            task.cancel()
        await self.writer.close()
        await self._outbox.put(("stop", None))
        if self._dispatcher is not None:
            await self._dispatcher

    # -- commands ----------------------------------------------------------
    def connect(self, sid: str) -> None:
        self._connections[sid] = Connection(sid)

    async def login(self, sid: str, raw_name: object) -> StoredEvent:
        name = domain.check_name(raw_name)
        conn = await self._free_connection(sid, name)
        if name in self._claims:
            raise domain.NameTaken(f"{name} is already online")
        session = self._claim(conn, name)
        stream = user_stream(name)
        try:
            # A name this process knows to be offline needs no read; anything
            # else (online, or the log moved under us) is read from the store.
            known = self._heads.get(stream, EMPTY_STREAM)
            head = known if not known.online else await self.store.stream_head(stream)
            try:
                stored = await self._submit_login(session, self._decide_login(session, head))
            except ConcurrencyError:
                if head is not known:
                    raise
                head = await self.store.stream_head(stream)
                stored = await self._submit_login(session, self._decide_login(session, head))
        except ConcurrencyError:
            self._release(session, conn)
            raise domain.NameTaken(f"{name} is already online") from None
        except BaseException:
            self._release(session, conn)
            raise
        await self._after_login(session)
        return stored

    def _decide_login(self, session: Session, head: StreamHead) -> list[NewEvent]:
        return domain.decide_login(
            session.name, head, session=session.id, node=self.settings.node_id, resume_hash=hash_token(session.token)
        )

    async def resume(self, sid: str, token: object, last_position: object) -> StoredEvent:
        """Come back under the name a resume token was issued for.

        The socket then receives every visible event after ``last_position``,
        in order, and continues live. A session of the same name still
        considered online (a half-open socket) is taken over.
        """
        if not isinstance(token, str) or not 10 <= len(token) <= 200:
            raise domain.ResumeRefused("invalid_token", "the resume token is malformed")
        token_hash = hash_token(token)
        grant = await projections.find_grant(self.store.engine, token_hash)
        if grant is None:
            raise domain.ResumeRefused(
                "invalid_token", "the resume token is unknown or was superseded by a newer login"
            )
        if datetime.now(UTC) > grant.issued_at + timedelta(seconds=self.settings.resume_ttl_seconds):
            raise domain.ResumeRefused("expired_token", "the resume token has expired")
        name = grant.name
        after = domain.check_position(last_position, await self.store.head())
        conn = await self._free_connection(sid, name)
        holder = self._claims.get(name)
        # The same user on an older socket: its name is taken over.
        ghost = holder if holder is not None and holder.sid != sid else None
        if ghost is not None:
            if not ghost.active:
                raise domain.ResumeRefused("name_busy", f"{name} is logging in elsewhere right now")
            self._retire(ghost)
        session = self._claim(conn, name)
        session.resume_after = after
        try:
            for attempt in range(RESUME_ATTEMPTS):
                head = await self.store.stream_head(user_stream(name))
                # Looked at again after the head: a login that landed before
                # the head was read has replaced the grant; one that lands
                # after makes the append below fail on its version.
                current = await projections.find_grant(self.store.engine, token_hash)
                if current is None or current.session != grant.session:
                    raise domain.ResumeRefused("invalid_token", "the resume token was superseded by a newer login")
                new = domain.decide_resume(
                    name, head, session=session.id, node=self.settings.node_id, resume_hash=hash_token(session.token)
                )
                try:
                    stored = await self._submit_login(session, new)
                    break
                except ConcurrencyError:
                    # The old session's last appends landed in between: look again.
                    if attempt == RESUME_ATTEMPTS - 1:
                        raise domain.ResumeRefused("name_busy", f"{name} changed while resuming; log in again") from None
        except BaseException:
            self._release(session, conn)
            if ghost is not None:
                await self._close_stream(name, LEFT_TAKEN_OVER)
            raise
        if ghost is not None:
            self._outbox.put_nowait(("disconnect", ghost.sid))
        await self._after_login(session)
        return stored

    async def chat(self, sid: str, raw_message: object) -> StoredEvent:
        session = self._active_session(sid)
        message = domain.check_message(raw_message, max_chars=self.settings.max_message_chars)
        # No await before submit: the order of a socket's chats is the order
        # of their submission, whatever task runs each handler.
        session.version += 1
        future = self.writer.submit([domain.decide_chat(session.name, session.version, message)])
        try:
            stored = await future
        except ConcurrencyError:
            log.error("stream of %s changed under its session", session.name)
            raise domain.NotStored("the chat was not stored") from None
        except Exception:
            raise domain.NotStored("the chat was not stored") from None
        return stored[0]

    def online_users(self, sid: str) -> list[str]:
        """Answer now (for an ack) and queue the event reply behind pending emits."""
        self._active_session(sid)
        self._outbox.put_nowait(("reply", (sid, protocol.ONLINE_USERS, self.online.names)))
        return self.online.names()

    async def history(self, sid: str, request: object) -> dict[str, Any]:
        """A page of older history: ``{before, limit}`` -> ``{items, reachedStart}``."""
        self._active_session(sid)
        before, limit = domain.check_page(request, cap=self.settings.history_page_max)
        items = await self.store.latest(limit=limit + 1, before=before, types=VISIBLE_TYPES)
        reached_start = len(items) <= limit
        return protocol.history_payload(items[-limit:], reached_start)

    def reply(self, sid: str, event: str, data: Any = None) -> None:
        """Queue an emit to one socket behind everything already queued."""
        self._outbox.put_nowait(("reply", (sid, event, lambda: data)))

    async def disconnect(self, sid: str) -> None:
        conn = self._connections.pop(sid, None)
        task = self._catch_ups.pop(sid, None)
        if task is not None:
            task.cancel()
        if conn is None or conn.session is None:
            return
        session = conn.session
        session.gone = True
        if session.active:
            await self._leave(session, LEFT_DISCONNECTED)
        # A login still being stored sees ``gone`` and leaves by itself.

    # -- internals ---------------------------------------------------------
    async def _free_connection(self, sid: str, name: str) -> Connection:
        """The socket's connection, checked to hold no session; waits out a
        leave of ``name`` that is being stored (a quick reconnect)."""
        conn = self._connection(sid)
        if conn.session is not None:
            raise domain.AlreadyLoggedIn("this socket is already logged in")
        leaving = self._leaving.get(name)
        if leaving is not None:
            await asyncio.wait([leaving])
            if conn.session is not None:
                raise domain.AlreadyLoggedIn("this socket is already logged in")
        return conn

    def _claim(self, conn: Connection, name: str) -> Session:
        session = Session(sid=conn.sid, name=name)
        self._claims[name] = session
        conn.session = session
        return session

    async def _submit_login(self, session: Session, new: list[Any]) -> StoredEvent:
        session.version = new[-1].version
        self._by_session[session.id] = session
        stored = await self.writer.submit(new)
        return next(s for s in stored if isinstance(s.event, UserLoggedIn))

    async def _after_login(self, session: Session) -> None:
        if session.gone:
            # The socket went away while its login was being stored.
            await self._leave(session, LEFT_DISCONNECTED)

    def _retire(self, session: Session) -> None:
        """Stop a session whose user came back elsewhere; the resume's own
        append records its leave."""
        session.gone = True
        session.active = False
        self._release(session)
        conn = self._connections.get(session.sid)
        if conn is not None and conn.session is session:
            conn.session = None

    def _connection(self, sid: str) -> Connection:
        conn = self._connections.get(sid)
        if conn is None:
            raise domain.NotLoggedIn("this socket is not connected")
        return conn

    def _active_session(self, sid: str) -> Session:
        conn = self._connections.get(sid)
        if conn is None or conn.session is None or not conn.session.active:
            raise domain.NotLoggedIn("log in first")
        return conn.session

    def _release(self, session: Session, conn: Connection | None = None) -> None:
        if self._claims.get(session.name) is session:
            del self._claims[session.name]
        self._by_session.pop(session.id, None)
        if conn is not None and conn.session is session:
            conn.session = None

    async def _close_stream(self, name: str, reason: str) -> None:
        """Record a leave for ``name`` if the log still shows it online."""
        head = await self.store.stream_head(user_stream(name))
        if head.online and name not in self._claims:
            with contextlib.suppress(ConcurrencyError):
                await self.writer.append([domain.decide_leave(name, head.version + 1, reason)])

    async def _leave(self, session: Session, reason: str) -> None:
        session.version += 1
        future = self.writer.submit([domain.decide_leave(session.name, session.version, reason)])
        self._leaving[session.name] = future
        try:
            await future
        except Exception:
            log.exception("could not store the leave of %s", session.name)
        finally:
            if self._leaving.get(session.name) is future:
                del self._leaving[session.name]
            self._release(session)

    def _note_heads(self, stored: list[StoredEvent]) -> None:
        for s in stored:
            # Only a name that is offline skips the read at login, and its
            # head is its leave; chats (always while online) need no note.
            if s.type == MessagePosted.type:
                continue
            known = self._heads.get(s.stream)
            if known is None or s.version > known.version:
                self._heads[s.stream] = StreamHead(s.version, s.type)

    def _committed(self, stored: list[StoredEvent]) -> None:
        self._note_heads(stored)
        for s in stored:
            event = s.event
            if isinstance(event, UserLoggedIn):
                session = self._by_session.get(event.session)
                if session is not None:
                    session.active = True
            elif isinstance(event, UserLeft) and event.reason != LEFT_TAKEN_OVER:
                holder = self._claims.get(event.name)
                if holder is not None and holder.active:
                    holder.active = False
        self._outbox.put_nowait(("events", stored))

    # -- the dispatcher: the only place that emits -------------------------
    async def _dispatch(self) -> None:
        while True:
            kind, item = await self._outbox.get()
            try:
                if kind == "stop":
                    return
                if kind == "events":
                    if item[0].position > self._applied + 1:
                        # Another process appended in between (shared log).
                        await self._follow_log(until=item[0].position - 1)
                    last = item[-1]
                    for stored in item:
                        # Marked before publishing: a catch-up that sees this
                        # position replays the event itself and joins after
                        # the broadcast took its recipients.
                        self._dispatched = stored.position
                        self._apply(stored)
                        await self._publish(stored, last=stored is last)
                    # The batch's fan-out goes out before the appenders'
                    # acks and whatever else this loop turn still runs.
                    self.publisher.flush()
                elif kind == "follow":
                    await self._follow_log()
                elif kind == "reply":
                    sid, event, data = item
                    await self.publisher.send(sid, event, data())
                elif kind == "disconnect":
                    await self.publisher.disconnect(item)
            except Exception:
                log.exception("failed to emit %s", kind)

    def _apply(self, stored: StoredEvent) -> None:
        """Apply to the live projections, once, in position order."""
        if stored.position > self._applied:
            self.online.apply(stored)
            self.recent.apply(stored)
            self._applied = stored.position

    async def _follow_log(self, until: int | None = None) -> None:
        """Apply what other processes appended to the shared log (their
        broadcasts reached our sockets through the Redis manager)."""
        before = None if until is None else until + 1
        async for stored in self.store.read(after=self._applied, before=before):
            self._note_heads([stored])
            self._apply(stored)

    async def _poll_log(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            if self._outbox.empty():
                self._outbox.put_nowait(("follow", None))

    async def _publish(self, stored: StoredEvent, *, last: bool = False) -> None:
        event = stored.event
        if isinstance(event, UserLoggedIn):
            session = self._by_session.get(event.session)
            if session is None or session.gone:
                return
            await self.publisher.send(session.sid, protocol.WELCOME, protocol.welcome_payload(stored, session.token))
            if session.resume_after is None:
                items = self.recent.last(self.settings.history_size, before=stored.position)
                reached_start = len(items) < self.settings.history_size
                if items and not reached_start:
                    reached_start = items[0].position == await self._first_visible()
                await self.publisher.send(session.sid, protocol.HISTORY, self._history_items.payload(items, reached_start))
                await self.publisher.enter_lobby(session.sid)
            else:
                # Replay what was missed from the log, then join live.
                self._catch_ups[session.sid] = asyncio.create_task(
                    self._catch_up(session, session.resume_after), name=f"catch-up-{session.sid}"
                )
            return
        packet = protocol.live_packet(stored)
        if packet is not None:
            await self.publisher.broadcast(*packet, last=last)

    async def _first_visible(self) -> int:
        # The log only grows at its end: once found, the first item stays first.
        if self._first_visible_position is None:
            first = await self.store.read_all(limit=1, types=VISIBLE_TYPES)
            if not first:
                return 0
            self._first_visible_position = first[0].position
        return self._first_visible_position

    async def _catch_up(self, session: Session, after: int) -> None:
        """Send ``session``'s socket every visible event after ``after`` up to
        what the dispatcher has published, then put it in the lobby, with no
        await between finding nothing new and joining: exactly once, in order."""
        sid = session.sid
        try:
            while True:
                target = self._dispatched
                if after >= target:
                    if session.gone:
                        return
                    await self.publisher.enter_lobby(sid)
                    return
                async for stored in self.store.read(after=after, before=target + 1, types=VISIBLE_TYPES):
                    packet = protocol.live_packet(stored)
                    if packet is not None:
                        await self.publisher.send(sid, *packet)
                after = target
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("catch-up of %s failed; disconnecting it", session.name)
            with contextlib.suppress(Exception):
                await self.publisher.disconnect(sid)
        finally:
            if self._catch_ups.get(sid) is asyncio.current_task():
                del self._catch_ups[sid]
