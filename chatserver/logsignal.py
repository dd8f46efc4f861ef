"""The signal that the shared log grew, between processes on one PostgreSQL.

Each append transaction sends ``NOTIFY chat_log, '<head>'`` (PostgreSQL
delivers it at commit, never for a rollback), and each process listens on
a connection of its own. A signal only says "the log has grown to N": every
process then reads the log itself, so a lost signal (the listening
connection dropped, the database restarted) delays delivery until the next
poll, and never loses or reorders anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .database import driver_connection
from .events import StoredEvent
from .store import pg_read_after

log = logging.getLogger(__name__)

CHANNEL = "chat_log"
RECONNECT_FIRST = 0.2  # seconds; doubles up to
RECONNECT_MAX = 5.0

_NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"


def notifier(sender: Callable[[], str]) -> Callable[[AsyncConnection, list[StoredEvent]], Awaitable[None]]:
    """The in-transaction hook that signals ``'<head> <sender>'``: a process
    skips its own signals (its commits reach its delivery directly)."""

    async def notify(conn: AsyncConnection, stored: list[StoredEvent]) -> None:
        if stored:
            # On asyncpg's own connection, in the append's transaction.
            await driver_connection(conn).execute(_NOTIFY, f"{stored[-1].position} {sender()}")

    return notify


def asyncpg_dsn(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class LogListener:
    """Listens for ``chat_log`` notifications and calls ``on_signal(head,
    sender)``; after every (re)connection it calls ``on_signal(0, "")`` so the
    follower reads whatever it may have missed meanwhile."""

    def __init__(self, url: sa.URL, on_signal: Callable[[int, str], None]) -> None:
        self.dsn = asyncpg_dsn(url)
        self.on_signal = on_signal
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def read_after(self, after: int, limit: int) -> list[StoredEvent] | None:
        """Events after ``after`` read on the listening connection (cheaper
        than a pooled SQLAlchemy read); None while it is not connected."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return None
        return await pg_read_after(conn, after, limit)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        head, _sep, sender = payload.partition(" ")
        try:
            self.on_signal(int(head), sender)
        except ValueError:
            self.on_signal(0, "")

    async def _run(self) -> None:
        delay = RECONNECT_FIRST
        failing = False
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(CHANNEL, self._notified)
                self._conn = conn
                if failing:
                    log.info("listening for log signals again")
                failing = False
                delay = RECONNECT_FIRST
                self.connected.set()
                self.on_signal(0, "")
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("cannot listen for log signals (%s); polling the log until it is back", exc)
                failing = True
            finally:
                self.connected.clear()
                self._conn = None
                if conn is not None:
                    conn.terminate()
            if not failing:
                log.warning("the log signal connection was lost; reconnecting")
                failing = True
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX, delay * 2)
