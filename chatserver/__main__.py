"""``chatserver``: serve the chat; ``chatserver rebuild-projections``: fold
the read models again from the log (safe while servers run: it holds the
log's write lock for short transactions only)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
import threading
import time
from functools import partial

from aiohttp import web

from .config import Settings
from .database import DatabaseNotMigrated, DatabaseUnavailable, check_migrated, create_engine
from .logs import configure as configure_logging


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


async def _bound_shutdown(timeout: float, _app: web.Application) -> None:
    """SIGTERM or SIGINT: the listener is closed, the graceful stop begins.
    Whatever it waits on (a database that stopped answering, a client that
    does not close), the process is gone ``timeout`` seconds from now: an
    orchestrator's own kill would come without the leaves' last chance, and a
    stop that hangs blocks the next deploy. Sessions a forced exit leaves open
    are closed as "server restart" when this node starts again."""

    def exit_now() -> None:
        logging.getLogger("chatserver").error(
            "graceful stop took longer than CHAT_SHUTDOWN_TIMEOUT=%g s; exiting now", timeout
        )
        logging.shutdown()
        os._exit(1)

    logging.getLogger("chatserver").info("stopping (at most %g s)", timeout)
    timer = threading.Timer(timeout, exit_now)
    timer.daemon = True
    timer.start()


async def _make_admin(settings: Settings, name: str) -> int:
    from .accounts import Accounts
    from .domain import NameBad, check_name

    await _preflight(settings)
    try:
        name = check_name(name)
    except NameBad as exc:
        print(f"chatserver: {exc.message}", file=sys.stderr)
        return 1
    engine = create_engine(settings.database_url, writer=True)
    try:
        found = await Accounts(settings, engine).make_admin(name)
    finally:
        await engine.dispose()
    if not found:
        print(f"chatserver: there is no account {name!r}", file=sys.stderr)
        return 1
    print(f"{name} is an admin")
    return 0


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """CHAT_TLS_CERT/CHAT_TLS_KEY: HTTPS and WSS on the same port (the
    default server context: TLS 1.2 and later, the system's ciphers)."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


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
        choices=["serve", "rebuild-projections", "check", "make-admin"],
        help="serve (default); rebuild-projections: refold online_users and resume_tokens "
        "from position 0 and rewrite the rows that differ (safe while servers run); "
        "check: validate the settings and the database; make-admin NAME: make an "
        "account an admin (accounts mode)",
    )
    parser.add_argument("name", nargs="?", help="the account, for make-admin")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.command == "check":
        from .check import run

        return run(settings)
    from .check import validate

    # The same rules as `chatserver check`: a bad setting stops the start with
    # its name, not with a traceback from deep inside.
    problems, _warnings = validate(settings)
    if problems:
        for problem in problems:
            print(f"chatserver: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, settings.node_name)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        if args.command == "rebuild-projections":
            return loop.run_until_complete(_rebuild(settings))
        if args.command == "make-admin":
            if not args.name:
                print("chatserver: make-admin needs the account's name", file=sys.stderr)
                return 2
            return loop.run_until_complete(_make_admin(settings, args.name))
        loop.run_until_complete(_preflight(settings))
    except (DatabaseNotMigrated, DatabaseUnavailable) as exc:
        print(f"chatserver: {exc}", file=sys.stderr)
        return 2
    from .app import create_app
    from .web import AccessLogger

    from .check import redacted

    try:
        ssl_context = _tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        print(f"chatserver: cannot load CHAT_TLS_CERT/CHAT_TLS_KEY: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("chatserver").info(
        "chatserver on %s://%s:%d (%s, %s mode)",
        "https" if ssl_context else "http",
        settings.host,
        settings.port,
        redacted(settings.database_url),
        settings.auth_mode,
    )
    app = create_app(settings)
    # First among the shutdown hooks: the bound covers all of them.
    app.on_shutdown.insert(0, partial(_bound_shutdown, settings.shutdown_timeout))
    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            loop=loop,
            print=None,
            ssl_context=ssl_context,
            access_log_class=AccessLogger,
            shutdown_timeout=settings.shutdown_timeout,
        )
    except OSError as exc:
        print(f"chatserver: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
