"""The event store: the only module that writes the ``events`` table's SQL.

Positions are assigned here, inside the appending transaction, as the head
position plus one. The transaction first takes the table's write lock (SQLite:
BEGIN IMMEDIATE on the writer's engine; PostgreSQL: LOCK TABLE ... EXCLUSIVE
MODE), so positions are gap-free and commit in position order: a reader
tailing the log by position never skips an event that commits late.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .events import (
    NewEvent,
    StoredEvent,
    UserLeft,
    from_payload,
    to_payload,
)

metadata = sa.MetaData()

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("stream", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
)


# Built once: every append runs them (and the SQLite writer compiles each once).
_HEAD = sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0))
_INSERT = events_table.insert()


class ConcurrencyError(Exception):
    """Another append took a (stream, version) first."""


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
    )


class EventStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"

    # -- writing ---------------------------------------------------------
    async def append(self, conn: AsyncConnection, new_events: Sequence[NewEvent]) -> list[StoredEvent]:
        """Append in the caller's transaction; positions follow the head.

        Raises ConcurrencyError when a (stream, version) is taken; the caller
        must roll the transaction back.
        """
        if not new_events:
            return []
        await self._lock(conn)
        head = (await conn.execute(_HEAD)).scalar_one()
        now = datetime.now(UTC)
        stored = [
            StoredEvent(position=head + i, stream=e.stream, version=e.version, event=e.event, recorded_at=now)
            for i, e in enumerate(new_events, start=1)
        ]
        try:
            await conn.execute(
                _INSERT,
                [
                    {
                        "position": s.position,
                        "stream": s.stream,
                        "version": s.version,
                        "type": s.event.type,
                        "payload": to_payload(s.event),
                        "recorded_at": now,
                    }
                    for s in stored
                ],
            )
        except sa.exc.IntegrityError as exc:
            raise ConcurrencyError(str(exc.orig)) from exc
        return stored

    async def _lock(self, conn: AsyncConnection) -> None:
        # SQLite: the writer engine's BEGIN IMMEDIATE already holds the lock.
        if self._postgres:
            await conn.exec_driver_sql("LOCK TABLE events IN EXCLUSIVE MODE")

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
        """The current version of every stream whose name starts with ``prefix``."""
        query = (
            sa.select(events_table.c.stream, sa.func.max(events_table.c.version))
            .where(events_table.c.stream.startswith(prefix, autoescape=True))
            .group_by(events_table.c.stream)
        )
        async with self.engine.connect() as conn:
            return {stream: int(version) for stream, version in (await conn.execute(query)).all()}

    def _select(
        self,
        *,
        after: int = 0,
        before: int | None = None,
        types: Iterable[str] | None = None,
        streams: Iterable[str] | None = None,
    ) -> sa.Select[Any]:
        query = sa.select(events_table).where(events_table.c.position > after)
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
    ) -> AsyncIterator[StoredEvent]:
        """Events after a position, in position order, streamed (constant memory)."""
        query = self._select(after=after, before=before, types=types, streams=streams).order_by(
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
        await self._lock(conn)
        query = self._select(after=after).order_by(events_table.c.position).execution_options(yield_per=1000)
        result = await conn.stream(query)
        async for row in result:
            yield _row_to_event(row)

    async def read_all(self, **kwargs: Any) -> list[StoredEvent]:
        return [e async for e in self.read(**kwargs)]

    async def latest(
        self, *, limit: int, before: int | None = None, types: Iterable[str] | None = None
    ) -> list[StoredEvent]:
        """The last ``limit`` events before a position, oldest first."""
        query = (
            self._select(before=before, types=types)
            .order_by(events_table.c.position.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_event(r) for r in reversed(rows)]


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

import orjson  # noqa: E402

REPLAY_CHUNK = 4096

# A row for chat-replay: [position, stream, type, time, payload], where time is
# ISO 8601 UTC with microseconds and a Z ("2026-11-25T21:55:13.204518Z") and
# payload is the parsed JSON object.
ReplayRow = list[Any]


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
    rooms: tuple[str, ...] | None = None  # payload's room IN rooms


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
    if f.rooms is not None:
        room = "json_extract(payload, '$.room')" if dialect == "sqlite" else "payload->>'room'"
        clauses.append(f"{room} IN {one_of(f.rooms)}")
    return " AND ".join(clauses), params


# SQLite (stdlib sqlite3 connection, autocommit: every statement sees the
# latest commit, which is what --follow needs under WAL).

_SQLITE_TIME = "replace(recorded_at, ' ', 'T') || 'Z'"
_SQLITE_JSONL_LINE = (
    "json_object('position', position, 'stream', stream, 'type', type, "
    f"'time', {_SQLITE_TIME}, 'payload', json(payload))"
)
_SQLITE_ROW_ARRAY = f"json_array(position, stream, type, {_SQLITE_TIME}, json(payload))"


def replay_sqlite_tables(conn: Any) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


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

    Each line is {"position", "stream", "type", "time", "payload"}, rendered
    by SQLite; every line ends in a newline.
    """
    yield from _sqlite_chunks(conn, f, _SQLITE_JSONL_LINE, _SQLITE_JSONL_GLUE, limit, chunk)


def replay_sqlite_rows(
    conn: Any, f: ReplayFilter, *, limit: int | None = None, chunk: int = REPLAY_CHUNK
) -> Iterator[list[ReplayRow]]:
    """The matching events as ReplayRows, chunk by chunk."""
    for text, _count, _last in _sqlite_chunks(conn, f, _SQLITE_ROW_ARRAY, _SQLITE_ROWS_GLUE, limit, chunk):
        yield orjson.loads(text)


# PostgreSQL (an asyncpg connection).

_PG_TIME = """to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


async def replay_pg_tables(conn: Any) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = ANY (current_schemas(false))"
    )
    return {r[0] for r in rows}


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
        f"SELECT position, stream, type, {_PG_TIME}, payload::text FROM events "
        f"WHERE {where} ORDER BY position"
    )
    if limit is not None:
        params.append(limit)
        sql += f" LIMIT ${len(params)}"
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = await conn.cursor(sql, *params)
        while rows := await cursor.fetch(chunk):
            yield [[r[0], r[1], r[2], r[3], orjson.loads(r[4])] for r in rows]
