"""Read models folded from the event log.

``OnlineUsers`` and ``RecentHistory`` are pure: ``apply`` one stored event at
a time. The persisted ones (tables ``online_users`` and ``resume_tokens``,
with their position in ``projection_positions``) are written in the same
transaction as the events they reflect, so after any crash the tables and the
log agree. ``catch_up`` folds a projection that is behind forward from its
position and ``rebuild`` refolds it from position 0, both without holding the
log's write lock for more than one short transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import rooms
from .database import driver_in_transaction
from .events import LOBBY_SCOPE, StoredEvent, UserJoined, UserLeft, UserLoggedIn, scope_of
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

T = TypeVar("T")


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
        if scope_of(stored.event) == LOBBY_SCOPE:
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
# The same update on asyncpg's own connection (the writer's transaction).
_PG_UPDATE_POSITION = "UPDATE projection_positions SET position = $2 WHERE name = $1"
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
    keyed = rooms.fold_changes(stored)
    if keyed:
        await rooms.write(conn, keyed)
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
    driver = driver_in_transaction(conn)
    if driver is not None:
        # asyncpg answers with the command tag: "UPDATE <rows>".
        if await driver.execute(_PG_UPDATE_POSITION, name, position) != "UPDATE 0":
            return
        await conn.execute(_INSERT_POSITION, {"name": name, "position": position})
        return
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


# -- folding forward ---------------------------------------------------------
#
# A running server keeps the tables right itself: ``save`` writes, in every
# append's transaction, the absolute row of every name the batch touches. So
# a row, once right, stays right, and writing a name's row as the log decides
# it at the head is correct at any moment the writer holds the lock, whatever
# appends came before. Catching up and rebuilding lean on that: the log is
# folded in chunks with no lock (appends go on), and the names whose rows are
# wrong or were touched since are written in short locked transactions, each
# of which first folds the few events appended since the last unlocked read,
# so what it writes is the log at that transaction's head. Only the last one
# moves the position, so a crash part-way leaves the projection behind, never
# ahead, and the next start folds forward again.

# Events per unlocked read: one SELECT each, so no read holds a snapshot (and
# SQLite's WAL checkpoint) for the whole log.
FOLD_CHUNK = 5000
# Names per locked write transaction (at most one online_users and one
# resume_tokens row each): a few milliseconds of writes, so that the COMMIT's
# fsync, which every append pays too, is most of what a waiting append waits.
WRITE_CHUNK = 100
# Seconds at least between two locked transactions (see _settle).
WRITE_PAUSE = 0.03
# Rows per page when rebuild compares the tables with the fold.
SCAN_CHUNK = 5000


@dataclass(slots=True)
class FoldStats:
    """What a catch-up or rebuild did, for the command's report."""

    events: int = 0  # events folded, with and without the lock
    online_written: int = 0  # online_users names rewritten (or removed)
    grants_written: int = 0  # resume_tokens names rewritten (or removed)
    # Seconds each locked write transaction held the write lock (PostgreSQL:
    # from asking for it), through COMMIT.
    held: list[float] = field(default_factory=list)
    resume_tokens: int = 0  # rows resume_tokens holds at the end (rebuild only)

    @property
    def transactions(self) -> int:
        return len(self.held)

    @property
    def longest_transaction(self) -> float:
        return max(self.held, default=0.0)


