"""`alembic upgrade head` and `alembic downgrade base`, for real, on an empty
SQLite file and on PostgreSQL 15."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from chatserver.database import DatabaseNotMigrated, check_migrated, create_engine
from chatserver.events import MessagePosted, NewEvent, UserJoined, UserLoggedIn
from chatserver.store import EventStore
from tests.support import Postgres, alembic, sqlite_url

TABLES = {"alembic_version", "events", "online_users", "projection_positions", "resume_tokens", "node_leases"}


async def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def round_trip(url: str) -> None:
    up = alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert TABLES <= await tables(url)
    engine = create_engine(url)
    try:
        await check_migrated(engine)
        async with engine.connect() as conn:
            uniques = await conn.run_sync(lambda c: sa.inspect(c).get_unique_constraints("events"))
        assert any(sorted(u["column_names"]) == ["stream", "version"] for u in uniques)
        async with engine.connect() as conn:
            indexes = await conn.run_sync(lambda c: sa.inspect(c).get_indexes("events"))
        # The lookup of a command id (dedup, unknown commit outcome) is an index search.
        assert any(i["column_names"] == ["command_id"] for i in indexes)
    finally:
        await engine.dispose()
    current = alembic(url, "current")
    assert "0007 (head)" in current.stdout
    down = alembic(url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert await tables(url) <= {"alembic_version"}
    engine = create_engine(url)
    try:
        with pytest.raises(DatabaseNotMigrated):
            await check_migrated(engine)
    finally:
        await engine.dispose()
    again = alembic(url, "upgrade", "head")
    assert again.returncode == 0, again.stderr


async def test_sqlite_upgrade_and_downgrade(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    await round_trip(sqlite_url(path))
    assert path.exists()


@pytest.mark.postgres
async def test_postgres_upgrade_and_downgrade(postgres: Postgres) -> None:
    await round_trip(postgres.create_database("migrations_rt"))


# A log written before migration 0003, as that schema's writer left it.
OLD_ROWS = [
    (1, "user-ann", 1, "UserLoggedIn", '{"name":"ann","session":"s1","node":"n","resume_hash":"","resumed":false}'),
    (2, "user-ann", 2, "UserJoined", '{"name":"ann","room":"lobby"}'),
    (3, "user-ann", 3, "MessagePosted", r'{"sender":"ann","message":"h\u00e9 \\ \"q\"","room":"lobby"}'),
]


async def old_log_upgrades(url: str) -> None:
    down = alembic(url, "upgrade", "0002")
    assert down.returncode == 0, down.stderr
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            payload = "CAST(:payload AS JSONB)" if conn.dialect.name == "postgresql" else ":payload"
            for position, stream, version, type_, text in OLD_ROWS:
                await conn.execute(
                    sa.text(
                        "INSERT INTO events (position, stream, version, type, payload, recorded_at) "
                        f"VALUES (:position, :stream, :version, :type, {payload}, :at)"
                    ).bindparams(sa.bindparam("at", type_=sa.DateTime(timezone=True))),
                    {"position": position, "stream": stream, "version": version, "type": type_, "payload": text,
                     "at": datetime(2026, 11, 30, 12, 0, 0, 1, tzinfo=UTC)},
                )
        with pytest.raises(DatabaseNotMigrated, match="alembic upgrade head"):
            await check_migrated(engine)
    finally:
        await engine.dispose()
    up = alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    read_engine = create_engine(url)
    writer_engine = create_engine(url, writer=True)
    store = EventStore(read_engine)
    try:
        await check_migrated(read_engine)
        before = await store.read_all()
        assert [(e.position, e.stream, e.version, e.command_id) for e in before] == [
            (1, "user-ann", 1, None), (2, "user-ann", 2, None), (3, "user-ann", 3, None)
        ]
        assert before[0].event == UserLoggedIn(name="ann", session="s1", node="n")
        assert before[1].event == UserJoined(name="ann")
        assert before[2].event == MessagePosted(sender="ann", message='h\u00e9 \\ "q"')
        async with writer_engine.begin() as conn:
            new = await store.append(conn, [NewEvent("user-ann", 4, MessagePosted(sender="ann", message="new"), "ann/1")])
        assert [(s.position, s.command_id) for s in new] == [(4, "ann/1")]
        assert [e.command_id for e in await store.read_all()] == [None, None, None, "ann/1"]
        # 0005 put the old joins and chats in the lobby's conversation, as
        # new code derives it: the lobby's history reads them by scope.
        lobby = await store.latest(limit=10, scope="room:lobby")
        assert [e.position for e in lobby] == [2, 3, 4]
        async with read_engine.connect() as conn:
            scopes = (await conn.execute(sa.text("SELECT scope FROM events ORDER BY position"))).scalars().all()
        assert scopes == [None, "room:lobby", "room:lobby", "room:lobby"]
    finally:
        await writer_engine.dispose()
        await read_engine.dispose()
    # Back to 0002 and up again: the old events are untouched both ways.
    for args in (("downgrade", "0002"), ("upgrade", "head")):
        result = alembic(url, *args)
        assert result.returncode == 0, result.stderr
    engine = create_engine(url)
    try:
        assert [(e.position, e.event) for e in await EventStore(engine).read_all()][:3] == [
            (e.position, e.event) for e in before
        ]
    finally:
        await engine.dispose()


async def test_sqlite_log_from_before_command_ids_upgrades(tmp_path: Path) -> None:
    await old_log_upgrades(sqlite_url(tmp_path / "old.db"))


@pytest.mark.postgres
async def test_postgres_log_from_before_command_ids_upgrades(postgres: Postgres) -> None:
    await old_log_upgrades(postgres.create_database("migrations_old_log"))
