"""``chatserver``: serve the chat; ``chatserver rebuild-projections``: fold
the read models again from the log (safe while servers run: it holds the
log's write lock for short transactions only)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from aiohttp import web

from .config import Settings
from .database import DatabaseNotMigrated, DatabaseUnavailable, check_migrated, create_engine


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _preflight(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        await check_migrated(engine)
    finally:
        await engine.dispose()


def _millis(held: list[float]) -> str:
    ordered = sorted(held)
    if not ordered:
        return "never"
    return (
        f"{ordered[len(ordered) // 2] * 1000:.1f} ms (median), "
        f"{ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000:.1f} ms (p99), "
        f"{ordered[-1] * 1000:.1f} ms (longest)"
    )


async def _rebuild(settings: Settings) -> int:
    from . import projections
    from .store import EventStore

    await _preflight(settings)
    read_engine = create_engine(settings.database_url)
    writer_engine = create_engine(settings.database_url, writer=True)
    stats = projections.FoldStats()
    started = time.monotonic()
    try:
        view = await projections.rebuild(EventStore(read_engine), writer_engine, stats)
    finally:
        await writer_engine.dispose()
        await read_engine.dispose()
    print(
        f"projections rebuilt at position {view.position}: {len(view)} online, "
        f"{stats.resume_tokens} resume tokens\n"
        f"{time.monotonic() - started:.2f} s: folded {stats.events} events and compared the tables "
        f"without the write lock, then rewrote {stats.online_written} online_users and "
        f"{stats.grants_written} resume_tokens rows in {stats.transactions} short write "
        f"transaction(s) holding the write lock {_millis(stats.held)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatserver",
        description="Event-sourced Socket.IO chat server. Settings come from the "
        "environment: HOST, PORT, CHAT_DATABASE_URL (default sqlite+aiosqlite:///chat.db).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "rebuild-projections"],
        help="serve (default), or rebuild-projections: refold online_users and resume_tokens "
        "from position 0 and rewrite the rows that differ (safe while servers run)",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        if args.command == "rebuild-projections":
            return loop.run_until_complete(_rebuild(settings))
        loop.run_until_complete(_preflight(settings))
    except (DatabaseNotMigrated, DatabaseUnavailable) as exc:
        print(f"chatserver: {exc}", file=sys.stderr)
        return 2
    from .app import create_app
    from .web import AccessLogger

    print(f"chatserver on http://{settings.host}:{settings.port} ({settings.database_url})", flush=True)
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            loop=loop,
            print=None,
            access_log_class=AccessLogger,
        )
    except OSError as exc:
        print(f"chatserver: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
