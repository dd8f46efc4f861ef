"""Projections: the live view, the persisted tables and a rebuild from
position 0 agree; a rebuild while a server appends stalls no append for long
and loses none; a projection that is behind folds forward from its position."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatserver import projections, rooms
from chatserver.app import SERVICE
from chatserver.database import create_engine
from chatserver.events import MessagePosted, StoredEvent, UserJoined, UserLeft, UserLoggedIn, to_payload
from chatserver.projections import OnlineUsers, RecentHistory
from chatserver.store import EventStore, events_table
from tests.support import ROOT, Client, log_of, running_server, settings_for


def stored(position: int, event: object, version: int = 1) -> StoredEvent:
    return StoredEvent(position, "user-x", version, event, datetime.now(UTC))  # type: ignore[arg-type]


def test_online_users_folds_in_join_order() -> None:
    view = OnlineUsers()
    view.apply_all(
        [
            stored(1, UserLoggedIn(name="bob", session="s1", node="n")),
            stored(2, UserJoined(name="bob")),
            stored(3, UserLoggedIn(name="amy", session="s2", node="n")),
            stored(4, UserJoined(name="amy")),
            stored(5, MessagePosted(sender="amy", message="hi")),
            stored(6, UserLeft(name="bob", reason="disconnected")),
            stored(7, UserLoggedIn(name="bob", session="s3", node="n")),
            stored(8, UserJoined(name="bob")),
        ]
    )
    assert view.names() == ["amy", "bob"]
    assert view.position == 8
    assert view.get("bob").session == "s3"  # type: ignore[union-attr]


def test_recent_history_keeps_the_last_visible_events() -> None:
    recent = RecentHistory(3)
    recent.apply_all(
        [
            stored(1, UserLoggedIn(name="bob", session="s1", node="n")),
            stored(2, UserJoined(name="bob")),
            stored(3, MessagePosted(sender="bob", message="a")),
            stored(4, MessagePosted(sender="bob", message="b")),
            stored(5, MessagePosted(sender="bob", message="c")),
        ]
    )
    assert [e.position for e in recent.last(10)] == [3, 4, 5]
    assert [e.position for e in recent.last(10, before=5)] == [3, 4]


async def grants(engine: AsyncEngine) -> list[tuple]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(projections.resume_tokens_table).order_by("name"))
        return [tuple(r) for r in rows]


async def room_tables(engine: AsyncEngine) -> dict[str, list[tuple]]:
    out = {}
    async with engine.connect() as conn:
        for table in rooms.KEYED_TABLES:
            rows = await conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            out[table.name] = [tuple(r) for r in rows]
    return out


async def test_rebuild_equals_the_live_projection(db_url: str) -> None:
    async with running_server(settings_for(db_url)) as srv:
        clients = [await Client(srv.url).connect() for _ in range(5)]
        for i, c in enumerate(clients):
            await c.login(f"user{i}")
            await c.call("chat", f"hello from {i}")
        # Rooms, memberships, private conversations and read markers too.
        assert (await clients[0].call("createRoom", {"room": "Dev", "topic": "t"}))["ok"]
        assert (await clients[0].call("createRoom", {"room": "ops"}))["ok"]
        for c in clients[1:4]:
            assert (await c.call("joinRoom", {"room": "dev"}))["ok"]
        assert (await clients[2].call("leaveRoom", {"room": "dev"}))["ok"]
        assert (await clients[3].call("joinRoom", {"room": "OPS"}))["ok"]
        assert (await clients[1].call("chat", "in dev", {"room": "dev"}))["ok"]
        pm = await clients[4].call("chat", "psst", {"to": "user0"})
        assert (await clients[2].call("chat", "hey", {"to": "user0"}))["ok"]
        assert (await clients[0].call("markRead", {"with": "user4", "position": pm["position"]}))["ok"]
        assert (await clients[3].call("markRead", {"room": "dev", "position": pm["position"]}))["ok"]
        await clients[1].disconnect()
        await clients[3].disconnect()
        await clients[0].wait_for(lambda: len(clients[0].events("userLeft")) == 2)
        service = srv.app[SERVICE]
        live_names = service.online.names()
        live_position = service.online.position
        live_rooms = service.delivery.rooms
        engine = create_engine(db_url)
        writer = create_engine(db_url, writer=True)
        try:
            persisted = await projections.load(engine)
            grants_live = await grants(engine)
            tables_live = await room_tables(engine)
            folded = await projections.fold(EventStore(engine))
            # Wipe the rooms' tables: a rebuild must write them all back.
            async with writer.begin() as conn:
                for table in rooms.KEYED_TABLES:
                    await conn.execute(table.delete())
            rebuilt = await projections.rebuild(EventStore(engine), writer)
            reloaded = await projections.load(engine)
            rooms_reloaded = await rooms.load(engine)
            assert await grants(engine) == grants_live
            assert await room_tables(engine) == tables_live
            assert len(grants_live) == 5
        finally:
            await engine.dispose()
            await writer.dispose()
        assert live_names == ["user0", "user2", "user4"]
        for view in (persisted, folded, rebuilt, reloaded):
            assert view.names() == live_names
            assert view.users() == persisted.users()
            assert view.position == live_position
        assert rooms_reloaded.rooms == live_rooms.rooms
        assert rooms_reloaded.memberships == live_rooms.memberships == {
            "user0": {"dev", "ops"},
            "user1": {"dev"},
            "user3": {"dev", "ops"},
        }
        assert rooms_reloaded.talkers == live_rooms.talkers == {"user0", "user2", "user4"}
        assert len(tables_live["read_markers"]) == 2 and len(tables_live["conversations"]) == 4
        for c in (clients[0], clients[2], clients[4]):
            await c.disconnect()


def test_rebuild_command(db_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatserver", "rebuild-projections"],
        cwd=ROOT,
        env={"CHAT_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilt at position 0: 0 online" in result.stdout


# -- folding forward while a server appends -----------------------------------

SEED_TIME = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class SeededLog:
    rows: list[dict[str, Any]]
    versions: dict[str, int]  # stream -> its last version
    sessions: dict[str, int]  # online name -> chats left in its session

    @property
    def online(self) -> list[str]:
        return sorted(self.sessions)

    @property
    def offline(self) -> list[str]:
        """Names whose last session ended with a leave."""
        return sorted({stream[5:] for stream in self.versions} - set(self.sessions))


def seeded_log(count: int, names: int, after: SeededLog | None = None) -> SeededLog:
    """A realistic log of ``count`` (or one more) events, going on from ``after``:
    sessions of a login (with a resume hash), a join, a few chats and a
    leave, by ``names`` users; the sessions still running at the end stay
    online (on a node no test server is)."""
    rng = random.Random(count + len(after.rows) if after else count)
    start = after.rows[-1]["position"] + 1 if after else 1
    versions = dict(after.versions) if after else {}
    online = dict(after.sessions) if after else {}
    rows: list[dict[str, Any]] = []

    def add(name: str, event: Any) -> None:
        stream = f"user-{name}"
        versions[stream] = versions.get(stream, 0) + 1
        position = start + len(rows)
        rows.append(
            {
                "position": position,
                "stream": stream,
                "version": versions[stream],
                "type": event.type,
                "payload": to_payload(event),
                "recorded_at": SEED_TIME + timedelta(milliseconds=position),
            }
        )

    while len(rows) < count:
        name = f"u{rng.randrange(names):05d}"
        left = online.get(name)
        if left is None:
            add(name, UserLoggedIn(name=name, session=uuid.uuid4().hex, node="seed", resume_hash=rng.randbytes(32).hex()))
            add(name, UserJoined(name=name))
            online[name] = rng.randrange(6)
        elif left == 0:
            add(name, UserLeft(name=name, reason="disconnected"))
            del online[name]
        else:
            add(name, MessagePosted(sender=name, message=f"message {len(rows)}"))
            online[name] = left - 1
    return SeededLog(rows, versions, online)


def sqlite_path(db_url: str) -> str:
    return db_url.removeprefix("sqlite+aiosqlite:///")


def seed_sqlite(db_url: str, log: SeededLog, position: int | None) -> None:
    """Write ``log`` straight into the file, as another tool would; with
    ``position``, also claim the projection is at that position."""
    with contextlib.closing(sqlite3.connect(sqlite_path(db_url))) as db, db:
        db.executemany(
            "INSERT INTO events (position, stream, version, type, payload, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    r["position"],
                    r["stream"],
                    r["version"],
                    r["type"],
                    json.dumps(r["payload"]),
                    r["recorded_at"].strftime("%Y-%m-%d %H:%M:%S.%f"),
                )
                for r in log.rows
            ],
        )
        if position is not None:
            db.execute("DELETE FROM projection_positions")
            db.execute("INSERT INTO projection_positions VALUES ('online_users', ?)", (position,))


async def seed_postgres(db_url: str, log: SeededLog, position: int | None) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            for i in range(0, len(log.rows), 5000):
                await conn.execute(events_table.insert(), log.rows[i : i + 5000])
            if position is not None:
                await conn.execute(projections.projection_positions_table.delete())
                await conn.execute(
                    projections.projection_positions_table.insert(), {"name": "online_users", "position": position}
                )
    finally:
        await engine.dispose()


def expected_tables(log: list[StoredEvent]) -> tuple[list[tuple], list[tuple]]:
    """online_users and resume_tokens as the log decides them, folded here
    independently of projections.py."""
    logins: dict[str, StoredEvent] = {}
    online: dict[str, tuple] = {}
    for s in log:
        e = s.event
        if isinstance(e, UserLoggedIn):
            logins[e.name] = s
        elif isinstance(e, UserJoined):
            login = logins[e.name].event
            assert isinstance(login, UserLoggedIn)
            online[e.name] = (e.name, login.session, login.node, s.version, s.position)
        elif isinstance(e, UserLeft):
            online.pop(e.name, None)
    tokens = [
        (name, s.event.resume_hash, s.event.session, s.recorded_at, s.position)  # type: ignore[union-attr]
        for name, s in logins.items()
        if s.event.resume_hash  # type: ignore[union-attr]
    ]
    return sorted(online.values()), sorted(tokens)


async def table_contents(db_url: str) -> tuple[list[tuple], list[tuple], int | None]:
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            online = [tuple(r) for r in await conn.execute(sa.select(projections.online_users_table))]
            tokens = [
                (r.name, r.token_hash, r.session, r.issued_at.replace(tzinfo=UTC), r.position)
                for r in await conn.execute(sa.select(projections.resume_tokens_table))
            ]
            position = (await conn.execute(sa.select(projections.projection_positions_table.c.position))).scalar()
    finally:
        await engine.dispose()
    return sorted(online), sorted(tokens), position


async def assert_tables_match_log(db_url: str) -> None:
    log = await log_of(db_url)
    online, tokens, position = await table_contents(db_url)
    want_online, want_tokens = expected_tables(log)
    assert online == want_online
    assert tokens == want_tokens
    assert position == log[-1].position


GARBAGE_TOKEN = {
    "name": "nobody",
    "token_hash": "ff" * 32,
    "session": "s",
    "issued_at": datetime(2026, 1, 1, tzinfo=UTC),
    "position": 1,
}


async def damage_projections(db_url: str, log: SeededLog) -> None:
    """What a rebuild is for: rows missing, stale and made up."""
    resume_tokens = projections.resume_tokens_table
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(resume_tokens.delete())
            await conn.execute(projections.online_users_table.delete())
            await conn.execute(resume_tokens.insert(), GARBAGE_TOKEN)
            await conn.execute(resume_tokens.insert(), {**GARBAGE_TOKEN, "name": log.offline[0], "token_hash": "ee" * 32})
            # Real hashes under wrong names: writing the right rows must not
            # trip over the unique index, in whichever order the names come.
            latest = {r["payload"]["name"]: r["payload"]["resume_hash"] for r in log.rows if r["type"] == "UserLoggedIn"}
            await conn.execute(
                resume_tokens.insert(),
                [
                    {**GARBAGE_TOKEN, "name": f"misfiled{i}", "token_hash": token_hash}
                    for i, token_hash in enumerate(list(latest.values())[:50])
                ],
            )
            await conn.execute(
                projections.online_users_table.insert(),
                {"name": log.offline[1], "session": "s", "node": "n", "version": 1, "joined_position": 1},
            )
    finally:
        await engine.dispose()


class Appenders:
    """Real clients appending while a rebuild runs: one chats with acks in
    a loop, one logs seeded (offline) names and fresh names in and out, so
    the rebuild's rows and the appends' rows meet. Records every ack's time."""

    def __init__(self, url: str, names: list[str]) -> None:
        self.url = url
        self.names = names
        self.stop = asyncio.Event()
        self.acks: list[tuple[float, float]] = []  # (when, seconds taken)
        self.failures: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _timed(self, client: Client, event: str, arg: Any) -> Any:
        started = time.monotonic()
        ack = await client.call(event, arg, timeout=30)
        self.acks.append((started, time.monotonic() - started))
        if not (isinstance(ack, dict) and ack.get("ok")):
            self.failures.append((event, arg, ack))
        return ack

    async def _chat(self) -> None:
        client = await Client(self.url).connect()
        await client.login("chatter")
        i = 0
        while not self.stop.is_set():
            await self._timed(client, "chat", f"line {i}")
            i += 1
            await asyncio.sleep(0.005)
        await client.disconnect()

    async def _cycle(self) -> None:
        i = 0
        while not self.stop.is_set():
            client = await Client(self.url).connect()
            name = self.names[i % len(self.names)] if i % 2 == 0 else f"fresh{i}"
            await self._timed(client, "login", name)
            await client.disconnect()
            i += 1
            # The leave commits after the disconnect returns; the name comes
            # back only after every other name has had a turn.
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Appenders:
        self._tasks = [asyncio.create_task(self._chat()), asyncio.create_task(self._cycle())]
        while len(self.acks) < 10:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)


