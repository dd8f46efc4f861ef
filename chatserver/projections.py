"""Read models folded from the event log.

``OnlineUsers`` is pure: ``apply`` one stored event at a time. Its persisted
copy (tables ``online_users`` and ``projection_positions``) is written in the
same transaction as the events it reflects, so after any crash the table and
the log agree; ``rebuild`` folds the whole log again from position 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .events import StoredEvent, UserJoined, UserLeft, UserLoggedIn
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


# -- persistence -------------------------------------------------------------


async def save(conn: AsyncConnection, stored: list[StoredEvent]) -> None:
    """Mirror ``stored`` into the persisted projection, in the append's transaction."""
    pending: dict[str, UserLoggedIn] = {}
    for s in stored:
        event = s.event
        if isinstance(event, UserLoggedIn):
            pending[event.name] = event
        elif isinstance(event, UserJoined):
            # A login and its join are always appended together.
            login = pending.pop(event.name, None)
            await conn.execute(
                online_users_table.insert().values(
                    name=event.name,
                    session=login.session if login else "",
                    node=login.node if login else "",
                    version=s.version,
                    joined_position=s.position,
                )
            )
        elif isinstance(event, UserLeft):
            await conn.execute(online_users_table.delete().where(online_users_table.c.name == event.name))
    if stored:
        await _set_position(conn, ONLINE_USERS, stored[-1].position)


async def _set_position(conn: AsyncConnection, name: str, position: int) -> None:
    updated = await conn.execute(
        projection_positions_table.update()
        .where(projection_positions_table.c.name == name)
        .values(position=position)
    )
    if updated.rowcount == 0:
        await conn.execute(projection_positions_table.insert().values(name=name, position=position))


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
    async with writer_engine.begin() as conn:
        async for stored in store.read_locked(conn):
            view.apply(stored)
        await conn.execute(online_users_table.delete())
        for u in view.users():
            await conn.execute(
                online_users_table.insert().values(
                    name=u.name,
                    session=u.session,
                    node=u.node,
                    version=u.version,
                    joined_position=u.joined_position,
                )
            )
        await _set_position(conn, ONLINE_USERS, view.position)
    return view
