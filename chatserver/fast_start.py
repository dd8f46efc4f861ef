"""Importing the app quickly (the first HTTP answer within a second).

python-socketio's package imports its Redis managers, and they import the
``redis`` client eagerly: about a fifth of the server's start-up on this
machine, for a module only several-process mode (CHAT_REDIS_URL) uses. When
Redis is not configured, ``redis`` is hidden while socketio is imported (its
managers then record that Redis is absent, which is true for this process),
and unhidden afterwards so nothing else is affected.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from .config import Settings

_HIDDEN = ("redis",)


def import_create_app(redis_wanted: bool) -> Callable[[Settings], web.Application]:
    if redis_wanted or "socketio" in sys.modules:
        from .app import create_app

        return create_app
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # "import redis" raises ImportError
    try:
        from .app import create_app
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return create_app
