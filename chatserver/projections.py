"""Read models folded from the event log.

``OnlineUsers`` and ``RecentHistory`` are pure: ``apply`` one stored event at
a time. The persisted ones (tables ``online_users`` and ``resume_tokens``,
with their position in ``projection_positions``) are written in the same
transaction as the events they reflect, so after any crash the tables and the
log agree; ``rebuild`` folds the whole log again from position 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .events import VISIBLE_TYPES, StoredEvent, UserJoined, UserLeft, UserLoggedIn
from .store import EventStore, metadata

online_users_table = sa.Table(
    "online_users",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("session", sa.String(64), nullable=False),
    sa.Column("node", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("joined_position", sa.BigInteger, nullable=False),
)

projection_positions_table = sa.Table(
    "projection_positions",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
)

# The latest login of each name: only its resume token may come back.
resume_tokens_table = sa.Table(
    "resume_tokens",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("session", sa.String(64), nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("token_hash", name="uq_resume_tokens_token_hash"),
)

ONLINE_USERS = "online_users"


@dataclass(frozen=True, slots=True)
class OnlineUser:
    name: str
    session: str
    node: str
    version: int  # the stream version of the join
    joined_position: int


class OnlineUsers:
    """Who is in the lobby, in join order, as of ``position``."""

    def __init__(self) -> None:
        self.position = 0
        self._users: dict[str, OnlineUser] = {}
        # Login events carry the session and node; the join that follows
        # uses them.
        self._logins: dict[str, UserLoggedIn] = {}

    def apply(self, stored: StoredEvent) -> None:
        event = stored.event
        if isinstance(event, UserLoggedIn):
            self._logins[event.name] = event
        elif isinstance(event, UserJoined):
            login = self._logins.pop(event.name, None)
            self._users[event.name] = OnlineUser(
                name=event.name,
                session=login.session if login else "",
                node=login.node if login else "",
                version=stored.version,
                joined_position=stored.position,
            )
        elif isinstance(event, UserLeft):
            self._users.pop(event.name, None)
            self._logins.pop(event.name, None)
        self.position = stored.position

    def apply_all(self, events: Iterable[StoredEvent]) -> None:
        for stored in events:
            self.apply(stored)

    def names(self) -> list[str]:
        return list(self._users)

    def users(self) -> list[OnlineUser]:
        return list(self._users.values())

    def get(self, name: str) -> OnlineUser | None:
        return self._users.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)


class RecentHistory:
    """The last ``size`` events a lobby client may see, oldest first."""

    def __init__(self, size: int) -> None:
        self._items: deque[StoredEvent] = deque(maxlen=max(size, 1))

    def apply(self, stored: StoredEvent) -> None:
        if stored.type in VISIBLE_TYPES:
            self._items.append(stored)

    def apply_all(self, events: Iterable[StoredEvent]) -> None:
        for stored in events:
            self.apply(stored)

    def last(self, n: int, before: int | None = None) -> list[StoredEvent]:
        items = [e for e in self._items if before is None or e.position < before]
        return items[-n:] if n > 0 else []


@dataclass(frozen=True, slots=True)
class ResumeGrant:
    name: str
    session: str
    issued_at: datetime
    position: int


# -- persistence -------------------------------------------------------------


# Built once: the append path runs these for every batch.
_DELETE_ONLINE = online_users_table.delete().where(online_users_table.c.name == sa.bindparam("gone"))
_DELETE_GRANTS = resume_tokens_table.delete().where(resume_tokens_table.c.name == sa.bindparam("gone"))
_UPDATE_POSITION = (
    projection_positions_table.update()
    .where(projection_positions_table.c.name == sa.bindparam("projection"))
    .values(position=sa.bindparam("at"))
)
_INSERT_POSITION = projection_positions_table.insert()
_INSERT_ONLINE = online_users_table.insert()
_INSERT_GRANTS = resume_tokens_table.insert()


def _online_row(user: OnlineUser) -> dict[str, object]:
    return {
        "name": user.name,
        "session": user.session,
        "node": user.node,
        "version": user.version,
        "joined_position": user.joined_position,
    }


def _grant_row(stored: StoredEvent) -> dict[str, object] | None:
    event = stored.event
    assert isinstance(event, UserLoggedIn)
    if not event.resume_hash:
        return None
    return {
        "name": event.name,
        "token_hash": event.resume_hash,
        "session": event.session,
        "issued_at": stored.recorded_at,
        "position": stored.position,
    }


async def save(conn: AsyncConnection, stored: list[StoredEvent]) -> None:
    """Mirror ``stored`` into the persisted projections, in the append's
    transaction: the batch is folded to its net effect per name first, so a
    batch costs a few statements however many events it holds."""
    online: dict[str, dict[str, object] | None] = {}  # name -> row, or None: gone
    grants: dict[str, dict[str, object] | None] = {}
    logins: dict[str, UserLoggedIn] = {}
    for s in stored:
        event = s.event
        if isinstance(event, UserLoggedIn):
            logins[event.name] = event
            grants[event.name] = _grant_row(s)
        elif isinstance(event, UserJoined):
            # A login and its join are always appended together.
            login = logins.pop(event.name, None)
            online[event.name] = _online_row(
                OnlineUser(
                    event.name,
                    login.session if login else "",
                    login.node if login else "",
                    s.version,
                    s.position,
                )
            )
        elif isinstance(event, UserLeft):
            online[event.name] = None
    await _replace(conn, _INSERT_ONLINE, _DELETE_ONLINE, online)
    await _replace(conn, _INSERT_GRANTS, _DELETE_GRANTS, grants)
    if stored:
        await _set_position(conn, ONLINE_USERS, stored[-1].position)


async def _replace(
    conn: AsyncConnection, insert: sa.Insert, delete: sa.Delete, changes: dict[str, dict[str, object] | None]
) -> None:
    if not changes:
        return
    await conn.execute(delete, [{"gone": name} for name in changes])
    rows = [row for row in changes.values() if row is not None]
    if rows:
        await conn.execute(insert, rows)


async def find_grant(engine: AsyncEngine, token_hash: str) -> ResumeGrant | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(resume_tokens_table).where(resume_tokens_table.c.token_hash == token_hash)
            )
        ).first()
    if row is None:
        return None
    issued = row.issued_at if row.issued_at.tzinfo else row.issued_at.replace(tzinfo=UTC)
    return ResumeGrant(row.name, row.session, issued, row.position)


async def _set_position(conn: AsyncConnection, name: str, position: int) -> None:
    updated = await conn.execute(_UPDATE_POSITION, {"projection": name, "at": position})
    if updated.rowcount == 0:
        await conn.execute(_INSERT_POSITION, {"name": name, "position": position})


async def load(engine: AsyncEngine) -> OnlineUsers:
    """The persisted projection, as an in-memory OnlineUsers."""
    view = OnlineUsers()
    async with engine.connect() as conn:
        rows = (
            await conn.execute(sa.select(online_users_table).order_by(online_users_table.c.joined_position))
        ).all()
        position = (
            await conn.execute(
                sa.select(projection_positions_table.c.position).where(
                    projection_positions_table.c.name == ONLINE_USERS
                )
            )
        ).scalar()
    for r in rows:
        view._users[r.name] = OnlineUser(r.name, r.session, r.node, r.version, r.joined_position)
    view.position = position or 0
    return view


async def fold(store: EventStore, after: int = 0, view: OnlineUsers | None = None) -> OnlineUsers:
    """Fold the log (from ``after``) into a projection, streaming."""
    view = view if view is not None else OnlineUsers()
    async for stored in store.read(after=after):
        view.apply(stored)
    return view


async def rebuild(store: EventStore, writer_engine: AsyncEngine) -> OnlineUsers:
    """Recompute the persisted projection from position 0 and store it.

    The fold and the replacement run in one write transaction, so appends by a
    running server wait and the result matches the log at one position.
    """
    view = OnlineUsers()
    logins: dict[str, StoredEvent] = {}
    async with writer_engine.begin() as conn:
        async for stored in store.read_locked(conn):
            view.apply(stored)
            if isinstance(stored.event, UserLoggedIn):
                logins[stored.event.name] = stored
        await conn.execute(resume_tokens_table.delete())
        grant_rows = [row for row in map(_grant_row, logins.values()) if row is not None]
        if grant_rows:
            await conn.execute(resume_tokens_table.insert(), grant_rows)
        await conn.execute(online_users_table.delete())
        if len(view):
            await conn.execute(online_users_table.insert(), [_online_row(u) for u in view.users()])
        await _set_position(conn, ONLINE_USERS, view.position)
    return view
