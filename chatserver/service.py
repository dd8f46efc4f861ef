"""The chat service: commands in, events appended, emits out, in log order.

Handlers call ``login``/``chat``/``online_users``/``disconnect``. Each command
is decided by ``domain`` and appended through the single ``EventWriter``. When
a batch commits, ``_committed`` marks the sessions it concerns and queues the
stored events on the outbox; one dispatcher task applies them to the live
projection and hands them to the publisher, one after the other, so every
socket receives packets in the order they were produced (a reply queued
behind a broadcast stays behind it).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import domain, projections, protocol
from .config import Settings
from .events import (
    LEFT_DISCONNECTED,
    LEFT_SERVER_RESTART,
    LEFT_SERVER_SHUTDOWN,
    MessagePosted,
    StoredEvent,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    user_stream,
)
from .projections import OnlineUsers
from .store import ConcurrencyError, EventStore
from .writer import EventWriter

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Where emits go; the socket layer implements it."""

    async def send(self, sid: str, event: str, data: Any = None) -> None: ...

    async def broadcast(self, event: str, data: Any = None) -> None: ...

    async def enter_lobby(self, sid: str) -> None: ...

    async def leave_lobby(self, sid: str) -> None: ...


@dataclass(eq=False)
class Session:
    """A login of one socket, from the login command to its leave."""

    sid: str
    name: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    version: int = 0  # last version appended (or submitted) to the user's stream
    active: bool = False  # its login is committed and it has not left
    gone: bool = False  # its socket disconnected


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
        self.writer = writer_factory(
            in_transaction=[projections.save], on_commit=self._committed
        )
        self._connections: dict[str, Connection] = {}
        self._claims: dict[str, Session] = {}  # name -> session holding it here
        self._by_session: dict[str, Session] = {}
        self._leaving: dict[str, asyncio.Future[Any]] = {}
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self, writer_engine: Any) -> None:
        """Load the projection, close the sessions a crash left open, start."""
        view = await projections.load(self.store.engine)
        if view.position < await self.store.head():
            # Written by something that did not maintain it: fold it again.
            view = await projections.rebuild(self.store, writer_engine)
        self.online = view
        self.writer.start()
        ghosts = [u for u in view.users() if u.node == self.settings.node_id]
        for ghost in ghosts:
            head = await self.store.stream_head(user_stream(ghost.name))
            await self.writer.append(
                [domain.decide_leave(ghost.name, head.version + 1, LEFT_SERVER_RESTART)]
            )
        # Nobody is connected yet to be told of those leaves: apply them only.
        while not self._outbox.empty():
            _kind, stored = self._outbox.get_nowait()
            self.online.apply_all(stored)
        if ghosts:
            log.info("closed %d session(s) left open by the previous run", len(ghosts))
        self._dispatcher = asyncio.create_task(self._dispatch(), name="outbox-dispatcher")

    async def close_sessions(self, reason: str = LEFT_SERVER_SHUTDOWN) -> None:
        """Record the leave of every logged-in socket (graceful shutdown)."""
        sessions = [c.session for c in self._connections.values() if c.session and c.session.active]
        for session in sessions:
            session.gone = True
        await asyncio.gather(*(self._leave(s, reason) for s in sessions))

    async def stop(self) -> None:
        await self.writer.close()
        await self._outbox.put(("stop", None))
        if self._dispatcher is not None:
            await self._dispatcher

    # -- commands ----------------------------------------------------------
    def connect(self, sid: str) -> None:
        self._connections[sid] = Connection(sid)

    def is_logged_in(self, sid: str) -> bool:
        conn = self._connections.get(sid)
        return conn is not None and conn.session is not None and conn.session.active

    async def login(self, sid: str, raw_name: object) -> StoredEvent:
        name = domain.check_name(raw_name)
        conn = self._connection(sid)
        if conn.session is not None:
            raise domain.AlreadyLoggedIn("this socket is already logged in")
        leaving = self._leaving.get(name)
        if leaving is not None:
            # The name's previous holder is leaving right now: wait for its
            # leave to commit rather than refuse a quick reconnect.
            await asyncio.wait([leaving])
            if conn.session is not None:
                raise domain.AlreadyLoggedIn("this socket is already logged in")
        if name in self._claims:
            raise domain.NameTaken(f"{name} is already online")
        session = Session(sid=sid, name=name)
        self._claims[name] = session
        conn.session = session
        try:
            head = await self.store.stream_head(user_stream(name))
            new = domain.decide_login(name, head, session=session.id, node=self.settings.node_id)
            session.version = new[-1].version
            self._by_session[session.id] = session
            stored = await self.writer.submit(new)
        except ConcurrencyError:
            self._release(session, conn)
            raise domain.NameTaken(f"{name} is already online") from None
        except BaseException:
            self._release(session, conn)
            raise
        if session.gone:
            # The socket went away while its login was being stored.
            await self._leave(session, LEFT_DISCONNECTED)
        return stored[0]

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
            log.error("stream of %s changed under its session; closing it", session.name)
            raise domain.NotStored("the chat was not stored") from None
        except Exception:
            raise domain.NotStored("the chat was not stored") from None
        return stored[0]

    def online_users(self, sid: str) -> list[str]:
        """Answer now (for an ack) and queue the event reply behind pending emits."""
        self._active_session(sid)
        self._outbox.put_nowait(("reply", (sid, protocol.ONLINE_USERS, self.online.names)))
        return self.online.names()

    def reply(self, sid: str, event: str, data: Any = None) -> None:
        """Queue an emit to one socket behind everything already queued."""
        self._outbox.put_nowait(("reply", (sid, event, lambda: data)))

    async def disconnect(self, sid: str) -> None:
        conn = self._connections.pop(sid, None)
        if conn is None or conn.session is None:
            return
        session = conn.session
        session.gone = True
        if session.active:
            await self._leave(session, LEFT_DISCONNECTED)
        # A login still being stored sees ``gone`` and leaves by itself.

    # -- internals ---------------------------------------------------------
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

    def _committed(self, stored: list[StoredEvent]) -> None:
        for s in stored:
            event = s.event
            if isinstance(event, UserLoggedIn):
                session = self._by_session.get(event.session)
                if session is not None:
                    session.active = True
            elif isinstance(event, UserLeft):
                holder = self._claims.get(event.name)
                if holder is not None:
                    holder.active = False
        self._outbox.put_nowait(("events", stored))

    async def _dispatch(self) -> None:
        while True:
            kind, item = await self._outbox.get()
            try:
                if kind == "stop":
                    return
                if kind == "events":
                    for stored in item:
                        self.online.apply(stored)
                        await self._publish(stored)
                else:
                    sid, event, data = item
                    await self.publisher.send(sid, event, data())
            except Exception:
                log.exception("failed to emit %s", kind)

    async def _publish(self, stored: StoredEvent) -> None:
        event = stored.event
        if isinstance(event, MessagePosted):
            await self.publisher.broadcast(protocol.CHAT, protocol.chat_payload(stored))
        elif isinstance(event, UserLoggedIn):
            session = self._by_session.get(event.session)
            if session is not None and not session.gone:
                await self.publisher.enter_lobby(session.sid)
                await self.publisher.send(
                    session.sid, protocol.WELCOME, protocol.welcome_payload(stored, event.name)
                )
        elif isinstance(event, UserJoined):
            await self.publisher.broadcast(protocol.USER_JOINED, event.name)
        elif isinstance(event, UserLeft):
            await self.publisher.broadcast(protocol.USER_LEFT, event.name)
