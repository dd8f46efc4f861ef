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
        head = (await conn.execute(sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0)))).scalar_one()
        now = datetime.now(UTC)
        stored = [
            StoredEvent(position=head + i, stream=e.stream, version=e.version, event=e.event, recorded_at=now)
            for i, e in enumerate(new_events, start=1)
        ]
        try:
            await conn.execute(
                events_table.insert(),
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
            return (await conn.execute(sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0)))).scalar_one()

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
        limit: int | None = None,
        types: Iterable[str] | None = None,
        streams: Iterable[str] | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Events after a position, in position order, streamed (constant memory)."""
        query = self._select(after=after, types=types, streams=streams).order_by(events_table.c.position)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            result = await conn.stream(query.execution_options(yield_per=1000))
            async for row in result:
                yield _row_to_event(row)

    async def read_locked(self, conn: AsyncConnection) -> AsyncIterator[StoredEvent]:
        """The whole log, read in the caller's transaction with appends locked out."""
        await self._lock(conn)
        query = self._select().order_by(events_table.c.position).execution_options(yield_per=1000)
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
