"""The application factory: ``create_app(settings)``.

Engines, the writer and the service live in ``cleanup_ctx``: created when the
app starts, closed (pending appends committed first) when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import socketio
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from .accounts import Accounts
from .auth import AUTH_KEY, AuthRoutes, Tokens, setup_auth_routes
from .config import Settings
from .moderation import Moderation
from .database import check_migrated, create_engine
from .events import StoredEvent
from .fanout import FanoutManager, FanoutPublisher, FanoutServer
from .health import MigrationsUnreadable, Readiness, head_revision, setup_health
from .metrics import STATS, AppCollector, DispatchLag, parse_setting, setup_metrics
from .origins import OriginPolicy
from .service import ChatService
from .sockets import SocketHandlers
from .store import EventStore
from .blobs import LocalBlobStore
from .uploads import UPLOADS_KEY, Uploads, setup_upload_routes
from .web import setup_routes
from .writer import EventWriter, OnCommit

SHUTDOWN_GRACE = 2.0  # seconds a closing connection gets at shutdown

SETTINGS = web.AppKey("settings", Settings)
SIO = web.AppKey("sio", socketio.AsyncServer)
STORE = web.AppKey("store", EventStore)
SERVICE = web.AppKey("service", ChatService)
WRITER_ENGINE = web.AppKey("writer_engine", AsyncEngine)
LAG = web.AppKey("dispatch_lag", DispatchLag)


def create_sio(settings: Settings) -> socketio.AsyncServer:
    # FanoutServer: engine.io sockets write WebSocket frames directly (no
    # permessage-deflate); FanoutManager: a broadcast is encoded once and
    # written to every recipient without a task each (see fanout.py).
    # Every process delivers to its own sockets from the shared log: no
    # broadcast crosses processes, so no Redis manager (see delivery.py).
    # The frame budget bounds what a socket may send before anything is
    # decoded; the origin policy keeps other sites' pages out (see
    # fanout.py and origins.py).
    return FanoutServer(
        async_mode="aiohttp",
        client_manager=FanoutManager(),
        max_http_buffer_size=settings.max_packet_bytes,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        frame_rate=settings.frame_rate,
        frame_burst=settings.frame_burst_size,
        flood_grace=settings.flood_grace_seconds,
        penalty_seconds=settings.flood_penalty_seconds,
        cors_allowed_origins=OriginPolicy(settings.allowed_origins),
        logger=False,
        engineio_logger=False,
    )


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings.from_env()
    app = web.Application()
    app[SETTINGS] = settings
    sio = create_sio(settings)
    app[SIO] = sio
    sio.attach(app)
    _setup_operations(app, settings, sio)
    setup_upload_routes(app)
    setup_auth_routes(app, settings)
    setup_routes(app, settings)  # last: it ends with the index fallback
    app.cleanup_ctx.append(_chat_ctx)
    app.on_shutdown.append(_close_connections)
    return app


def _setup_operations(app: web.Application, settings: Settings, sio: socketio.AsyncServer) -> None:
    """/healthz, /readyz and /metrics, registered before the index fallback."""
    try:
        head, head_problem = head_revision(), None
    except (OSError, MigrationsUnreadable) as exc:
        head, head_problem = None, str(exc)
    setup_health(app, Readiness(head, head_problem, service=lambda: app.get(SERVICE), store=lambda: app.get(STORE)))
    lag = app[LAG] = DispatchLag()
    collector = AppCollector(lambda: sio.eio.sockets, lambda: app.get(SERVICE), lag)
    setup_metrics(app, parse_setting(settings.metrics), settings.host, collector)


async def _close_connections(app: web.Application) -> None:
    # Open WebSockets would hold aiohttp's shutdown: record the leaves, then
    # close every engine.io connection.
    await app[SERVICE].close_sessions()
    eio = app[SIO].eio
    # engine.io's close waits for the socket's send queue to drain, which
    # never happens for a client that went away mid-shutdown (and browsers
    # ignore engine.io's close packet): give them a moment, then move on.
    closing = [asyncio.create_task(s.close(reason=eio.reason.SERVER_DISCONNECT)) for s in list(eio.sockets.values())]
    if closing:
        # A short CHAT_SHUTDOWN_TIMEOUT leaves the rest of the stop its share.
        grace = min(SHUTDOWN_GRACE, app[SETTINGS].shutdown_timeout / 4)
        _done, pending = await asyncio.wait(closing, timeout=grace)
        for task in pending:
            task.cancel()
        eio.sockets.clear()


def _counted_writer(lag: DispatchLag, *args: Any, on_commit: OnCommit | None = None, **kwargs: Any) -> EventWriter:
    # Metrics are counted once per committed batch, before delivery sees it.
    def committed(stored: list[StoredEvent]) -> None:
        STATS.batch(stored)
        lag.committed(stored)
        if on_commit is not None:
            on_commit(stored)

    return EventWriter(*args, on_commit=committed, **kwargs)


def _uploads(settings: Settings, store: EventStore, service: ChatService) -> Uploads:
    delivery = service.delivery

    def session_of(name: str) -> str | None:
        user = delivery.online.get(name)
        return user.session if user is not None else None

    def may_see(name: str, scope: str) -> bool:
        # What the live views say now: a room's current members, the two
        # parties of a private conversation (see events.scope_of).
        kind, _, rest = scope.partition(":")
        if kind == "room":
            return delivery.rooms.is_member(name, rest)
        if kind == "dm":
            return name in rest.split("\t")
        return False

    return Uploads(settings, store.engine, LocalBlobStore(settings.data_dir), session_of, may_see)


async def _chat_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sio = app[SIO]
    read_engine = create_engine(settings.database_url)
    writer_engine = create_engine(settings.database_url, writer=True)
    try:
        await check_migrated(read_engine)
        store = EventStore(read_engine)
        writer_factory = partial(_counted_writer, app[LAG], store, writer_engine, max_batch=settings.max_batch)
        publisher = FanoutPublisher(sio)
        service = ChatService(settings, store, writer_factory, publisher)
        app[LAG].applied = lambda: service.delivery.applied
        await service.start(writer_engine)
        tokens = moderation = None
        if settings.auth_mode == "accounts":
            accounts = Accounts(settings, writer_engine)
            tokens = Tokens(settings, accounts, await accounts.signing_key())
            moderation = Moderation(accounts, store, service.writer.submit)
        handlers = SocketHandlers(settings, service.commands, tokens, moderation)
        handlers.register(sio)
        if tokens is not None:
            service.moderated = handlers.moderated
            app[AUTH_KEY] = AuthRoutes(settings, tokens.accounts, tokens, service.writer.submit, handlers.revoked)
        uploads = _uploads(settings, store, service)
        service.commands.uploads = uploads
        app[UPLOADS_KEY] = uploads
        app[STORE] = store
        app[SERVICE] = service
        app[WRITER_ENGINE] = writer_engine
        background = [asyncio.create_task(uploads.run_cleanup(), name="upload cleanup")]
        if tokens is not None:
            sweep = handlers.sweep_revoked_forever(settings.revocation_sweep)
            background.append(asyncio.create_task(sweep, name="revocation sweep"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await service.stop()
    finally:
        await writer_engine.dispose()
        await read_engine.dispose()
