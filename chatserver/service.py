"""The chat service: the pieces of one server process, wired and started.

A chat travels: ``sockets`` (handler) -> ``commands`` (validate, decide with
``domain``, submit) -> ``writer`` (group commit into ``store``, projections in
the same transaction) -> commit callback here (``lifecycle`` transitions) ->
``delivery`` (apply to the live views, publish, in position order).
``follower`` keeps the live views in step with other processes sharing the
log; a periodic reconciliation closes sessions the log shows open for this
process with no socket holding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import logsignal, projections, rooms, uploads
from .commands import Commands, new_command_id
from .config import Settings
from .delivery import Delivery, Publisher
from .domain import decide_leave
from .events import (
    LEFT_SERVER_RESTART,
    LEFT_SERVER_SHUTDOWN,
    LOBBY_SCOPE,
    StoredEvent,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    user_stream,
)
from .follower import LogFollower
from .leases import NodeLease, owner_of
from .lifecycle import Effect, Session, Sessions, State
from .metrics import STATS
from .store import EventStore, StreamHead
from .writer import EventWriter

log = logging.getLogger(__name__)

# Seconds between looks at a shared log when no signal came (a lost signal
# delays delivery by at most this).
FOLLOW_POLL = 0.5
SHUTDOWN_LEAVES_TIMEOUT = 5.0
# Most events an append reads, under the log's lock, of what other processes
# appended just before it (a longer gap is the follower's to read).
PRECEDING_MAX = 200
USER_PREFIX = user_stream("")


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
        self.sessions = Sessions()
        # A PostgreSQL log may be shared by several processes: each append
        # signals the new head, and each process follows the log.
        shared = store.engine.dialect.name == "postgresql"
        in_transaction = [projections.save, uploads.mark_posted, *([logsignal.notifier(self._lease_id)] if shared else [])]
        following = {"read_preceding": self._read_preceding, "on_preceding": self._preceding} if shared else {}
        self.writer = writer_factory(in_transaction=in_transaction, on_commit=self._committed, **following)
        self.delivery = Delivery(
            settings,
            store,
            publisher,
            self.sessions,
            on_followed=self._followed,
            on_applied=self._applied,
            on_delivered=self._delivered,
        )
        self.commands = Commands(settings, store, self.writer, self.sessions, self.delivery)
        self.follower = LogFollower(
            store,
            self.delivery,
            interval=FOLLOW_POLL if shared else None,
            own_id=self._lease_id,
            writer_busy=self.writer.busy,
        )
        self.writer.batch_done = self.follower.own_append_done
        self.listener = logsignal.LogListener(store.engine.url, self.follower.signalled) if shared else None
        if self.listener is not None:
            self.follower.fast_read = self.listener.read_after
        self._reconciler: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.lease: NodeLease | None = None
        # Accounts mode: kicks and bans as every process applies them.
        self.moderated: Callable[[StoredEvent], None] = lambda _stored: None

    @property
    def online(self) -> projections.OnlineUsers:
        return self.delivery.online

    # -- lifecycle ---------------------------------------------------------
    async def start(self, writer_engine: AsyncEngine) -> None:
        """Load the projections, close the sessions a crash left open, start."""
        view = await projections.load(self.store.engine)
        if view.position < await self.store.head():
            # Written by something that did not maintain it: fold it forward.
            view = await projections.catch_up(self.store, writer_engine, view)
        # Written in the same transactions as online_users: at its position.
        rooms_view = await rooms.load(self.store.engine)
        recent = await self.store.latest(
            limit=self.settings.history_size, before=view.position + 1, scope=LOBBY_SCOPE
        )
        first = await self.store.read_all(limit=1, scope=LOBBY_SCOPE)
        # Every user stream's head, so logins of known-offline names skip a read.
        self.commands.heads = {
            stream: StreamHead(version, UserJoined.type if stream[len(USER_PREFIX) :] in view else UserLeft.type)
            for stream, version in (await self.store.stream_versions(USER_PREFIX)).items()
            if version is not None
        }
        # A SQLite log has no leases: the sessions of this node's name are its
        # previous run's. On a shared log, only sessions logged before leases
        # existed (they belong to no lease) are decided by name; the rest by
        # their lease.
        ghosts = [
            u
            for u in view.users()
            if u.node == self.settings.node_name and (self.listener is None or owner_of(u.session) is None)
        ]
        self.delivery.start(view, rooms_view, recent, first[0].position if first else None)
        self.writer.start()
        self.follower.start()
        if self.listener is not None:
            self.listener.start()
            await self._take_lease()
        for ghost in ghosts:
            # Nobody is connected yet to be told of these leaves.
            head = self.commands.heads.get(user_stream(ghost.name), StreamHead(ghost.version, UserJoined.type))
            await self.writer.append(
                [decide_leave(ghost.name, head.version + 1, LEFT_SERVER_RESTART, command_id=new_command_id())]
            )
        if ghosts:
            log.info("closed %d session(s) left open by the previous run", len(ghosts))
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="reconciler")

    async def _take_lease(self) -> None:
        lease = self.lease = NodeLease(
            self.store.engine,
            lease_id=self.sessions.instance,
            name=self.settings.node_name,
            period=self.settings.node_lease_seconds,
            close_sessions=self._close_lost,
            on_fenced=self.commands.fence,
            on_new_lease=self._new_lease,
        )
        await lease.register()
        if self.settings.node_id:
            # The same process slot started again: its previous run is over.
            await lease.reap_previous_runs()
        self.commands.reap_owner = lease.reap_owner_of
        lease.start()

    async def _close_lost(self, sessions: list[tuple[str, str]], reason: str) -> None:
        assert self.lease is not None
        await self.commands.close_lost(sessions, reason, self.lease.session_of)

    def _lease_id(self) -> str:
        # Session ids start with it; it changes when a lapsed lease is renewed.
        return self.sessions.instance

    def _new_lease(self, lease_id: str) -> None:
        self.sessions.instance = lease_id
        self.commands.fenced = False

    async def close_sessions(self, reason: str = LEFT_SERVER_SHUTDOWN) -> None:
        """Record the leave of every logged-in socket (graceful shutdown)."""
        # Leave the writer time to commit the leaves within the stop's bound.
        await self.commands.close_sessions(reason, min(SHUTDOWN_LEAVES_TIMEOUT, self.settings.shutdown_timeout / 2))

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.commands.stop()
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self.listener is not None:
            await self.listener.stop()
        await self.follower.stop()
        await self.writer.close()
        if self.lease is not None:
            await self.lease.stop(release=True)
        await self.delivery.stop()

    # -- the writer's commit callback --------------------------------------
    def _committed(self, stored: list[StoredEvent]) -> None:
        """Runs before any appender's future resolves: sessions change state
        here, then the batch goes to delivery."""
        self.commands.note_heads(stored)
        effects: list[Effect] = []
        for s in stored:
            event = s.event
            if isinstance(event, UserLoggedIn):
                session = self.sessions.by_id(event.session)
                if session is not None and session.state is State.PENDING:
                    session.login_position = s.position
                    effects.extend(self.sessions.login_committed(session))
        self.delivery.committed(stored)
        self.commands.carry_out(effects)

    async def _read_preceding(self, conn: AsyncConnection, first: int) -> list[StoredEvent]:
        """In an append's transaction, under the log's lock: what other
        processes appended since this one last looked. Handed to delivery
        just ahead of the batch, so both go out to each socket in one write
        and the follower need not read them separately. A long gap is left
        to the follower, outside the lock."""
        after = self.delivery.received
        if after + 1 >= first or first - after - 1 > PRECEDING_MAX:
            return []
        preceding = await self.store.read_between(conn, after, first)
        STATS.followed("append", len(preceding))
        return preceding

    def _preceding(self, stored: list[StoredEvent]) -> None:
        self.delivery.followed(stored)

    def _delivered(self, session: Session) -> None:
        task = asyncio.create_task(self.commands.push_conversations(session), name=f"conversations-{session.sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _followed(self, stored: list[StoredEvent]) -> None:
        self.commands.note_heads(stored)

    def _applied(self, stored: StoredEvent) -> None:
        """A login of a name this process holds, by a session that is not
        the holder: the user resumed on another process, which recorded the
        takeover. The session here is over: its socket is dropped at once
        (and its chats would fail on their version anyway)."""
        event = stored.event
        if not isinstance(event, UserLoggedIn):
            self.moderated(stored)
            return
        holder = self.sessions.holder(event.name)
        if (
            holder is not None
            and holder.id != event.session
            and holder.state in (State.ACTIVE, State.YIELDING)
            and holder.login_position is not None
            and stored.position > holder.login_position
        ):
            log.info("%s resumed on another process; closing the session here", event.name)
            self.commands.carry_out(self.sessions.superseded(holder))

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            try:
                await self.commands.reconcile()
            except Exception as exc:
                log.warning("reconciliation of open sessions failed: %s", exc)
