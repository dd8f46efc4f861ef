"""Rooms, memberships, read markers and private conversations, folded from
the log.

``RoomsView`` is the live, in-memory read model (pure: ``apply`` one stored
event at a time) that delivery routes by and commands check membership
against. The tables below persist the same facts, written by
``projections.save`` in every append's transaction and refolded by
``projections.catch_up``/``rebuild``. Every row here follows from one event
alone (a join is a row, a leave deletes it, a private message sets the last
position of both sides' conversation), so a batch's net effect is the last
row written for each key: ``changes`` is all a writer, a catch-up or a
rebuild needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .events import (
    LOBBY,
    LOBBY_SCOPE,
    ConversationRead,
    PrivateMessageSent,
    RoomCreated,
    RoomJoined,
    RoomLeft,
    StoredEvent,
    room_key,
    room_scope,
    scope_of,
)
from .store import SCOPE_MAX, metadata

rooms_table = sa.Table(
    "rooms",
    metadata,
    sa.Column("key", sa.String(SCOPE_MAX), primary_key=True),
    sa.Column("name", sa.String(SCOPE_MAX), nullable=False),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("creator", sa.String(64), nullable=False),
    sa.Column("created_position", sa.BigInteger, nullable=False),
)

room_members_table = sa.Table(
    "room_members",
    metadata,
    sa.Column("room_key", sa.String(SCOPE_MAX), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("joined_position", sa.BigInteger, nullable=False),
)

read_markers_table = sa.Table(
    "read_markers",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("scope", sa.String(SCOPE_MAX), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
)

conversations_table = sa.Table(
    "conversations",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("peer", sa.String(64), primary_key=True),
    sa.Column("last_position", sa.BigInteger, nullable=False),
    sa.Index("ix_conversations_name_last", "name", "last_position"),
)

KEYED_TABLES: tuple[sa.Table, ...] = (rooms_table, room_members_table, read_markers_table, conversations_table)

# (table name, primary key values) -> the row, or None: no row.
RowKey = tuple[str, tuple[Any, ...]]
Row = dict[str, Any] | None


def changes(stored: StoredEvent) -> Iterator[tuple[RowKey, Row]]:
    """The rows one event writes (or deletes)."""
    event = stored.event
    if isinstance(event, RoomCreated):
        key = room_key(event.room)
        yield ("rooms", (key,)), {
            "key": key,
            "name": event.room,
            "topic": event.topic,
            "creator": event.creator,
            "created_position": stored.position,
        }
    elif isinstance(event, RoomJoined):
        key = room_key(event.room)
        yield ("room_members", (key, event.name)), {
            "room_key": key,
            "name": event.name,
            "joined_position": stored.position,
        }
    elif isinstance(event, RoomLeft):
        yield ("room_members", (room_key(event.room), event.name)), None
    elif isinstance(event, ConversationRead):
        scope = marker_scope(event)
        yield ("read_markers", (event.name, scope)), {"name": event.name, "scope": scope, "position": event.position}
    elif isinstance(event, PrivateMessageSent):
        for name, peer in ((event.sender, event.recipient), (event.recipient, event.sender)):
            yield ("conversations", (name, peer)), {"name": name, "peer": peer, "last_position": stored.position}


def marker_scope(event: ConversationRead) -> str:
    """Read markers are kept per room (``room:<key>``) or per peer
    (``peer:<name>``): a reader's private conversations are told apart by
    the other party alone."""
    return room_scope(event.room) if event.room else f"peer:{event.peer}"


def fold_changes(stored: Iterable[StoredEvent], into: dict[RowKey, Row] | None = None) -> dict[RowKey, Row]:
    out: dict[RowKey, Row] = {} if into is None else into
    for s in stored:
        for key, row in changes(s):
            out[key] = row
    return out


_TABLES = {t.name: t for t in KEYED_TABLES}


def _key_columns(table: sa.Table) -> list[sa.Column[Any]]:
    return list(table.primary_key.columns)


def _delete(table: sa.Table) -> sa.Delete:
    return table.delete().where(*(c == sa.bindparam(f"k_{c.name}") for c in _key_columns(table)))


_DELETES = {name: _delete(t) for name, t in _TABLES.items()}


async def write(conn: AsyncConnection, rows: dict[RowKey, Row]) -> None:
    """Make the tables hold ``rows`` (delete then insert, per table)."""
    by_table: dict[str, list[tuple[tuple[Any, ...], Row]]] = {}
    for (table_name, key), row in rows.items():
        by_table.setdefault(table_name, []).append((key, row))
    for name, items in by_table.items():
        table = _TABLES[name]
        columns = _key_columns(table)
        await conn.execute(
            _DELETES[name], [{f"k_{c.name}": v for c, v in zip(columns, key, strict=True)} for key, _row in items]
        )
        inserts = [row for _key, row in items if row is not None]
        if inserts:
            await conn.execute(table.insert(), inserts)


async def scan(engine: AsyncEngine, table: sa.Table, chunk: int) -> AsyncIterator[Any]:
    """Every row of a table, paged by primary key (no long read)."""
    columns = _key_columns(table)
    after: tuple[Any, ...] | None = None
    while True:
        query = sa.select(table).order_by(*columns).limit(chunk)
        if after is not None:
            query = query.where(sa.tuple_(*columns) > sa.tuple_(*after))
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        for row in rows:
            yield row
        if len(rows) < chunk:
            return
        after = tuple(getattr(rows[-1], c.name) for c in columns)


def row_key(table: sa.Table, row: Any) -> RowKey:
    return table.name, tuple(getattr(row, c.name) for c in _key_columns(table))


# -- the live view --------------------------------------------------------------


@dataclass(slots=True)
class Room:
    name: str
    topic: str
    creator: str
    created_position: int
    # member -> the position of their join
    members: dict[str, int] = field(default_factory=dict)


class RoomsView:
    """Rooms (not the lobby), who is a member of which, and who has private
    conversations, as of the position delivery has applied."""

    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}
        self.memberships: dict[str, set[str]] = {}  # name -> room keys
        # Names with at least one private conversation: a login of anyone
        # else needs no look at the conversations table.
        self.talkers: set[str] = set()
        # Names that have marked something read (the rest have no markers to read).
        self.readers: set[str] = set()
        self._sorted: list[str] | None = None

    def apply(self, stored: StoredEvent) -> None:
        event = stored.event
        if isinstance(event, RoomCreated):
            key = room_key(event.room)
            if key not in self.rooms:
                self.rooms[key] = Room(event.room, event.topic, event.creator, stored.position)
                self._sorted = None
        elif isinstance(event, RoomJoined):
            room = self.rooms.get(room_key(event.room))
            if room is not None:
                room.members[event.name] = stored.position
                self.memberships.setdefault(event.name, set()).add(room_key(event.room))
        elif isinstance(event, RoomLeft):
            key = room_key(event.room)
            room = self.rooms.get(key)
            if room is not None:
                room.members.pop(event.name, None)
            mine = self.memberships.get(event.name)
            if mine is not None:
                mine.discard(key)
                if not mine:
                    del self.memberships[event.name]
        elif isinstance(event, PrivateMessageSent):
            self.talkers.add(event.sender)
            self.talkers.add(event.recipient)
        elif isinstance(event, ConversationRead):
            self.readers.add(event.name)

    def apply_all(self, events: Iterable[StoredEvent]) -> None:
        for stored in events:
            self.apply(stored)

    def sorted_keys(self, *, with_lobby: bool = False) -> list[str]:
        """Every room's key (and the lobby's), in order; kept until a room
        is created."""
        if self._sorted is None:
            self._sorted = sorted([*self.rooms, LOBBY])
        return self._sorted if with_lobby else [k for k in self._sorted if k != LOBBY]

    def get(self, room: str) -> Room | None:
        return self.rooms.get(room_key(room))

    def rooms_of(self, name: str) -> set[str]:
        """The keys of the rooms ``name`` is a member of (a copy)."""
        return set(self.memberships.get(name, ()))

    def is_member(self, name: str, key: str) -> bool:
        return key in self.memberships.get(name, ())


async def load(engine: AsyncEngine) -> RoomsView:
    """The persisted tables as a live view (at the projections' position)."""
    view = RoomsView()
    async with engine.connect() as conn:
        for r in await conn.execute(sa.select(rooms_table)):
            view.rooms[r.key] = Room(r.name, r.topic, r.creator, r.created_position)
        for r in await conn.execute(sa.select(room_members_table)):
            room = view.rooms.get(r.room_key)
            if room is not None:
                room.members[r.name] = r.joined_position
                view.memberships.setdefault(r.name, set()).add(r.room_key)
        view.talkers = {r.name for r in await conn.execute(sa.select(conversations_table.c.name).distinct())}
        view.readers = {r.name for r in await conn.execute(sa.select(read_markers_table.c.name).distinct())}
    return view


class Audience:
    """What one user may be shown, walking the log forward from a position
    at which they were a member of ``rooms`` (keys): the lobby, every room
    creation, the rooms they are a member of at each point (their own join
    and leave included), and their private messages. A resume's replay asks
    this of every event, so membership changes in the replayed stretch count
    from exactly where they happened."""

    def __init__(self, name: str, rooms: set[str]) -> None:
        self.name = name
        self.rooms = set(rooms)

    def sees(self, stored: StoredEvent) -> bool:
        event = stored.event
        scope = scope_of(event)
        if scope is None:
            return False
        if scope == LOBBY_SCOPE or isinstance(event, RoomCreated):
            return True
        if isinstance(event, PrivateMessageSent):
            return self.name in (event.sender, event.recipient)
        key = room_key(event.room)  # type: ignore[union-attr]
        if isinstance(event, RoomJoined) and event.name == self.name:
            self.rooms.add(key)
            return True
        if isinstance(event, RoomLeft) and event.name == self.name:
            self.rooms.discard(key)
            return True
        return key in self.rooms

    @classmethod
    def rewound(cls, name: str, rooms_now: set[str], own_changes: list[StoredEvent]) -> Audience:
        """The audience as it was before ``own_changes`` (the user's joins
        and leaves since that point, oldest first) made it ``rooms_now``."""
        rooms = set(rooms_now)
        for stored in reversed(own_changes):
            event = stored.event
            if isinstance(event, RoomJoined):
                rooms.discard(room_key(event.room))
            elif isinstance(event, RoomLeft):
                rooms.add(room_key(event.room))
        return cls(name, rooms)
