"""HTTP: the browser client in ``public/``, its libraries from ``node_modules``,
and ``index.html`` for any other GET path (as the seed's server did)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .config import Settings

SOCKET_IO_PATH = "/socket.io/"
# Probes and scrapes come every few seconds and say nothing about users.
QUIET_PATHS = frozenset({SOCKET_IO_PATH, "/healthz", "/readyz", "/metrics"})

# URL prefix -> folder inside node_modules. Only these are served.
VENDOR: dict[str, str] = {
    "jquery": "jquery/dist",
    "underscore": "underscore",
    "backbone": "backbone",
    "bootstrap": "bootstrap/dist",
}

SOCKET_IO_CLIENT = "socket.io-client/dist"


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it is a file inside ``root`` (no escaping with ..)."""
    try:
        root = root.resolve()
        candidate = (root / relative).resolve()
    except (OSError, ValueError):
        return None
    if candidate.is_relative_to(root) and candidate.is_file():
        return candidate
    return None


def setup_routes(app: web.Application, settings: Settings) -> None:
    """The client's routes, ending with the index fallback: anything else
    (/healthz, /readyz, /metrics) must be registered before this."""
    node_modules = settings.node_modules_dir
    public = settings.public_dir

    async def socket_io_client(request: web.Request) -> web.StreamResponse:
        path = _inside(node_modules / SOCKET_IO_CLIENT, request.match_info["file"])
        if path is None:
            raise web.HTTPServiceUnavailable(
                text="the Socket.IO client is not installed: run `npm ci` in the project folder\n"
            )
        return web.FileResponse(path)

    async def vendor(request: web.Request) -> web.StreamResponse:
        folder = VENDOR.get(request.match_info["package"])
        path = _inside(node_modules / folder, request.match_info["file"]) if folder else None
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def public_or_index(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        path = _inside(public, tail) if tail else None
        if path is None:
            path = _inside(public, "index.html")
        if path is None:
            raise web.HTTPNotFound(text="public/index.html is missing\n")
        return web.FileResponse(path)

    app.router.add_get(
        r"/socket.io/{file:socket\.io(\.min)?\.js(\.map)?}", socket_io_client
    )
    app.router.add_get("/vendor/{package}/{file:.+}", vendor)
    app.router.add_get("/{tail:.*}", public_or_index)


class AccessLogger(web.AccessLogger):
    """aiohttp's access log, without Socket.IO's transport requests: one line
    per WebSocket or long-poll request says nothing the service's own log
    does not, and formatting it was ~6% of the server's time under churn."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in QUIET_PATHS:  # the Engine.IO endpoint, not the client's .js; probes
            return
        if "token" in request.query:
            # An upload token in a file's URL (an <img src>) is a credential:
            # it stays out of the log.
            request = _TokenRedacted(request)  # type: ignore[assignment]
        super().log(request, response, time)


class _TokenRedacted:
    """A request as the access log sees it, its ``token`` parameter hidden."""

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    def __getattr__(self, name: str) -> object:
        return getattr(self._request, name)

    @property
    def path_qs(self) -> str:
        return str(self._request.rel_url.update_query(token="redacted"))
