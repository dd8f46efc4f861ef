"""Projections: the live view, the persisted table and a rebuild from
position 0 agree."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatserver import projections
from chatserver.app import SERVICE
from chatserver.database import create_engine
from chatserver.events import MessagePosted, StoredEvent, UserJoined, UserLeft, UserLoggedIn
from chatserver.projections import OnlineUsers, RecentHistory
from chatserver.store import EventStore
from tests.support import ROOT, Client, running_server, settings_for


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


async def test_rebuild_equals_the_live_projection(db_url: str) -> None:
    async with running_server(settings_for(db_url)) as srv:
        clients = [await Client(srv.url).connect() for _ in range(5)]
        for i, c in enumerate(clients):
            await c.login(f"user{i}")
            await c.call("chat", f"hello from {i}")
        await clients[1].disconnect()
        await clients[3].disconnect()
        await clients[0].wait_for(lambda: len(clients[0].events("userLeft")) == 2)
        service = srv.app[SERVICE]
        live_names = service.online.names()
        live_position = service.online.position
        engine = create_engine(db_url)
        writer = create_engine(db_url, writer=True)
        try:
            persisted = await projections.load(engine)
            grants_live = await grants(engine)
            folded = await projections.fold(EventStore(engine))
            rebuilt = await projections.rebuild(EventStore(engine), writer)
            reloaded = await projections.load(engine)
            assert await grants(engine) == grants_live
            assert len(grants_live) == 5
        finally:
            await engine.dispose()
            await writer.dispose()
        assert live_names == ["user0", "user2", "user4"]
        for view in (persisted, folded, rebuilt, reloaded):
            assert view.names() == live_names
            assert view.users() == persisted.users()
            assert view.position == live_position
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
