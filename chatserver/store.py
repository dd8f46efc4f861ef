"""The event store: the only module that writes the ``events`` table's SQL.

Positions are assigned here, inside the appending transaction, as the head
position plus one. The transaction first takes the table's write lock (SQLite:
BEGIN IMMEDIATE on the writer's engine; PostgreSQL: LOCK TABLE ... EXCLUSIVE
MODE), so positions are gap-free and commit in position order: a reader
tailing the log by position never skips an event that commits late.

An event is encoded into its row (``encode``) before any transaction sees it:
whatever cannot be stored (text that is not valid Unicode, a stream name too
long for its column) is refused then, alone, instead of failing the
transaction it would have joined with other requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .database import driver_connection, driver_in_transaction
from .events import (
    EVENT_TYPES,
    NewEvent,
    StoredEvent,
    UserLeft,
    from_payload,
    scope_of,
    to_payload,
)

metadata = sa.MetaData()

# Column sizes the encoder checks before PostgreSQL would refuse a row (SQLite
# would store anything).
STREAM_MAX = 200
COMMAND_ID_MAX = 200
SCOPE_MAX = 200
VERSION_MAX = 2**31 - 1  # an INTEGER column

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("stream", sa.String(STREAM_MAX), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    # Every event of one command carries its id (migration 0003; NULL before).
    sa.Column("command_id", sa.String(COMMAND_ID_MAX), nullable=True),
    # The conversation the event belongs to (``events.scope_of``; migration
    # 0005): derived from the payload, stored so that a room's history, its
    # unread count and chat-replay's filters read an index, not the log.
    sa.Column("scope", sa.String(SCOPE_MAX), nullable=True),
    sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
    sa.Index("ix_events_command_id", "command_id"),
    sa.Index("ix_events_scope_position", "scope", "position"),
)


class _EncodedJSON(sa.types.TypeDecorator[str]):
    """The payload column's type for a value that is already JSON text: bound
    as is, so the row holds exactly the text ``encode`` made (SQLite) or
    parses it (PostgreSQL's jsonb), as the column's own JSON type would."""

    impl = sa.JSON().with_variant(JSONB(), "postgresql")
    cache_ok = True

    def bind_processor(self, dialect: sa.Dialect) -> None:
        return None


# Built once: every append runs them (and the SQLite writer compiles each once).
_HEAD = sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0))
_INSERT = events_table.insert().values(payload=sa.bindparam("payload", type_=_EncodedJSON()))
# The same three on asyncpg's own connection, inside a transaction begun.
_PG_LOCK = "LOCK TABLE events IN EXCLUSIVE MODE"
# What the writer sends to begin an append's transaction (PostgreSQL).
BEGIN_LOCKED = f"BEGIN; {_PG_LOCK}"
_PG_HEAD = "SELECT coalesce(max(position), 0) FROM events"
_PG_INSERT = (
    "INSERT INTO events (position, stream, version, type, payload, recorded_at, command_id, scope) "
    "VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)"
)


class ConcurrencyError(Exception):
    """Another append took a (stream, version) first."""


class UnencodableEvent(ValueError):
    """An event that no database could store as it is (its text is not valid
    Unicode, or a field does not fit its column)."""


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """A new event in its row form, checked: what an append inserts."""

    new: NewEvent
    type: str
    payload: str  # JSON text
    scope: str | None = None

    @property
    def command_id(self) -> str | None:
        return self.new.command_id


def _check_text(what: str, value: object, max_chars: int | None = None) -> None:
    if not isinstance(value, str):
        raise UnencodableEvent(f"{what} is not a string")
    if max_chars is not None and not 0 < len(value) <= max_chars:
        raise UnencodableEvent(f"{what} must have 1 to {max_chars} characters")
    # PostgreSQL text holds neither NUL nor lone surrogates; refused on every
    # backend so that a log moves between them.
    if "\x00" in value:
        raise UnencodableEvent(f"{what} contains NUL")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise UnencodableEvent(f"{what} is not valid Unicode (a lone surrogate)") from None


def _check_payload_text(value: object) -> None:
    if isinstance(value, str):
        _check_text("a payload string", value)
    elif isinstance(value, dict):
        for item in value.values():
            _check_payload_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_payload_text(item)


def encode(new: NewEvent) -> EncodedEvent:
    """The row form of ``new``, or UnencodableEvent: nothing this returns can
    fail an insert for what it holds (only a version conflict can)."""
    _check_text("the stream", new.stream, STREAM_MAX)
    if type(new.version) is not int or not 0 < new.version <= VERSION_MAX:
        raise UnencodableEvent(f"the version must be an integer from 1 to {VERSION_MAX}")
    if new.command_id is not None:
        _check_text("the command id", new.command_id, COMMAND_ID_MAX)
    type_ = getattr(new.event, "type", None)
    if type_ not in EVENT_TYPES or not isinstance(new.event, EVENT_TYPES[type_]):
        raise UnencodableEvent(f"not a domain event: {type(new.event).__name__}")
    payload = to_payload(new.event)
    try:
        text = orjson.dumps(payload).decode()
    except orjson.JSONEncodeError as exc:
        # Lone surrogates end here: orjson refuses what UTF-8 cannot hold.
        raise UnencodableEvent(f"the payload cannot be encoded: {exc}") from None
    if "\\u0000" in text:
        # orjson writes a NUL as this escape; so does a text holding those
        # six characters. Rare either way: only then are the strings walked.
        _check_payload_text(payload)
    scope = scope_of(new.event)
    if scope is not None:
        _check_text("the conversation", scope, SCOPE_MAX)
    return EncodedEvent(new, type_, text, scope)


@dataclass(frozen=True, slots=True)
class StreamHead:
    version: int
    last_type: str | None

    @property
    def online(self) -> bool:
        return self.last_type is not None and self.last_type != UserLeft.type


def _to_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back naive; everything we write is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _row_to_event(row: Any) -> StoredEvent:
    return StoredEvent(
        position=row.position,
        stream=row.stream,
        version=row.version,
        event=from_payload(row.type, row.payload),
        recorded_at=_to_utc(row.recorded_at),
        command_id=row.command_id,
    )


def _raw_row_to_event(row: Sequence[Any]) -> StoredEvent:
    """A row of ``_BY_COMMAND``, as SQLAlchemy hands it back or as the SQLite
    writer thread's driver does (payload and recorded_at still text)."""
    position, stream, version, type_, payload, recorded_at, command_id = row
    if isinstance(payload, str | bytes):
        payload = orjson.loads(payload)
    if isinstance(recorded_at, str):
        recorded_at = datetime.fromisoformat(recorded_at)
    return StoredEvent(position, stream, version, from_payload(type_, payload), _to_utc(recorded_at), command_id)


_LOOKUP_CHUNK = 64


@lru_cache(maxsize=None)
def _by_command(n: int) -> sa.Select[Any]:
    # n separate binds rather than an expanding IN: the SQLite writer thread
    # runs compiled statements on the driver, which knows no expanding binds.
    # n is a power of two (see ``commands``), so few statements are compiled.
    return (
        sa.select(
            events_table.c.position,
            events_table.c.stream,
            events_table.c.version,
            events_table.c.type,
            events_table.c.payload,
            events_table.c.recorded_at,
            events_table.c.command_id,
        )
        .where(events_table.c.command_id.in_([sa.bindparam(f"id{i}") for i in range(n)]))
        .order_by(events_table.c.position)
    )


# PostgreSQL takes the ids as one array parameter: one statement, one bind.
_BY_COMMAND_PG = (
    sa.select(*_by_command(1).selected_columns)
    .where(events_table.c.command_id == sa.func.any(sa.bindparam("ids", type_=ARRAY(sa.String))))
    .order_by(events_table.c.position)
)

_BETWEEN = sa.select(events_table.c.position, events_table.c.stream, events_table.c.version).where(
    events_table.c.position.between(sa.bindparam("first"), sa.bindparam("last"))
)


class EventStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"

    # -- writing ---------------------------------------------------------
    async def append(
        self, conn: AsyncConnection, new_events: Sequence[NewEvent | EncodedEvent], *, locked: bool = False
    ) -> list[StoredEvent]:
        """Append in the caller's transaction; positions follow the head.

        Raises ConcurrencyError when a (stream, version) is taken (the caller
        must roll the transaction back), UnencodableEvent for a NewEvent that
        ``encode`` refuses. ``locked``: the caller has taken ``lock`` already.
        """
        if not new_events:
            return []
        rows = [e if isinstance(e, EncodedEvent) else encode(e) for e in new_events]
        if not locked:
            await self.lock(conn)
        driver = driver_in_transaction(conn)
        head = await driver.fetchval(_PG_HEAD) if driver is not None else (await conn.execute(_HEAD)).scalar_one()
        now = datetime.now(UTC)
        stored = [
            StoredEvent(
                position=head + i,
                stream=r.new.stream,
                version=r.new.version,
                event=r.new.event,
                recorded_at=now,
                command_id=r.new.command_id,
            )
            for i, r in enumerate(rows, start=1)
        ]
        if driver is not None:
            try:
                await driver.executemany(
                    _PG_INSERT,
                    [
                        (s.position, s.stream, s.version, r.type, r.payload, now, s.command_id, r.scope)
                        for s, r in zip(stored, rows, strict=True)
                    ],
                )
            except asyncpg.UniqueViolationError as exc:
                raise ConcurrencyError(str(exc)) from exc
            return stored
        try:
            await conn.execute(
                _INSERT,
                [
                    {
                        "position": s.position,
                        "stream": s.stream,
                        "version": s.version,
                        "type": r.type,
                        "payload": r.payload,
                        "recorded_at": now,
                        "command_id": s.command_id,
                        "scope": r.scope,
                    }
                    for s, r in zip(stored, rows, strict=True)
                ],
            )
        except sa.exc.IntegrityError as exc:
            raise ConcurrencyError(str(exc.orig)) from exc
        return stored

    async def lock(self, conn: AsyncConnection) -> None:
        """Take the log's write lock for the rest of the caller's transaction."""
        # SQLite: the writer engine's BEGIN IMMEDIATE already holds the lock.
        if self._postgres:
            driver = driver_in_transaction(conn)
            if driver is not None:
                await driver.execute(_PG_LOCK)
            else:
                await conn.exec_driver_sql(_PG_LOCK)

    async def commands(self, conn: AsyncConnection, ids: Collection[str]) -> dict[str, list[StoredEvent]]:
        """The stored events of each of these command ids that is in the log,
        in position order, read in the caller's transaction (under ``lock``
        for an answer no concurrent append can change)."""
        found: dict[str, list[StoredEvent]] = {}
        if self._postgres:
            # Until autovacuum first analyzes the table, the planner guesses
            # that an ANY of many ids matches a large share of it and scans
            # it all, in every append: measured 16k -> 3k appends/s on a
            # fresh log. The index is always right for this lookup.
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            for row in (await conn.execute(_BY_COMMAND_PG, {"ids": list(ids)})).all():
                event = _raw_row_to_event(row)
                found.setdefault(event.command_id or "", []).append(event)
            return found
        pending = sorted(set(ids))
        for start in range(0, len(pending), _LOOKUP_CHUNK):
            chunk = pending[start : start + _LOOKUP_CHUNK]
            size = 1 << (len(chunk) - 1).bit_length()
            chunk += chunk[-1:] * (size - len(chunk))
            result = await conn.execute(_by_command(size), {f"id{i}": v for i, v in enumerate(chunk)})
            for row in result.all():
                event = _raw_row_to_event(row)
                found.setdefault(event.command_id or "", []).append(event)
        return found

    async def holds(self, conn: AsyncConnection, stored: Sequence[StoredEvent]) -> bool:
        """Whether the log holds these events, at their positions: the
        outcome of the one transaction that tried to append them (it commits
        all or nothing, and no other append can reuse a position it took
        unless it did not commit)."""
        if not stored:
            return False
        ids = {s.command_id for s in stored if s.command_id is not None}
        if ids:
            rows = [(e.position, e.stream, e.version) for found in (await self.commands(conn, ids)).values() for e in found]
        else:
            span = {"first": stored[0].position, "last": stored[-1].position}
            rows = [tuple(r) for r in (await conn.execute(_BETWEEN, span)).all()]
        return any((s.position, s.stream, s.version) in rows for s in stored)

    async def wait_for_writers(self, conn: AsyncConnection) -> None:
        """Wait, in the caller's transaction, until no append is in flight:
        the lock conflicts with the appenders' (a transaction whose client
        vanished holds it until the server has committed or rolled it back)."""
        if self._postgres:
            await conn.exec_driver_sql("LOCK TABLE events IN SHARE MODE")

    # -- reading ---------------------------------------------------------
    async def head(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(_HEAD)).scalar_one())

    async def stream_head(self, stream: str) -> StreamHead:
        query = (
            sa.select(events_table.c.version, events_table.c.type)
            .where(events_table.c.stream == stream)
            .order_by(events_table.c.version.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return StreamHead(0, None) if row is None else StreamHead(row.version, row.type)

    async def stream_versions(self, prefix: str) -> dict[str, int]:
        """The current version of every stream whose name starts with ``prefix``.

        A skip scan over the (stream, version) index, one seek per stream:
        reading it costs the number of streams, not the length of the log
        (start-up reads it)."""
        e = events_table.alias("e")
        first = (
            sa.select(sa.func.min(events_table.c.stream).label("stream"))
            .where(events_table.c.stream >= prefix)
            .cte("streams", recursive=True)
        )
        following = sa.select(
            sa.select(sa.func.min(e.c.stream)).where(e.c.stream > first.c.stream).scalar_subquery()
        ).where(first.c.stream.startswith(prefix, autoescape=True))
        streams = first.union_all(following)
        version = sa.select(sa.func.max(e.c.version)).where(e.c.stream == streams.c.stream).scalar_subquery()
        query = sa.select(streams.c.stream, version).where(streams.c.stream.startswith(prefix, autoescape=True))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {stream: int(v) for stream, v in rows if v is not None}

    def _select(
        self,
        *,
        after: int = 0,
        before: int | None = None,
        types: Iterable[str] | None = None,
        streams: Iterable[str] | None = None,
        scope: str | None = None,
    ) -> sa.Select[Any]:
        query = sa.select(events_table).where(events_table.c.position > after)
        if scope is not None:
            query = query.where(events_table.c.scope == scope)
        if before is not None:
            query = query.where(events_table.c.position < before)
        if types is not None:
            query = query.where(events_table.c.type.in_(list(types)))
        if streams is not None:
            query = query.where(events_table.c.stream.in_(list(streams)))
        return query

    async def read(
        self,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int | None = None,
        types: Iterable[str] | None = None,
        streams: Iterable[str] | None = None,
        scope: str | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Events after a position, in position order, streamed (constant memory)."""
        query = self._select(after=after, before=before, types=types, streams=streams, scope=scope).order_by(
            events_table.c.position
        )
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            result = await conn.stream(query.execution_options(yield_per=1000))
            async for row in result:
                yield _row_to_event(row)

    async def read_locked(self, conn: AsyncConnection, after: int = 0) -> AsyncIterator[StoredEvent]:
        """The log after a position, read in the caller's transaction with appends locked out."""
        await self.lock(conn)
        query = self._select(after=after).order_by(events_table.c.position).execution_options(yield_per=1000)
        result = await conn.stream(query)
        async for row in result:
            yield _row_to_event(row)

    async def read_between(self, conn: AsyncConnection, after: int, before: int) -> list[StoredEvent]:
        """Events strictly between two positions, read in the caller's
        transaction (an append's: under the log's lock, everything before
        its own events is committed). Only a log several processes share
        (PostgreSQL) has events an append has not seen."""
        if not self._postgres:
            raise NotImplementedError("only a shared (PostgreSQL) log is read inside an append")
        return await pg_read_between(conn, after, before)

    async def read_all(self, **kwargs: Any) -> list[StoredEvent]:
        return [e async for e in self.read(**kwargs)]

    async def latest(
        self,
        *,
        limit: int,
        before: int | None = None,
        types: Iterable[str] | None = None,
        scope: str | None = None,
    ) -> list[StoredEvent]:
        """The last ``limit`` events before a position, oldest first."""
        query = (
            self._select(before=before, types=types, scope=scope)
            .order_by(events_table.c.position.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_event(r) for r in reversed(rows)]


    async def conversation_state(
        self, read: dict[str, int], *, through: int, types: Iterable[str], not_stream: str, cap: int
    ) -> dict[str, tuple[int, StoredEvent | None]]:
        """For each scope: how many events of ``types`` not in ``not_stream``
        (the reader's own) lie in (read[scope], through], counted up to
        ``cap``, and its last event up to ``through``. Each is a walk of the
        (scope, position) index that stops at ``cap`` rows, so an old read
        marker costs no more than a recent one."""
        e = events_table
        types = list(types)
        out: dict[str, tuple[int, StoredEvent | None]] = {}
        async with self.engine.connect() as conn:
            for scope, start in read.items():
                row = (
                    await conn.execute(
                        sa.select(e)
                        .where(e.c.scope == scope, e.c.position <= through)
                        .order_by(e.c.position.desc())
                        .limit(1)
                    )
                ).first()
                last = None if row is None else _row_to_event(row)
                count = 0
                if last is not None and last.position > start:
                    rows = (
                        sa.select(e.c.position)
                        .where(e.c.scope == scope, e.c.position > start, e.c.position <= through)
                        .where(e.c.type.in_(types), e.c.stream != not_stream)
                        .limit(cap)
                        .subquery()
                    )
                    count = int((await conn.execute(sa.select(sa.func.count()).select_from(rows))).scalar_one())
                out[scope] = (count, last)
        return out

# -- following a shared log on PostgreSQL -------------------------------------
# Every process reads each event another process appended, right after the
# signal that it was (on the listening asyncpg connection), or in its own next
# append's transaction when that comes first: one prepared statement and no
# SQLAlchemy machinery (which was a fifth of a process's time under load with
# two processes).
_PG_SELECT = "SELECT position, stream, version, type, payload::text, recorded_at, command_id FROM events"
_PG_FOLLOW = f"{_PG_SELECT} WHERE position > $1 ORDER BY position LIMIT $2"
_PG_BETWEEN = f"{_PG_SELECT} WHERE position > $1 AND position < $2 ORDER BY position"


async def pg_read_after(conn: Any, after: int, limit: int) -> list[StoredEvent]:
    """Events after ``after``, in position order, on a raw asyncpg connection."""
    return _pg_stored(await conn.fetch(_PG_FOLLOW, after, limit))


async def pg_read_between(conn: AsyncConnection, after: int, before: int) -> list[StoredEvent]:
    """Events strictly between two positions, read in the caller's
    transaction (an append's, under the log's lock) on its asyncpg
    connection."""
    return _pg_stored(await driver_connection(conn).fetch(_PG_BETWEEN, after, before))


def _pg_stored(rows: list[Any]) -> list[StoredEvent]:
    return [
        StoredEvent(
            position=r[0],
            stream=r[1],
            version=r[2],
            event=from_payload(r[3], orjson.loads(r[4])),
            recorded_at=r[5],
            command_id=r[6],
        )
        for r in rows
    ]


# -- bulk reads for chat-replay ---------------------------------------------
# chat-replay dumps whole logs (millions of events) and SQLAlchemy's per-row
# result processing is too slow for that, so these functions run their SQL on
# the raw drivers: the stdlib sqlite3 module (a read-only connection to the
# same file) and asyncpg. Events come in chunks, in position order, so memory
# stays constant whatever the size of the log. On SQLite the database renders
# each chunk as one string (jsonl lines, or one JSON array of rows): Python
# handles a chunk, not a row.

from collections.abc import Iterator  # noqa: E402
from dataclasses import replace as _dataclass_replace  # noqa: E402

REPLAY_CHUNK = 4096

# A row for chat-replay: [position, stream, type, time, payload, scope], where
# time is ISO 8601 UTC with microseconds and a Z ("2026-11-25T21:55:13.204518Z"),
# payload is the parsed JSON object and scope the events table's scope column
# ("room:<casefolded room>", "dm:<a>\t<b>", or None).
ReplayRow = list[Any]

# The events whose scope migration 0005 backfills as the lobby's: the only
# room-scoped events a log written before rooms holds.
_LEGACY_LOBBY_TYPES = ("UserJoined", "UserLeft", "MessagePosted")


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which events chat-replay reads: every condition given must hold."""

    after: int = 0  # position > after
    through: int | None = None  # position <= through
    since: datetime | None = None  # recorded_at >= since (timezone-aware)
    until: datetime | None = None  # recorded_at < until (timezone-aware)
    types: tuple[str, ...] | None = None  # type IN types
    exclude_types: tuple[str, ...] = ()  # type NOT IN exclude_types
    streams: tuple[str, ...] | None = None  # stream IN streams
    scopes: tuple[str, ...] | None = None  # scope IN scopes ("room:dev", "dm:alice\tbob")
    # The log has no scope column (it was never upgraded past migration
    # 0004): scope is computed as the migration would backfill it.
    legacy: bool = False


def _scope_sql(f: ReplayFilter) -> str:
    """The scope of a row, as SQL both databases understand."""
    if not f.legacy:
        return "scope"
    types = ", ".join(f"'{t}'" for t in _LEGACY_LOBBY_TYPES)
    return f"(CASE WHEN type IN ({types}) THEN 'room:lobby' END)"


def _replay_where(f: ReplayFilter, dialect: str) -> tuple[str, list[Any]]:
    """The WHERE clause of a filter, with sqlite3 (?) or asyncpg ($n) parameters."""
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return "?" if dialect == "sqlite" else f"${len(params)}"

    def one_of(values: tuple[Any, ...]) -> str:
        return "(" + ", ".join(param(v) for v in values) + ")" if values else "(NULL)"

    def at(moment: datetime) -> Any:
        # SQLite holds recorded_at as SQLAlchemy writes it: naive UTC text
        # that sorts as it reads; PostgreSQL holds a timestamptz.
        if dialect == "sqlite":
            return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return moment

    clauses = [f"position > {param(f.after)}"]
    if f.through is not None:
        clauses.append(f"position <= {param(f.through)}")
    if f.since is not None:
        clauses.append(f"recorded_at >= {param(at(f.since))}")
    if f.until is not None:
        clauses.append(f"recorded_at < {param(at(f.until))}")
    if f.types is not None:
        clauses.append(f"type IN {one_of(f.types)}")
    if f.exclude_types:
        clauses.append(f"type NOT IN {one_of(f.exclude_types)}")
    if f.streams is not None:
        clauses.append(f"stream IN {one_of(f.streams)}")
    if f.scopes is not None:
        # Rooms and conversations by the indexed scope column, not by payload
        # fields: one equality per value, case folded once by the caller.
        scope = _scope_sql(f)
        if dialect == "sqlite" and len(f.scopes) > 1:
            # One scope: its (scope, position) index yields rows in position
            # order. Several: SQLite would gather every match after the
            # chunk's start from each and sort them, for every chunk (a
            # 1,000,000-event lobby plus a room: 30 s instead of 10). The
            # unary + keeps it on the position order instead: at worst one
            # scan of the window, as without the filter.
            scope = f"+{scope}"
        clauses.append(f"{scope} IN {one_of(f.scopes)}")
    return " AND ".join(clauses), params


# SQLite (stdlib sqlite3 connection, autocommit: every statement sees the
# latest commit, which is what --follow needs under WAL).

_SQLITE_TIME = "replace(recorded_at, ' ', 'T') || 'Z'"


def _sqlite_jsonl_line(f: ReplayFilter) -> str:
    # scope last: the key jsonl gained with rooms, after the five it always had.
    return (
        "json_object('position', position, 'stream', stream, 'type', type, "
        f"'time', {_SQLITE_TIME}, 'payload', json(payload), 'scope', {_scope_sql(f)})"
    )


def _sqlite_row_array(f: ReplayFilter) -> str:
    return f"json_array(position, stream, type, {_SQLITE_TIME}, json(payload), {_scope_sql(f)})"


def replay_sqlite_tables(conn: Any) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def replay_sqlite_has_scope(conn: Any) -> bool:
    """Whether the events table has its scope column (migration 0005)."""
    return any(row[1] == "scope" for row in conn.execute("PRAGMA table_info(events)"))


def replay_sqlite_head(conn: Any) -> int:
    return conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


def replay_sqlite_tail_after(conn: Any, f: ReplayFilter, count: int) -> int:
    """The ``after`` that leaves the last ``count`` events the filter matches."""
    if count <= 0:
        return f.through if f.through is not None else replay_sqlite_head(conn)
    where, params = _replay_where(f, "sqlite")
    row = conn.execute(
        f"SELECT position FROM events WHERE {where} ORDER BY position DESC LIMIT 1 OFFSET ?",
        (*params, count - 1),
    ).fetchone()
    return f.after if row is None else row[0] - 1


def _sqlite_chunk(conn: Any, f: ReplayFilter, item: str, glue: str, limit: int) -> tuple[Any, int, int]:
    # One statement aggregates the chunk's rows in position order: the inner
    # ORDER BY holds because SQLite never flattens a subquery with ORDER BY
    # into an aggregate query.
    where, params = _replay_where(f, "sqlite")
    return conn.execute(
        f"SELECT {glue}, count(*), coalesce(max(position), 0) FROM "
        f"(SELECT {item} AS item, position FROM events WHERE {where} ORDER BY position LIMIT ?)",
        (*params, limit),
    ).fetchone()


def _sqlite_chunks(
    conn: Any, f: ReplayFilter, item: str, glue: str, limit: int | None, chunk: int
) -> Iterator[tuple[Any, int, int]]:
    remaining = limit
    while remaining is None or remaining > 0:
        size = chunk if remaining is None else min(chunk, remaining)
        text, count, last = _sqlite_chunk(conn, f, item, glue, size)
        if count:
            yield text, count, last
        if count < size:
            return
        if remaining is not None:
            remaining -= count
        f = _dataclass_replace(f, after=last)


_SQLITE_JSONL_GLUE = "CAST(group_concat(item, char(10)) || char(10) AS BLOB)"
_SQLITE_ROWS_GLUE = "'[' || group_concat(item, ',') || ']'"


def replay_sqlite_jsonl(
    conn: Any, f: ReplayFilter, *, limit: int | None = None, chunk: int = REPLAY_CHUNK
) -> Iterator[tuple[bytes, int, int]]:
    """The matching events as jsonl, chunk by chunk: (UTF-8 lines, count, last position).

    Each line is {"position", "stream", "type", "time", "payload", "scope"}, rendered
    by SQLite; every line ends in a newline.
    """
    yield from _sqlite_chunks(conn, f, _sqlite_jsonl_line(f), _SQLITE_JSONL_GLUE, limit, chunk)


def replay_sqlite_rows(
    conn: Any, f: ReplayFilter, *, limit: int | None = None, chunk: int = REPLAY_CHUNK
) -> Iterator[list[ReplayRow]]:
    """The matching events as ReplayRows, chunk by chunk."""
    for text, _count, _last in _sqlite_chunks(conn, f, _sqlite_row_array(f), _SQLITE_ROWS_GLUE, limit, chunk):
        yield orjson.loads(text)


# PostgreSQL (an asyncpg connection).

_PG_TIME = """to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


async def replay_pg_tables(conn: Any) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = ANY (current_schemas(false))"
    )
    return {r[0] for r in rows}


async def replay_pg_has_scope(conn: Any) -> bool:
    """Whether the events table has its scope column (migration 0005)."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'events' "
            "AND column_name = 'scope' AND table_schema = ANY (current_schemas(false))"
        )
    )


async def replay_pg_head(conn: Any) -> int:
    return await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")


async def replay_pg_tail_after(conn: Any, f: ReplayFilter, count: int) -> int:
    """The ``after`` that leaves the last ``count`` events the filter matches."""
    if count <= 0:
        return f.through if f.through is not None else await replay_pg_head(conn)
    where, params = _replay_where(f, "postgresql")
    position = await conn.fetchval(
        f"SELECT position FROM events WHERE {where} ORDER BY position DESC LIMIT 1 OFFSET ${len(params) + 1}",
        *params,
        count - 1,
    )
    return f.after if position is None else position - 1


async def replay_pg_rows(
    conn: Any, f: ReplayFilter, *, limit: int | None = None, chunk: int = REPLAY_CHUNK
) -> AsyncIterator[list[ReplayRow]]:
    """The matching events as ReplayRows, chunk by chunk, through a server-side cursor.

    Payload keys come in jsonb's order (shortest key first), not as written.
    """
    where, params = _replay_where(f, "postgresql")
    sql = (
        f"SELECT position, stream, type, {_PG_TIME}, payload::text, {_scope_sql(f)} FROM events "
        f"WHERE {where} ORDER BY position"
    )
    if limit is not None:
        params.append(limit)
        sql += f" LIMIT ${len(params)}"
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = await conn.cursor(sql, *params)
        while rows := await cursor.fetch(chunk):
            yield [[r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5]] for r in rows]
