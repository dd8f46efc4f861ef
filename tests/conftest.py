from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chatserver.database import create_engine
from chatserver.store import EventStore
from tests.support import Backend, InProcessServer, Postgres, migrated_sqlite, postgres_available, settings_for

_db_counter = itertools.count()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return migrated_sqlite(tmp_path)


@pytest.fixture
async def server(db_url: str) -> AsyncIterator[InProcessServer]:
    srv = await InProcessServer(settings_for(db_url)).start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("CI must have PostgreSQL 15 (set PG_BIN to its bin folder)")
        pytest.skip("PostgreSQL 15 binaries are not installed")
    pg = Postgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    from tests.support import migrate

    url = postgres.create_database(f"chat_{next(_db_counter)}")
    migrate(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = request.getfixturevalue("db_url" if request.param == "sqlite" else "pg_url")
    read_engine = create_engine(url)
    writer_engine = create_engine(url, writer=True)
    try:
        yield Backend(url, EventStore(read_engine), writer_engine)
    finally:
        await writer_engine.dispose()
        await read_engine.dispose()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk a test can fill for real and free again."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
