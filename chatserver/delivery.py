"""Delivery: committed events to sockets, in log order, from one dispatcher.

The writer's commit callback hands each committed batch to ``committed``,
and the follower what it reads of the shared log to ``followed``;
replies, welcome/history pushes and socket drops are queued on the same
outbox, so every socket receives packets in the order they were produced (a
reply queued behind a broadcast stays behind it). One dispatcher task takes
the items one at a time: it applies each event to the live views (online
users, recent history) once, in position order, then publishes it. It does no
database I/O, and a failure to publish one event is logged and the next event
still goes out: a committed event is never dropped for another's fault.

A resume's missed events are replayed by a catch-up task per socket, in pages
read from the log (no database connection held between pages), each page sent
only once the socket's output has drained, then the socket joins the lobby
with no await between finding nothing new and joining.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import protocol
from .config import Settings
from .events import (
    LOBBY_SCOPE,
    SHOWN_TYPES,
    RoomJoined,
    RoomLeft,
    StoredEvent,
    UserLoggedIn,
    room_scope,
    scope_of,
    user_stream,
)
from .lifecycle import Session, Sessions, State
from .projections import OnlineUsers, RecentHistory
from .rooms import Audience, RoomsView
from .store import EventStore

log = logging.getLogger(__name__)

# Events a catch-up reads and sends per page.
REPLAY_PAGE = 200


class Publisher(Protocol):
    """Where emits go; the socket layer implements it.

    ``enter`` does not suspend, and ``broadcast`` must take its recipients
    before it first suspends: the hand-off from a replay to live delivery
    relies on both.
    """

    async def send(self, sid: str, event: str, data: Any = None) -> None: ...

    async def broadcast(self, event: str, data: Any = None, *, to: list[str] | None = None, last: bool = False) -> None:
        """To the sockets in any of the Socket.IO rooms ``to`` (default: the
        lobby), each once. ``last``: nothing more is emitted before
        ``flush``, so it may be written at once."""

    def enter(self, sid: str, rooms: list[str]) -> None: ...

    def leave(self, sid: str, room: str) -> None: ...

    def sids_in(self, room: str) -> list[str]: ...

    async def disconnect(self, sid: str) -> None: ...

    async def drained(self, sid: str) -> bool:
        """Wait until the socket's unsent output is small; False if it went
        away or stayed full too long."""

    def flush(self) -> None:
        """Write what the emits so far queued, now rather than at the end of
        the loop turn (a no-op where emits are written at once)."""


# -- outbox items ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Committed:
    """Appended by this process: apply, then publish."""

    events: list[StoredEvent]


@dataclass(frozen=True, slots=True)
class Followed:
    """Read from the shared log: appended by another process (or by this
    one, read before its own commit callback ran). Delivered like our own,
    in position order, once."""

    events: list[StoredEvent]


@dataclass(frozen=True, slots=True)
class Reply:
    sid: str
    event: str
    data: Callable[[], Any]  # built when sent, so it reflects what came before


@dataclass(frozen=True, slots=True)
class DropSocket:
    sid: str


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


OutboxItem = Committed | Followed | Reply | DropSocket | _Stop


class Delivery:
    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        publisher: Publisher,
        sessions: Sessions,
        *,
        on_followed: Callable[[list[StoredEvent]], None] = lambda _events: None,
        on_applied: Callable[[StoredEvent], None] = lambda _event: None,
        on_delivered: Callable[[Session], None] = lambda _session: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.sessions = sessions
        self.online = OnlineUsers()
        self.rooms = RoomsView()
        self.recent = RecentHistory(settings.history_size)
        self._history_items = protocol.HistoryItems(settings.history_size)
        self._on_followed = on_followed
        self._on_applied = on_applied
        # A session's login (or resume replay) has been delivered: it may
        # be sent its conversations.
        self._on_delivered = on_delivered
        self._outbox: asyncio.Queue[OutboxItem] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        # Own batches that arrived ahead of another process's events (a gap),
        # and other processes' events not yet delivered, by position.
        self._parked: list[Committed] = []
        self._followed: dict[int, StoredEvent] = {}
        self.want_follow: Callable[[], None] = lambda: None
        # The position the live views have applied, and the highest one
        # handed over (committed or followed), delivered or not yet.
        self.applied = 0
        self.received = 0
        # The position of the last own event published: a catch-up replays
        # up to it and then joins live delivery.
        self.dispatched = 0
        self.first_visible: int | None = None
        # (position, future) of those waiting for the views to reach a
        # position, kept sorted.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- lifecycle -----------------------------------------------------------
    def start(
        self, online: OnlineUsers, rooms: RoomsView, recent: list[StoredEvent], first_visible: int | None
    ) -> None:
        """Start at the position ``online`` and ``rooms`` reflect (``recent``
        must end there)."""
        self.online = online
        self.rooms = rooms
        self.recent.apply_all(recent)
        self.applied = self.dispatched = self.received = online.position
        self.first_visible = first_visible
        self._task = asyncio.create_task(self._run(), name="outbox-dispatcher")

    async def stop(self) -> None:
        for task in list(self._catch_ups.values()):
            task.cancel()
        await self._outbox.put(_Stop())
        if self._task is not None:
            await self._task

    async def applied_through(self, position: int, timeout: float) -> bool:
        """Wait until the live views have applied ``position`` (an event
        another process appended and this one has yet to follow); False if
        that took longer than ``timeout``."""
        if self.applied >= position:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (position, future)
        bisect.insort(self._waiters, entry, key=lambda e: e[0])
        self.want_follow()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _wake_waiters(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.applied:
            _position, future = self._waiters.pop(0)
            if not future.done():
                future.set_result(None)

    # -- what the rest of the service hands over -------------------------------
    def committed(self, events: list[StoredEvent]) -> None:
        self.received = max(self.received, events[-1].position)
        self._outbox.put_nowait(Committed(events))

    def followed(self, events: list[StoredEvent]) -> None:
        self.received = max(self.received, events[-1].position)
        self._outbox.put_nowait(Followed(events))

    def reply(self, sid: str, event: str, data: Callable[[], Any]) -> None:
        """Queue an emit to one socket behind everything already queued."""
        self._outbox.put_nowait(Reply(sid, event, data))

    def drop(self, sid: str) -> None:
        self._outbox.put_nowait(DropSocket(sid))

    def forget(self, sid: str) -> None:
        """The socket disconnected: stop its replay."""
        task = self._catch_ups.pop(sid, None)
        if task is not None:
            task.cancel()

    # -- the dispatcher: the only place that emits ------------------------------
    async def _run(self) -> None:
        while True:
            item = await self._outbox.get()
            match item:
                case _Stop():
                    return
                case Committed(events):
                    if events[-1].position > self.applied:
                        self._parked.append(item)
                    await self._advance()
                case Followed(events):
                    for stored in events:
                        if stored.position > self.applied:
                            self._followed[stored.position] = stored
                    await self._advance()
                case Reply(sid, event, data):
                    try:
                        await self.publisher.send(sid, event, data())
                    except Exception:
                        log.exception("could not send %s to %s", event, sid)
                case DropSocket(sid):
                    try:
                        await self.publisher.disconnect(sid)
                    except Exception:
                        log.exception("could not disconnect %s", sid)
                case _:  # pragma: no cover - a new item type without a case
                    log.error("outbox item of unknown type %r dropped", item)

    async def _advance(self) -> None:
        """Deliver what comes next in position order, whether this process
        committed it or read it from the shared log: each position once, in
        order, so every process delivers the same sequence."""
        events, followed = self._next_run()
        if events:
            await self._publish_batch(events)
            if followed:
                self._on_followed(followed)
        if self._followed:
            for position in [p for p in self._followed if p <= self.applied]:
                del self._followed[position]
        if self._parked:
            # Our next batch waits for positions another process appended.
            self.want_follow()

    def _next_run(self) -> tuple[list[StoredEvent], list[StoredEvent]]:
        """Everything deliverable now, in position order (own batches and
        other processes' events interleaved), and which of it was followed."""
        after = self.applied
        events: list[StoredEvent] = []
        followed: list[StoredEvent] = []
        while True:
            if self._parked and self._parked[0].events[0].position <= after + 1:
                fresh = [e for e in self._parked.pop(0).events if e.position > after]
                if fresh:
                    events += fresh
                    after = fresh[-1].position
                continue
            run: list[StoredEvent] = []
            while (stored := self._followed.get(after + len(run) + 1)) is not None:
                if self._own_login_pending(stored):
                    # Our commit callback has not run yet: the Committed
                    # item that follows delivers it, with the session active.
                    break
                run.append(stored)
            if not run:
                return events, followed
            for stored in run:
                del self._followed[stored.position]
            events += run
            followed += run
            after = run[-1].position

    def _own_login_pending(self, stored: StoredEvent) -> bool:
        event = stored.event
        if not isinstance(event, UserLoggedIn):
            return False
        session = self.sessions.by_id(event.session)
        return session is not None and session.state is State.PENDING

    async def _publish_batch(self, events: list[StoredEvent]) -> None:
        # With more items waiting, their packets join these in each socket's
        # buffer and go out in one write; otherwise the fan-out is written
        # now, before the appenders' acks.
        final = self._outbox.empty()
        last = events[-1]
        for stored in events:
            # Marked before publishing: a catch-up that sees this position
            # replays the event itself and joins after the broadcast took its
            # recipients.
            self.dispatched = max(self.dispatched, stored.position)
            self._apply(stored)
            try:
                await self._publish(stored, last=final and stored is last)
            except Exception:
                log.exception("could not publish event %d (%s); delivering the next", stored.position, stored.type)
        if final:
            self.publisher.flush()

    def _apply(self, stored: StoredEvent) -> None:
        """Apply to the live views, once, in position order."""
        if stored.position <= self.applied:
            return
        try:
            self.online.apply(stored)
            self.rooms.apply(stored)
            self.recent.apply(stored)
        except Exception:
            log.exception("could not apply event %d (%s)", stored.position, stored.type)
        self.applied = stored.position
        if self._waiters and self._waiters[0][0] <= stored.position:
            self._wake_waiters()
        if self.first_visible is None and scope_of(stored.event) == LOBBY_SCOPE:
            self.first_visible = stored.position
        self._on_applied(stored)

    async def _publish(self, stored: StoredEvent, *, last: bool = False) -> None:
        event = stored.event
        if isinstance(event, UserLoggedIn):
            session = self.sessions.by_id(event.session)
            if session is None:
                return
            if session.socket_gone or session.state is not State.ACTIVE:
                session.delivered.set()  # nothing waits for it in vain
                return
            # The view is at this login: every earlier join and leave of the
            # user is in it, and every later one is the session's own.
            session.rooms = self.rooms.rooms_of(event.name)
            session.delivered.set()
            await self.publisher.send(session.sid, protocol.WELCOME, protocol.welcome_payload(stored, session.token))
            if session.resume_after is None:
                size = self.settings.history_size
                items = self.recent.last(size, before=stored.position)
                reached_start = len(items) < size or (bool(items) and items[0].position == self.first_visible)
                await self.publisher.send(session.sid, protocol.HISTORY, self._history_items.payload(items, reached_start))
                self.publisher.enter(session.sid, self._live_rooms(event.name))
                self._on_delivered(session)
            else:
                self._catch_ups[session.sid] = asyncio.create_task(
                    self._catch_up(session, session.resume_after), name=f"catch-up-{session.sid}"
                )
            return
        packet = protocol.live_packet(stored)
        if packet is None:
            return
        if isinstance(event, RoomJoined):
            # In the room before its join goes out: the joiner sees it too.
            for sid in self.publisher.sids_in(protocol.user_room(event.name)):
                self.publisher.enter(sid, [room_scope(event.room)])
        await self.publisher.broadcast(*packet, to=protocol.audience(stored), last=last)
        if isinstance(event, RoomLeft):
            for sid in self.publisher.sids_in(protocol.user_room(event.name)):
                self.publisher.leave(sid, room_scope(event.room))

    def _live_rooms(self, name: str) -> list[str]:
        """The Socket.IO rooms a logged-in socket of ``name`` listens in."""
        return [
            protocol.LOBBY_ROOM,
            protocol.user_room(name),
            *(room_scope(key) for key in self.rooms.rooms_of(name)),
        ]

    # -- resume replays -----------------------------------------------------------
    async def _audience_at(self, name: str, after: int) -> Audience:
        """Who ``name`` was at ``after``: the rooms the view has now, less
        the user's own joins and leaves since (a resume's gap is bounded, so
        this read is too)."""
        rooms_now, applied = self.rooms.rooms_of(name), self.applied
        changes = await self.store.read_all(
            after=after, before=applied + 1, streams=[user_stream(name)], types=[RoomJoined.type, RoomLeft.type]
        )
        return Audience.rewound(name, rooms_now, changes)

    async def _catch_up(self, session: Session, after: int) -> None:
        """Send ``session``'s socket every visible event after ``after`` up to
        what the dispatcher has published, page by page, then put it in the
        lobby: exactly once, in order."""
        sid = session.sid
        try:
            audience = await self._audience_at(session.name, after)
            while True:
                target = self.dispatched
                if after >= target:
                    if session.socket_gone or session.state is not State.ACTIVE:
                        return
                    # No await between finding nothing new and joining.
                    self.publisher.enter(sid, self._live_rooms(session.name))
                    self._on_delivered(session)
                    return
                page = await self.store.read_all(after=after, before=target + 1, limit=REPLAY_PAGE, types=SHOWN_TYPES)
                if session.socket_gone or session.state is not State.ACTIVE:
                    return
                for stored in page:
                    if not audience.sees(stored):
                        continue
                    packet = protocol.live_packet(stored)
                    if packet is not None:
                        await self.publisher.send(sid, *packet)
                after = page[-1].position if len(page) == REPLAY_PAGE else target
                if not await self.publisher.drained(sid):
                    log.warning("replay to %s stalled: the socket does not read; disconnecting it", session.name)
                    await self.publisher.disconnect(sid)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("catch-up of %s failed; disconnecting it", session.name)
            with contextlib.suppress(Exception):
                await self.publisher.disconnect(sid)
        finally:
            if self._catch_ups.get(sid) is asyncio.current_task():
                del self._catch_ups[sid]
