"""`alembic upgrade head` and `alembic downgrade base`, for real, on an empty
SQLite file and on PostgreSQL 15."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from chatserver.database import DatabaseNotMigrated, check_migrated, create_engine
from tests.support import Postgres, alembic, sqlite_url

TABLES = {"alembic_version", "events", "online_users", "projection_positions", "resume_tokens"}


async def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def round_trip(url: str) -> None:
    up = alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert TABLES <= await tables(url)
    engine = create_engine(url)
    try:
        await check_migrated(engine)
        async with engine.connect() as conn:
            uniques = await conn.run_sync(lambda c: sa.inspect(c).get_unique_constraints("events"))
        assert any(sorted(u["column_names"]) == ["stream", "version"] for u in uniques)
    finally:
        await engine.dispose()
    current = alembic(url, "current")
    assert "0002 (head)" in current.stdout
    down = alembic(url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert await tables(url) <= {"alembic_version"}
    engine = create_engine(url)
    try:
        with pytest.raises(DatabaseNotMigrated):
            await check_migrated(engine)
    finally:
        await engine.dispose()
    again = alembic(url, "upgrade", "head")
    assert again.returncode == 0, again.stderr


async def test_sqlite_upgrade_and_downgrade(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    await round_trip(sqlite_url(path))
    assert path.exists()


@pytest.mark.postgres
async def test_postgres_upgrade_and_downgrade(postgres: Postgres) -> None:
    await round_trip(postgres.create_database("migrations_rt"))
