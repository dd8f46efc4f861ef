"""``/healthz`` (the process and its event loop answer) and ``/readyz`` (this
process can serve chats: the database answers, its schema is at head, the
writer and the dispatcher run).

The head revision is read from ``migrations/versions`` once, when the app is
built, by reading the files' ``revision``/``down_revision`` lines: alembic
itself is never imported at run time, and a new migration needs no change
here.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web

from .config import PROJECT_ROOT
from .metrics import STATS

if TYPE_CHECKING:
    from .service import ChatService
    from .store import EventStore

MIGRATIONS_DIR = PROJECT_ROOT / "migrations" / "versions"
# A probe that takes longer than this means "not ready": a load balancer must
# not hang on a database that stopped answering.
DATABASE_TIMEOUT = 2.0

_ASSIGNMENT = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE)
_QUOTED = re.compile(r"""["']([^"']+)["']""")


class MigrationsUnreadable(Exception):
    """The migrations folder has no single head."""


def head_revision(folder: Path = MIGRATIONS_DIR) -> str:
    """The one revision no other revision names as its ``down_revision``."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted(folder.glob("*.py")):
        found = dict(_ASSIGNMENT.findall(path.read_text(encoding="utf-8")))
        if "revision" not in found:
            continue
        revision = _QUOTED.findall(found["revision"])
        if len(revision) != 1:
            continue
        revisions.add(revision[0])
        parents.update(_QUOTED.findall(found.get("down_revision", "")))
    heads = revisions - parents
    if len(heads) != 1:
        raise MigrationsUnreadable(f"{folder} has {len(heads)} head revisions: {sorted(heads)}")
    return heads.pop()


async def schema_revision(engine: Any, timeout: float = DATABASE_TIMEOUT) -> str | None:
    """The database's alembic revision (this query is also the "it answers" probe)."""

    async def query() -> str | None:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar()

    return await asyncio.wait_for(query(), timeout)


def _task_running(owner: object) -> bool:
    # The writer and the delivery keep their task private; a finished or
    # missing task is exactly what readiness must catch.
    task = getattr(owner, "_task", None)
    return isinstance(task, asyncio.Task) and not task.done()


@dataclass
class Readiness:
    head: str | None
    head_problem: str | None
    service: Callable[[], ChatService | None]
    store: Callable[[], EventStore | None]
    stopping: bool = False

    async def check(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        problems: list[str] = []
        service, store = self.service(), self.store()
        if self.stopping:
            problems.append("the server is shutting down")
        if service is None or store is None:
            problems.append("the service has not started")
        else:
            try:
                revision = await schema_revision(store.engine)
            except TimeoutError:
                STATS.database_errors += 1
                checks["database"] = "timeout"
                problems.append(f"the database did not answer within {DATABASE_TIMEOUT:g} s")
            except Exception as exc:  # any driver error means "not ready", with the reason
                STATS.database_errors += 1
                checks["database"] = "error"
                problems.append(f"the database failed: {type(exc).__name__}: {_one_line(exc)}")
            else:
                checks["database"] = "ok"
                checks["schema"] = revision
                if self.head is None:
                    problems.append(f"the schema's head revision is unknown: {self.head_problem}")
                elif revision != self.head:
                    problems.append(f"the schema is at revision {revision}, not {self.head}: run `alembic upgrade head`")
            checks["writer"] = "running" if _task_running(service.writer) else "stopped"
            checks["dispatcher"] = "running" if _task_running(service.delivery) else "stopped"
            for part in ("writer", "dispatcher"):
                if checks[part] != "running":
                    problems.append(f"the {part} is not running")
            lease = service.lease
            if lease is not None:
                # Several processes on one log: serving needs a live lease.
                checks["lease"] = "fenced" if lease.fenced else "held"
                if lease.fenced:
                    problems.append("this process's node lease lapsed: it is not serving until it holds one again")
        checks["head"] = self.head
        body: dict[str, Any] = {"status": "ready" if not problems else "not ready", "checks": checks}
        if problems:
            body["reasons"] = problems
        return not problems, body


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def setup_health(app: web.Application, readiness: Readiness) -> None:
    started = time.monotonic()

    async def healthz(_request: web.Request) -> web.Response:
        # Answering at all is the point: the loop is not blocked.
        return web.json_response({"status": "ok", "uptime": round(time.monotonic() - started, 3)})

    # Requests that arrive while a check runs share it, so a client
    # hammering /readyz costs the database one query at a time, not one each.
    running: asyncio.Task[tuple[bool, dict[str, Any]]] | None = None

    async def readyz(_request: web.Request) -> web.Response:
        nonlocal running
        if running is None or running.done():
            running = asyncio.ensure_future(readiness.check())
        ready, body = await asyncio.shield(running)
        return web.json_response(body, status=200 if ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def stopping(_app: web.Application) -> None:
        readiness.stopping = True

    app.on_shutdown.append(stopping)