async def run_rebuild_command(db_url: str) -> tuple[int, str, str, float, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatserver",
        "rebuild-projections",
        cwd=ROOT,
        env={"CHAT_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), started, time.monotonic()


def assert_no_server_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# A correctness bound, not a speed figure: the old rebuild held the write
# lock while it folded the whole log, and every append waited that long.
ACK_BOUND = 1.0


async def rebuild_while_appending(db_url: str, log: SeededLog, caplog: pytest.LogCaptureFixture) -> str:
    caplog.set_level(logging.WARNING)
    async with running_server(settings_for(db_url, rate_per_second=10_000, rate_burst=10_000)) as srv:
        async with Appenders(srv.url, log.offline[2:40]) as appenders:
            code, out, err, started, ended = await run_rebuild_command(db_url)
        during = [took for when, took in appenders.acks if started <= when <= ended]
    assert code == 0, err
    assert not appenders.failures
    assert len(during) > 20, "the appends did not overlap the rebuild"
    assert max(took for _, took in appenders.acks) < ACK_BOUND
    assert_no_server_errors(caplog)
    await assert_tables_match_log(db_url)
    return out


async def test_rebuild_while_the_server_appends_stalls_no_append(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = seeded_log(80_000, names=3_000)
    seed_sqlite(db_url, log, position=log.rows[-1]["position"])
    await damage_projections(db_url, log)
    out = await rebuild_while_appending(db_url, log, caplog)
    # The missing tokens were written in many short transactions, not one.
    transactions = int(re.search(r"in (\d+) short write", out).group(1))  # type: ignore[union-attr]
    assert transactions > 5, out


@pytest.mark.postgres
async def test_rebuild_on_postgres_while_the_server_appends(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    log = seeded_log(80_000, names=3_000)
    await seed_postgres(pg_url, log, position=log.rows[-1]["position"])
    await damage_projections(pg_url, log)
    await rebuild_while_appending(pg_url, log, caplog)


# -- catching up at startup ----------------------------------------------------


async def test_catch_up_folds_forward_from_the_views_position(db_url: str) -> None:
    first = seeded_log(20_000, names=2_000)
    seed_sqlite(db_url, first, position=None)
    engine = create_engine(db_url)
    writer = create_engine(db_url, writer=True)
    try:
        store = EventStore(engine)
        await projections.rebuild(store, writer)
        await assert_tables_match_log(db_url)
        # A row only a fold from 0 would remove: it shows what was refolded.
        async with writer.begin() as conn:
            await conn.execute(projections.resume_tokens_table.insert(), GARBAGE_TOKEN)
        # Another tool appends without maintaining the projections.
        second = seeded_log(12_000, names=2_000, after=first)
        seed_sqlite(db_url, second, position=None)
        view = await projections.load(engine)
        assert view.position == first.rows[-1]["position"]
        stats = projections.FoldStats()
        caught_up = await projections.catch_up(store, writer, view, stats)
        reloaded = await projections.load(engine)
    finally:
        await engine.dispose()
        await writer.dispose()
    assert stats.events == len(second.rows)  # read from the view's position only
    assert stats.transactions > 1  # in short transactions, not one long one
    log = await log_of(db_url)
    want_online, want_tokens = expected_tables(log)
    online, tokens, position = await table_contents(db_url)
    assert position == log[-1].position == caught_up.position == reloaded.position
    assert online == want_online
    garbage = tuple(GARBAGE_TOKEN.values())
    assert tokens == sorted([*want_tokens, garbage])
    assert sorted(caught_up.names()) == sorted(reloaded.names()) == [row[0] for row in want_online]
    assert caught_up.users() == reloaded.users()


async def test_a_server_starts_on_a_log_its_projection_is_behind(db_url: str) -> None:
    first = seeded_log(5_000, names=500)
    seed_sqlite(db_url, first, position=None)
    async with running_server(settings_for(db_url)) as srv:
        pass
    await assert_tables_match_log(db_url)
    second = seeded_log(5_000, names=500, after=first)
    seed_sqlite(db_url, second, position=None)
    async with running_server(settings_for(db_url)) as srv:
        service = srv.app[SERVICE]
        assert service.online.position == second.rows[-1]["position"]
        assert service.online.names() == [u.name for u in (await projections.load(service.store.engine)).users()]
        assert sorted(service.online.names()) == second.online
        client = await Client(srv.url).connect()
        await client.login(second.offline[0])
        await client.disconnect()
    await assert_tables_match_log(db_url)
