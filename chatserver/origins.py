"""Which web pages may open a Socket.IO connection: the server's own origin,
plus those listed in ``CHAT_ALLOWED_ORIGINS``.

python-engineio checks the ``Origin`` header of every request that has one
(browsers send it with WebSocket handshakes and cross-origin requests) and
answers 400 to an origin it does not accept; a request without the header (a
non-browser client) is not checked. Its own default (``cors_allowed_origins``
None) accepts only the request's own ``scheme://Host``; a list replaces that
default, which would lock out the pages this server serves itself, and an
empty list turns the check off altogether. So the policy is a callable: the
same origin as engine.io computes it, or one of the listed origins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def same_origins(environ: Mapping[str, Any]) -> list[str]:
    """The origins engine.io's default treats as the request's own."""
    host = environ.get("HTTP_HOST")
    if not host:
        return []
    scheme = environ.get("wsgi.url_scheme", "http")
    origins = [f"{scheme}://{host}"]
    if "HTTP_X_FORWARDED_PROTO" in environ or "HTTP_X_FORWARDED_HOST" in environ:
        fwd_scheme = environ.get("HTTP_X_FORWARDED_PROTO", scheme).split(",")[0].strip()
        fwd_host = environ.get("HTTP_X_FORWARDED_HOST", host).split(",")[0].strip()
        origins.append(f"{fwd_scheme}://{fwd_host}")
    return origins


class OriginPolicy:
    """``cors_allowed_origins`` for python-engineio: called with the
    ``Origin`` of a request and its environ, true when the page may connect."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(allowed)
        self.any = "*" in self.allowed

    def __call__(self, origin: str | None, environ: Mapping[str, Any]) -> bool:
        if origin is None or self.any or origin in self.allowed:
            return True
        return origin in same_origins(environ)

    def __repr__(self) -> str:
        return f"OriginPolicy(same origin + {sorted(self.allowed)})"
