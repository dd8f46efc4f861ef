"""``chatserver``: serve the chat; ``chatserver rebuild-projections``: fold
the read models again from the log."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

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


async def _rebuild(settings: Settings) -> int:
    from . import projections
    from .store import EventStore

    await _preflight(settings)
    read_engine = create_engine(settings.database_url)
    writer_engine = create_engine(settings.database_url, writer=True)
    try:
        view = await projections.rebuild(EventStore(read_engine), writer_engine)
    finally:
        await writer_engine.dispose()
        await read_engine.dispose()
    print(f"online_users rebuilt at position {view.position}: {len(view)} online")
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
        help="serve (default) or rebuild-projections",
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
