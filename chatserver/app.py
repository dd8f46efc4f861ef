"""The application factory: ``create_app(settings)``.

Engines, the writer and the service live in ``cleanup_ctx``: created when the
app starts, closed (pending appends committed first) when it stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import socketio
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import Settings
from .database import check_migrated, create_engine
from .fanout import FanoutManager, FanoutPublisher, FanoutServer
from .origins import OriginPolicy
from .service import ChatService
from .sockets import SocketHandlers, SocketIOPublisher
from .store import EventStore
from .web import setup_routes
from .writer import EventWriter

SHUTDOWN_GRACE = 2.0  # seconds a closing connection gets at shutdown

SETTINGS = web.AppKey("settings", Settings)
SIO = web.AppKey("sio", socketio.AsyncServer)
STORE = web.AppKey("store", EventStore)
SERVICE = web.AppKey("service", ChatService)
WRITER_ENGINE = web.AppKey("writer_engine", AsyncEngine)


def create_sio(settings: Settings) -> socketio.AsyncServer:
    # FanoutServer: engine.io sockets write WebSocket frames directly (no
    # permessage-deflate); FanoutManager: a broadcast is encoded once and
    # written to every recipient without a task each (see fanout.py).
    manager = (
        socketio.AsyncRedisManager(settings.redis_url) if settings.redis_url else FanoutManager()
    )
    # The frame budget bounds what a socket may send before anything is
    # decoded; the origin policy keeps other sites' pages out (see
    # fanout.py and origins.py).
    return FanoutServer(
        async_mode="aiohttp",
        client_manager=manager,
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
    setup_routes(app, settings)
    app.cleanup_ctx.append(_chat_ctx)
    app.on_shutdown.append(_close_connections)
    return app


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
        _done, pending = await asyncio.wait(closing, timeout=SHUTDOWN_GRACE)
        for task in pending:
            task.cancel()
        eio.sockets.clear()


async def _chat_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sio = app[SIO]
    read_engine = create_engine(settings.database_url)
    writer_engine = create_engine(settings.database_url, writer=True)
    try:
        await check_migrated(read_engine)
        store = EventStore(read_engine)
        writer_factory = partial(EventWriter, store, writer_engine, max_batch=settings.max_batch)
        publisher = FanoutPublisher(sio) if isinstance(sio.manager, FanoutManager) else SocketIOPublisher(sio)
        service = ChatService(settings, store, writer_factory, publisher)
        await service.start(writer_engine)
        SocketHandlers(settings, service).register(sio)
        app[STORE] = store
        app[SERVICE] = service
        app[WRITER_ENGINE] = writer_engine
        yield
        await service.stop()
    finally:
        await writer_engine.dispose()
        await read_engine.dispose()