class _Folder:
    """The view being folded forward, the latest login of every name the
    fold has seen (the resume_tokens projection needs it across chunks), and
    the names whose rows the tables still need."""

    def __init__(self, view: OnlineUsers, stats: FoldStats) -> None:
        self.view = view
        self.stats = stats
        self.grants: dict[str, dict[str, object] | None] = {}
        self.dirty_online: set[str] = set()
        self.dirty_grants: set[str] = set()
        # The rows of the rooms module's tables, as the fold has them.
        self.keyed: dict[rooms.RowKey, rooms.Row] = {}
        self.dirty_keyed: set[rooms.RowKey] = set()
        # Rebuild folds the log's past without marking: the comparison with
        # the tables decides which of those names need a write.
        self.marking = True

    def apply(self, stored: StoredEvent) -> None:
        self.view.apply(stored)
        self.stats.events += 1
        event = stored.event
        if isinstance(event, UserLoggedIn):
            self.grants[event.name] = _grant_row(stored)
            if self.marking:
                self.dirty_grants.add(event.name)
        elif isinstance(event, UserJoined | UserLeft):
            if self.marking:
                self.dirty_online.add(event.name)
        for key, row in rooms.changes(stored):
            self.keyed[key] = row
            if self.marking:
                self.dirty_keyed.add(key)

    def pending(self) -> int:
        return len(self.dirty_online) + len(self.dirty_grants) + len(self.dirty_keyed)

    def online_row(self, name: str) -> dict[str, object] | None:
        user = self.view.get(name)
        return None if user is None else _online_row(user)

    def grant_row(self, name: str) -> dict[str, object] | None:
        return self.grants.get(name)


async def _fold_unlocked(store: EventStore, folder: _Folder) -> None:
    """Fold to (near) the head in chunked reads that take no lock."""
    while True:
        count = 0
        async for stored in store.read(after=folder.view.position, limit=FOLD_CHUNK):
            folder.apply(stored)
            count += 1
        if count < FOLD_CHUNK:
            return


def _take(names: set[T], n: int) -> list[T]:
    return [names.pop() for _ in range(min(n, len(names)))]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while appends wait: a full pass over a large
    fold's objects (a row per name) takes tens of milliseconds."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _settle(store: EventStore, writer_engine: AsyncEngine, folder: _Folder) -> OnlineUsers:
    """Write every pending name in short locked transactions; the last one
    also folds the final tail and moves the position."""
    stats = folder.stats
    while True:
        await _fold_unlocked(store, folder)
        with _collector_paused():
            async with writer_engine.begin() as conn:
                # SQLite: the writer engine's BEGIN IMMEDIATE holds the lock by
                # now; PostgreSQL: read_locked asks for it first.
                started = time.monotonic()
                # Appends committed since the unlocked read: a few, since that
                # read ended at the head moments ago.
                async for stored in store.read_locked(conn, after=folder.view.position):
                    folder.apply(stored)
                final = folder.pending() <= WRITE_CHUNK
                budget = folder.pending() if final else WRITE_CHUNK
                online = _take(folder.dirty_online, budget)
                grants = _take(folder.dirty_grants, budget - len(online))
                keyed = _take(folder.dirty_keyed, budget - len(online) - len(grants))
                await _replace(conn, _INSERT_ONLINE, _DELETE_ONLINE, {n: folder.online_row(n) for n in online})
                await _replace_grants(conn, {n: folder.grant_row(n) for n in grants})
                if keyed:
                    await rooms.write(conn, {k: folder.keyed.get(k) for k in keyed})
                if final:
                    await _set_position(conn, ONLINE_USERS, folder.view.position)
        held = time.monotonic() - started
        stats.held.append(held)
        stats.online_written += len(online)
        stats.grants_written += len(grants)
        if final:
            return folder.view
        # Let waiting appends in before the next transaction: SQLite's busy
        # handler retries with growing sleeps (1, 2, 5, 10, 15, 20, 25 ms...),
        # so a writer that found the lock taken wakes up late, and
        # back-to-back transactions would find it asleep and keep it out for
        # several of them.
        await asyncio.sleep(max(WRITE_PAUSE, 2 * held))


async def _replace_grants(conn: AsyncConnection, changes: dict[str, dict[str, object] | None]) -> None:
    rows = [row for row in changes.values() if row is not None]
    if rows:
        # A damaged table may hold one of these hashes under another name;
        # that row is wrong (a hash belongs to one login) and its own name is
        # pending anyway, so clear it rather than fail on the unique index.
        await conn.execute(
            resume_tokens_table.delete().where(resume_tokens_table.c.token_hash.in_([r["token_hash"] for r in rows]))
        )
    await _replace(conn, _INSERT_GRANTS, _DELETE_GRANTS, changes)


