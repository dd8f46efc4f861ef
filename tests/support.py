"""Test support: real servers on free loopback ports, real Socket.IO clients,
migrated databases, and a real PostgreSQL 15 when a test asks for one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web

from chatserver.app import create_app
from chatserver.config import Settings
from chatserver.database import create_engine
from chatserver.events import StoredEvent
from chatserver.store import EventStore
from sqlalchemy.ext.asyncio import AsyncEngine

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `alembic` command against a database."""
    env = {**os.environ, "CHAT_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def migrate(database_url: str) -> None:
    result = alembic(database_url, "upgrade", "head")
    assert result.returncode == 0, result.stderr


_template: Path | None = None


def migrated_sqlite(directory: Path, name: str = "chat.db") -> str:
    """A freshly migrated SQLite file (copied from one migrated template)."""
    global _template
    if _template is None:
        tmp = Path(tempfile.mkdtemp(prefix="chat-template-"))
        _template = tmp / "template.db"
        migrate(sqlite_url(_template))
    target = directory / name
    shutil.copyfile(_template, target)
    return sqlite_url(target)


async def log_of(database_url: str) -> list[StoredEvent]:
    """The whole event log, read through the store."""
    engine = create_engine(database_url)
    try:
        return await EventStore(engine).read_all()
    finally:
        await engine.dispose()


@dataclass
class Backend:
    """A store and a writer engine on one database (the contract tests run on each backend)."""

    url: str
    store: EventStore
    writer_engine: AsyncEngine


def settings_for(database_url: str, **overrides: Any) -> Settings:
    base = dict(host="127.0.0.1", port=free_port(), database_url=database_url)
    base.update(overrides)
    return Settings(**base)


class InProcessServer:
    """The real app on a loopback port, in the test's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.runner = web.AppRunner(self.app, handle_signals=False)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    async def start(self) -> InProcessServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[InProcessServer]:
    server = await InProcessServer(settings).start()
    try:
        yield server
    finally:
        await server.stop()


class ServerProcess:
    """`python -m chatserver` in its own process, for restarts and SIGKILL."""

    def __init__(self, database_url: str, port: int | None = None, **env: str) -> None:
        self.database_url = database_url
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "CHAT_DATABASE_URL": database_url,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkdtemp(prefix="chat-server-")) / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        # A file, not a pipe: nobody drains a pipe and a full one blocks the server.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatserver"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("server did not start listening")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Client:
    """A real python-socketio client that records every event it receives."""

    EVENTS = (
        "welcome",
        "loginNameBad",
        "loginNameExists",
        "onlineUsers",
        "userJoined",
        "userLeft",
        "chat",
        "protocolError",
        "history",
        "resumeFailed",
        "conversations",
        "roomCreated",
        "roomJoined",
        "roomLeft",
        "roomChat",
        "privateMessage",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: list[tuple[str, Any]] = []
        self.extra: list[tuple[str, list[Any]]] = []
        self._changed = asyncio.Event()
        for event in self.EVENTS:
            self.sio.on(event, self._recorder(event))

    def _recorder(self, event: str) -> Any:
        async def record(*args: Any) -> None:
            # The first argument is the seed's payload; extensions may add more.
            self.received.append((event, args[0] if args else None))
            self.extra.append((event, list(args[1:])))
            self._changed.set()

        return record

    async def connect(self, **kwargs: Any) -> Client:
        await self.sio.connect(self.url, transports=["websocket"], wait_timeout=10, **kwargs)
        return self

    async def disconnect(self) -> None:
        await self.sio.disconnect()

    async def emit(self, event: str, *args: Any) -> None:
        await self.sio.emit(event, args if len(args) != 1 else args[0])

    async def call(self, event: str, *args: Any, timeout: float = 10) -> Any:
        return await self.sio.call(event, args if len(args) != 1 else args[0], timeout=timeout)

    def events(self, name: str) -> list[Any]:
        return [data for event, data in self.received if event == name]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; received: {self.received[-20:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_event(self, name: str, count: int = 1, timeout: float = 10.0) -> list[Any]:
        await self.wait_for(lambda: len(self.events(name)) >= count, timeout)
        return self.events(name)

    async def login(self, name: str) -> Any:
        ack = await self.call("login", name)
        assert ack["ok"], ack
        await self.wait_for(lambda: name in self.events("userJoined"))
        return ack


class Postgres:
    """A throwaway PostgreSQL 15 cluster on a free loopback port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        data = self.dir / "data"
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
        self.start_server()
        return self

    def stop_server(self) -> None:
        """Stop the server (fast shutdown: sessions are cut), keeping its data."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast", "stop")

    def start_server(self) -> None:
        """Start a server stopped by ``stop_server`` again, on the same port."""
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"),
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on",
            "start",
        )

    def create_database(self, name: str) -> str:
        self._run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_available() -> bool:
    return (PG_BIN / "initdb").exists()


def fill_disk(directory: Path) -> Path:
    """Write a file until the filesystem has no room left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)
    return filler
