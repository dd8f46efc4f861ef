"""Logging set-up (CHAT_LOG_FORMAT text|json, CHAT_LOG_LEVEL) and the
throttle for problems clients cause.

JSON lines carry ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``,
``node``, whatever fields the call passed with ``extra=`` (``sid``, ``name``,
``position``, ``kind``, ``count``...), and ``exc`` with the traceback when
there is one. Text lines put the same fields after the message as
``key=value``.

A hostile or broken client can cause a problem per frame; one log line per
frame would let it fill the disk and drown everything else. ``client_problem``
counts every occurrence (``chat_client_problems_total``) and logs a kind at
most once a second, saying how many were not logged since.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from .metrics import STATS

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

log = logging.getLogger("chatserver.clients")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            # ``name`` is the LogRecord's logger name, so callers pass a
            # user's name as ``user``; the line calls it ``name``.
            entry.setdefault("name" if key == "user" else key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if record.name == "aiohttp.access":  # its fields are its message already
            return line
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items() if k != "node")
        return f"{line} [{extra}]" if extra else line


class _NodeFilter(logging.Filter):
    """Every line says which server process wrote it (several may share a log
    collector)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = self.node
        return True


def configure(log_format: str = "text", level: str = "INFO", node: str = "local", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one on stderr in ``log_format``."""
    if log_format not in FORMATS:
        raise ValueError(f"CHAT_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {log_format!r}")
    if level.upper() not in LEVELS:
        raise ValueError(f"CHAT_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_NodeFilter(node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class Throttle:
    """Whether a line of some kind may be logged now: at most one per
    ``interval`` seconds, counting the ones held back in between."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, kind: Hashable) -> int | None:
        """None: hold this one back; otherwise how many were held back since
        the last line of this kind."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


class ProblemThrottle:
    """At most one line per kind per ``interval`` seconds; every occurrence counted."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self._throttle = Throttle(interval)

    def report(self, kind: str, message: str, *args: Any, **fields: Any) -> None:
        counts = STATS.client_problems
        counts[kind] = counts.get(kind, 0) + 1
        unlogged = self._throttle.allow(kind)
        if unlogged is None:
            return
        if unlogged:
            message += " (%d more of this kind since the last line)"
            args = (*args, unlogged)
        self.logger.warning(message, *args, extra={"kind": kind, "unlogged": unlogged, **fields})


_throttle = ProblemThrottle(log)


def client_problem(kind: str, message: str, *args: Any, **fields: Any) -> None:
    """Count a problem a client caused and log it unless this kind was logged
    less than a second ago."""
    _throttle.report(kind, message, *args, **fields)