async def catch_up(
    store: EventStore, writer_engine: AsyncEngine, view: OnlineUsers, stats: FoldStats | None = None
) -> OnlineUsers:
    """Fold the persisted projection forward from ``view.position`` (as
    ``load`` returned it) to the head, and store the rows that changed.

    Reads only the events after ``view.position``; appends by a running
    server wait for at most one short transaction.
    """
    return await _settle(store, writer_engine, _Folder(view, stats or FoldStats()))


def _same(row: sa.Row[Any], wanted: dict[str, object] | None) -> bool:
    if wanted is None:
        return False
    found = dict(row._mapping)
    issued = found.get("issued_at")
    if isinstance(issued, datetime) and issued.tzinfo is None:
        # SQLite hands timestamps back naive; everything we write is UTC.
        found["issued_at"] = issued.replace(tzinfo=UTC)
    return found == wanted


async def _mark_differences(
    engine: AsyncEngine,
    table: sa.Table,
    wanted: Mapping[str, dict[str, object] | None],
    dirty: set[str],
) -> None:
    """Mark every name whose row differs from ``wanted``: rows the table has
    (paged by name, no lock) and wanted rows it lacks.

    A row seen here that a later append rewrites is marked by the fold of
    that append; any other row stays as read until it is written.
    """
    seen: set[str] = set()
    after: str | None = None
    while True:
        query = sa.select(table).order_by(table.c.name).limit(SCAN_CHUNK)
        if after is not None:
            query = query.where(table.c.name > after)
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        for row in rows:
            seen.add(row.name)
            if not _same(row, wanted.get(row.name)):
                dirty.add(row.name)
        if len(rows) < SCAN_CHUNK:
            break
        after = rows[-1].name
    dirty.update(name for name, row in wanted.items() if row is not None and name not in seen)


async def _mark_keyed_differences(engine: AsyncEngine, folder: _Folder) -> None:
    """``_mark_differences`` for the rooms module's tables (composite keys)."""
    seen: set[rooms.RowKey] = set()
    for table in rooms.KEYED_TABLES:
        async for row in rooms.scan(engine, table, SCAN_CHUNK):
            key = rooms.row_key(table, row)
            seen.add(key)
            wanted = folder.keyed.get(key)
            if wanted is None or dict(row._mapping) != wanted:
                folder.dirty_keyed.add(key)
    folder.dirty_keyed.update(key for key, row in folder.keyed.items() if row is not None and key not in seen)


async def rebuild(
    store: EventStore, writer_engine: AsyncEngine, stats: FoldStats | None = None
) -> OnlineUsers:
    """Recompute the persisted projections from position 0 and store them.

    Safe while servers append: the log is folded and the tables compared with
    no lock held, then only the rows that differ (and those appends touched
    meanwhile) are written, ``WRITE_CHUNK`` names per short transaction, the
    last of which reconciles the final tail and sets the position. Memory
    grows with the number of names ever logged in (one row each), not with
    the log.
    """
    stats = stats or FoldStats()
    folder = _Folder(OnlineUsers(), stats)
    folder.marking = False
    await _fold_unlocked(store, folder)
    # From here on every folded event marks its name: the comparison below
    # is exact only for names no later event touches.
    folder.marking = True
    online = {user.name: _online_row(user) for user in folder.view.users()}
    await _mark_differences(store.engine, online_users_table, online, folder.dirty_online)
    await _mark_differences(store.engine, resume_tokens_table, folder.grants, folder.dirty_grants)
    await _mark_keyed_differences(store.engine, folder)
    view = await _settle(store, writer_engine, folder)
    stats.resume_tokens = sum(row is not None for row in folder.grants.values())
    return view
