"""Node leases: which server processes sharing a PostgreSQL log are alive.

- Each process inserts a lease at start under an id generated then (unique
  without configuration; ``CHAT_NODE_ID`` only names it in logs) and renews
  it every third of ``CHAT_NODE_LEASE`` seconds, by the database's clock.
- A lease not renewed for ``CHAT_NODE_LEASE`` seconds has expired. A process
  whose own lease has been renewed without a miss for that long claims an
  expired lease with one conditional UPDATE, so exactly one process wins,
  then closes the sessions the dead process held (``UserLeft`` reason
  ``node lost``). Those are found in the ``online_users`` projection: every
  session id a process issues starts with its lease id.
- A process that cannot renew its lease for two thirds of the period stops
  serving its sockets (it fences itself) before any other process may reap
  it, and serves again under a new lease once the database answers. So the
  log never shows a user online on two processes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .events import LEFT_NODE_LOST, LEFT_SERVER_RESTART
from .projections import online_users_table
from .store import metadata

log = logging.getLogger(__name__)

node_leases_table = sa.Table(
    "node_leases",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reaped_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reaped_by", sa.String(32), nullable=True),
)

_t = node_leases_table
_NOW = sa.func.now()


def new_lease_id() -> str:
    return uuid.uuid4().hex[:12]


def owner_of(session_id: str) -> str | None:
    """The lease id a session id starts with (None for sessions logged
    before leases existed)."""
    owner, sep, _rest = session_id.partition("-")
    return owner if sep else None


# Closes the (name, session) pairs a dead node held, with a leave reason.
CloseSessions = Callable[[list[tuple[str, str]], str], Awaitable[None]]


class NodeLease:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        lease_id: str,
        name: str,
        period: float,
        close_sessions: CloseSessions,
        on_fenced: Callable[[], None],
        on_new_lease: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.id = lease_id
        self.name = name
        self.period = period
        self._close_sessions = close_sessions
        self._on_fenced = on_fenced
        self._on_new_lease = on_new_lease
        self.fenced = False
        self._task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._renewed_at = loop.time()  # last successful renewal (monotonic)
        self._healthy_since = loop.time()  # renewed without a miss since

    @property
    def interval(self) -> float:
        return self.period / 3

    # -- start and stop ---------------------------------------------------------
    async def register(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                _t.insert().values(id=self.id, name=self.name, started_at=_NOW, heartbeat_at=_NOW)
            )
        now = asyncio.get_running_loop().time()
        self._renewed_at = self._healthy_since = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="node-lease")

    async def stop(self, *, release: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if release and not self.fenced:
            # A graceful stop recorded its own leaves: nothing to reap.
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        _t.update().where(_t.c.id == self.id).values(reaped_at=_NOW, reaped_by=self.id)
                    )
            except Exception as exc:
                log.warning("could not release the node lease: %s", exc)

    # -- the loop ---------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node lease housekeeping failed")

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = await self._renew()
        now = loop.time()
        if renewed is None:  # the database did not answer
            self._healthy_since = now
            if not self.fenced and now - self._renewed_at > self.period * 2 / 3:
                log.error(
                    "node lease %s not renewed for %.1f s: no longer serving this process's sockets",
                    self.id,
                    now - self._renewed_at,
                )
                self.fenced = True
                self._on_fenced()
            return
        if not renewed:
            # Another process reaped this lease: the sessions it covered are
            # closed in the log. Stop them here, and start over.
            if not self.fenced:
                log.error("node lease %s was reaped by another process: no longer serving its sockets", self.id)
                self.fenced = True
                self._on_fenced()
        if self.fenced:
            await self._start_over()
            return
        self._renewed_at = now
        if now - self._healthy_since >= self.period:
            await self.reap_expired()

    async def _renew(self) -> bool | None:
        """True: renewed; False: this lease was reaped; None: no answer."""
        try:
            async with asyncio.timeout(self.interval):
                async with self.engine.begin() as conn:
                    result = await conn.execute(
                        _t.update()
                        .where(_t.c.id == self.id, _t.c.reaped_at.is_(None))
                        .values(heartbeat_at=_NOW)
                    )
            return result.rowcount == 1
        except (TimeoutError, OSError, sa.exc.DBAPIError) as exc:
            log.debug("lease renewal failed: %s", exc)
            return None

    async def _start_over(self) -> None:
        old = self.id
        self.id = new_lease_id()
        try:
            await self.register()
        except Exception:
            self.id = old
            raise
        self.fenced = False
        self._on_new_lease(self.id)
        log.info("serving again under node lease %s (was %s)", self.id, old)

    # -- reaping ----------------------------------------------------------------------
    async def reap_expired(self) -> int:
        """Claim every expired lease and close its sessions; how many were claimed."""
        expired = _t.c.heartbeat_at < _NOW - timedelta(seconds=self.period)
        async with self.engine.connect() as conn:
            ids = [r[0] for r in await conn.execute(sa.select(_t.c.id).where(_t.c.reaped_at.is_(None), expired))]
        claimed = 0
        for lease_id in ids:
            if await self._claim(lease_id, expired):
                claimed += 1
                await self._close_all_of(lease_id, LEFT_NODE_LOST)
        return claimed

    async def reap_previous_runs(self) -> None:
        """Claim the unreaped leases of earlier runs under this node's name
        at once (a restart of the same process slot): their sessions close now
        instead of when their lease expires."""
        same_name = sa.and_(_t.c.name == self.name, _t.c.id != self.id)
        async with self.engine.connect() as conn:
            ids = [r[0] for r in await conn.execute(sa.select(_t.c.id).where(_t.c.reaped_at.is_(None), same_name))]
        for lease_id in ids:
            if await self._claim(lease_id, same_name):
                await self._close_all_of(lease_id, LEFT_SERVER_RESTART)

    async def reap_owner_of(self, session_id: str) -> bool:
        """If the lease ``session_id`` belongs to has expired, reap it now
        (a login waiting for a name a dead process held); True if the
        session's owner is gone."""
        owner = owner_of(session_id)
        if owner is None or owner == self.id or self.fenced:
            return False
        expired = _t.c.heartbeat_at < _NOW - timedelta(seconds=self.period)
        if await self._claim(owner, expired):
            await self._close_all_of(owner, LEFT_NODE_LOST)
            return True
        return False

    async def _claim(self, lease_id: str, condition: sa.ColumnElement[bool]) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                _t.update()
                .where(_t.c.id == lease_id, _t.c.reaped_at.is_(None), condition)
                .values(reaped_at=_NOW, reaped_by=self.id)
            )
        return result.rowcount == 1

    async def session_of(self, name: str) -> str | None:
        """The session the online_users projection says holds ``name``."""
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(online_users_table.c.session).where(online_users_table.c.name == name)
                )
            ).scalar()

    async def _close_all_of(self, lease_id: str, reason: str) -> None:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(online_users_table.c.name, online_users_table.c.session).where(
                        online_users_table.c.session.startswith(lease_id + "-", autoescape=True)
                    )
                )
            ).all()
        if rows:
            log.warning("node lease %s is over (%s): closing its %d session(s)", lease_id, reason, len(rows))
            await self._close_sessions([(r.name, r.session) for r in rows], reason)
