"""Operating the server: /healthz, /readyz, /metrics, logs, `chatserver
check`, and a bounded graceful stop (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatserver.health import head_revision
from chatserver.logs import JsonFormatter, ProblemThrottle
from chatserver.metrics import STATS
from tests.support import (
    PG_BIN,
    ROOT,
    Client,
    InProcessServer,
    Postgres,
    ServerProcess,
    free_port,
    log_of,
    migrated_sqlite,
    settings_for,
)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, ctype, body = await get(url)
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    return status, json.loads(body)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, body = await get(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    return samples(body)


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# -- health ----------------------------------------------------------------------
async def test_healthz_and_readyz_answer_json_not_the_chat_page(server: InProcessServer) -> None:
    status, body = await get_json(server.url + "/healthz")
    assert status == 200 and body["status"] == "ok"
    status, body = await get_json(server.url + "/readyz")
    assert status == 200, body
    assert body["status"] == "ready"
    assert body["checks"] == {
        "database": "ok",
        "schema": head_revision(),
        "head": head_revision(),
        "writer": "running",
        "dispatcher": "running",
    }
    # The index fallback still answers other paths.
    status, ctype, _ = await get(server.url + "/some/page")
    assert status == 200 and ctype.startswith("text/html")


async def test_a_flood_of_readyz_requests_shares_the_database_checks(server: InProcessServer) -> None:
    from sqlalchemy import event

    from chatserver.app import STORE

    engine = server.app[STORE].engine.sync_engine
    queries: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "alembic_version" in statement:
            queries.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> int:
                async with http.get(server.url + "/readyz") as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(ready() for _ in range(100)))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert statuses == [200] * 100
    # Requests that arrive while a check runs wait for it instead of starting
    # their own: far fewer queries than requests.
    assert 1 <= len(queries) <= 20, len(queries)


async def test_readyz_is_503_with_the_reason_when_the_schema_is_not_at_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_url = migrated_sqlite(tmp_path)
    db_file = tmp_path / "chat.db"
    srv = await InProcessServer(settings_for(db_url)).start()
    try:
        with contextlib.closing(sqlite3.connect(db_file)) as db, db:
            db.execute("UPDATE alembic_version SET version_num = '0001'")
        status, body = await get_json(srv.url + "/readyz")
        assert status == 503, body
        assert body["status"] == "not ready"
        assert body["checks"]["schema"] == "0001"
        assert any("revision 0001" in r and "alembic upgrade head" in r for r in body["reasons"]), body
        # /healthz is about the process only.
        assert (await get_json(srv.url + "/healthz"))[0] == 200

        with contextlib.closing(sqlite3.connect(db_file)) as db, db:
            db.execute("DROP TABLE alembic_version")
        status, body = await get_json(srv.url + "/readyz")
        assert status == 503 and body["checks"]["database"] == "error", body
        assert any("alembic_version" in r for r in body["reasons"]), body
    finally:
        await srv.stop()
    no_tracebacks(caplog)


def test_the_head_revision_is_read_from_the_migrations_folder(tmp_path: Path) -> None:
    assert head_revision() == "0007"
    for path in (ROOT / "migrations" / "versions").glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    # What another branch's migration looks like: the head moves with it.
    (tmp_path / "0008_more.py").write_text(
        '"""More.\n\nRevision ID: 0008\nRevises: 0007\n"""\n'
        'revision: str = "0008"\ndown_revision: str | None = "0007"\n'
    )
    assert head_revision(tmp_path) == "0008"


def _pg_ctl(pg: Postgres, *args: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(pg.dir / "data"), *args],
                   check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def postgres_stopped(pg: Postgres) -> Iterator[None]:
    """Stop the session's cluster, and start it again whatever happens: the
    other PostgreSQL tests need it."""
    _pg_ctl(pg, "-m", "fast", "-w", "stop")
    try:
        yield
    finally:
        _pg_ctl(pg, "-w", "-l", str(pg.dir / "log"), "-o",
                f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {pg.dir} -c fsync=on", "start")


@pytest.mark.postgres
async def test_readyz_follows_postgresql_going_down_and_coming_back(
    postgres: Postgres, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await InProcessServer(settings_for(pg_url)).start()
    try:
        assert (await get_json(srv.url + "/readyz"))[0] == 200
        with postgres_stopped(postgres):
            status, body = await get_json(srv.url + "/readyz")
            assert status == 503, body
            assert body["checks"]["database"] in ("error", "timeout"), body
            assert any("database" in r for r in body["reasons"]), body
            assert (await get_json(srv.url + "/healthz"))[0] == 200
        deadline = time.monotonic() + 15
        while True:
            status, body = await get_json(srv.url + "/readyz")
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 200, body
    finally:
        await srv.stop()
    no_tracebacks(caplog)


# -- metrics ---------------------------------------------------------------------
async def test_metrics_move_when_clients_log_in_and_chat(server: InProcessServer) -> None:
    before = await scrape(server.url)
    assert value(before, "chat_sessions_logged_in") == 0
    alice, bobby = Client(server.url), Client(server.url)
    await alice.connect()
    await bobby.connect()
    try:
        refused = await alice.call("chat", "too early")
        assert refused["error"] == "not_logged_in"
        await alice.login("alice")
        await bobby.login("bobby")
        ack = await alice.call("chat", "hello")
        assert ack["ok"]
        await bobby.wait_for(lambda: any(c["message"] == "hello" for c in bobby.events("chat")))
        page = await alice.call("history", {"before": ack["position"], "limit": 10})
        assert page["ok"]
        after = await scrape(server.url)
    finally:
        await alice.disconnect()
        await bobby.disconnect()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "chat_connected_sockets", transport="websocket") == 2
    assert value(after, "chat_sessions_logged_in") == 2
    assert value(after, "chat_online_users") == 2
    assert moved("chat_logins_total") == 2
    assert moved("chat_refusals_total", reason="not_logged_in") == 1
    assert moved("chat_events_appended_total", type="MessagePosted") == 1
    assert moved("chat_events_appended_total", type="UserJoined") == 2
    assert moved("chat_history_requests_total") == 1
    # alice's join reached alice; bobby's reached both; the chat reached both.
    assert moved("chat_fanout_deliveries_total") >= 5
    assert moved("chat_fanout_bytes_total") > 5 * len("hello")
    assert moved("chat_commit_batch_size_count") >= 3
    assert moved("chat_commit_seconds_count") == moved("chat_commit_batch_size_count")
    assert value(after, "chat_dispatch_lag_positions") == 0
    assert ("process_open_fds", ()) in after or sys.platform != "linux"


async def test_metrics_can_be_turned_off_or_moved_to_their_own_port(db_url: str) -> None:
    off = await InProcessServer(settings_for(db_url, metrics="off")).start()
    try:
        status, _ctype, body = await get(off.url + "/metrics")
        assert status == 404 and "<html" not in body.lower()
    finally:
        await off.stop()
    port = free_port()
    apart = await InProcessServer(settings_for(db_url, metrics=str(port))).start()
    try:
        assert (await get(apart.url + "/metrics"))[0] == 404
        assert "chat_connected_sockets" in (await get(f"http://127.0.0.1:{port}/metrics"))[2]
    finally:
        await apart.stop()


# -- logs --------------------------------------------------------------------------
def test_client_problems_are_counted_each_time_but_logged_once_a_second_per_kind() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.operations.throttle")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        throttle = ProblemThrottle(logger, interval=0.3)
        before = STATS.client_problems.get("test_flood", 0)
        for _ in range(500):
            throttle.report("test_flood", "bad frame from %s", "sid1", sid="sid1")
        throttle.report("test_other", "another kind")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["kind"] for line in lines] == ["test_flood", "test_other"]
        assert lines[0]["sid"] == "sid1" and lines[0]["message"] == "bad frame from sid1"
        assert STATS.client_problems["test_flood"] - before == 500
        time.sleep(0.35)
        throttle.report("test_flood", "bad frame from %s", "sid2", sid="sid2")
        last = json.loads(stream.getvalue().splitlines()[-1])
        assert last["unlogged"] == 499 and "499 more" in last["message"]
    finally:
        logger.removeHandler(handler)


def test_json_log_lines_parse(tmp_path: Path) -> None:
    srv = ServerProcess(migrated_sqlite(tmp_path), CHAT_LOG_FORMAT="json", CHAT_LOG_LEVEL="info").start()
    try:
        asyncio.run(get(srv.url + "/"))
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert srv.proc.wait(20) == 0  # type: ignore[union-attr]
    finally:
        srv.kill()
    lines = srv.output().splitlines()
    assert len(lines) >= 3, lines
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message", "node"} <= entry.keys(), entry
        assert entry["time"].endswith("Z") and entry["node"] == "local"
    messages = [e["message"] for e in entries]
    assert any(m.startswith("chatserver on http://127.0.0.1") for m in messages), messages
    assert any('"GET / HTTP/1.1" 200' in m for m in messages), messages


def test_log_level_hides_info(tmp_path: Path) -> None:
    srv = ServerProcess(migrated_sqlite(tmp_path), CHAT_LOG_LEVEL="warning").start()
    try:
        asyncio.run(get(srv.url + "/"))
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert srv.proc.wait(20) == 0  # type: ignore[union-attr]
    finally:
        srv.kill()
    assert srv.output().strip() == "", srv.output()


# -- shutdown ------------------------------------------------------------------------
async def _chatters(url: str, n: int) -> list[Client]:
    clients = []
    for i in range(n):
        c = Client(url)
        await c.connect()
        await c.login(f"user{i}")
        clients.append(c)
    return clients


async def _chat_forever(client: Client) -> None:
    i = 0
    with contextlib.suppress(Exception):
        while True:
            await client.emit("chat", f"message {i}")
            i += 1
            await asyncio.sleep(0.005)


async def test_sigterm_under_load_records_the_leaves_and_exits_in_time(tmp_path: Path) -> None:
    db_url = migrated_sqlite(tmp_path)
    srv = ServerProcess(db_url, CHAT_SHUTDOWN_TIMEOUT="5").start()
    clients: list[Client] = []
    try:
        clients = await _chatters(srv.url, 10)
        load = [asyncio.create_task(_chat_forever(c)) for c in clients]
        await asyncio.sleep(1.0)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = await asyncio.to_thread(srv.proc.wait, 30)  # type: ignore[union-attr]
        took = time.monotonic() - started
        for task in load:
            task.cancel()
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.disconnect()
        srv.kill()
    assert code == 0, srv.output()
    assert took < 5 + 2, (took, srv.output())
    leaves = [e for e in await log_of(db_url) if e.type == "UserLeft"]
    assert sorted(e.event.name for e in leaves) == [f"user{i}" for i in range(10)]
    assert {e.event.reason for e in leaves} == {"server shutdown"}


async def test_sigterm_exits_within_the_bound_when_the_database_hangs(tmp_path: Path) -> None:
    db_url = migrated_sqlite(tmp_path)
    srv = ServerProcess(db_url, CHAT_SHUTDOWN_TIMEOUT="2").start()
    clients: list[Client] = []
    blocker = sqlite3.connect(tmp_path / "chat.db", isolation_level=None, timeout=30)
    try:
        clients = await _chatters(srv.url, 3)
        # Another process takes SQLite's write lock and keeps it: the leaves
        # cannot be stored, and every wait in the graceful stop would run out.
        blocker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = await asyncio.to_thread(srv.proc.wait, 60)  # type: ignore[union-attr]
        took = time.monotonic() - started
    finally:
        blocker.close()
        for c in clients:
            with contextlib.suppress(Exception):
                await c.disconnect()
        srv.kill()
    assert took < 2 + 3, (took, srv.output())
    assert code == 1, srv.output()
    assert "graceful stop took longer than CHAT_SHUTDOWN_TIMEOUT=2 s" in srv.output()
    # The next start closes what the forced exit left open.
    again = ServerProcess(db_url).start()
    try:
        deadline = time.monotonic() + 10
        while True:
            leaves = [e for e in await log_of(db_url) if e.type == "UserLeft"]
            if len(leaves) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        again.terminate()
    assert {e.event.reason for e in leaves} == {"server restart"}, leaves


# -- chatserver check ----------------------------------------------------------------
def run_check(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatserver", "check"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_on_good_settings_and_prints_them(tmp_path: Path) -> None:
    result = run_check(CHAT_DATABASE_URL=migrated_sqlite(tmp_path), CHAT_LOG_FORMAT="json", PORT="9000")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "port = 9000" in out and "log_format = json" in out
    assert f"schema revision: {head_revision()}" in out
    assert out.rstrip().endswith("ok")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CHAT_LOG_FORMAT": "xml"}, "CHAT_LOG_FORMAT must be one of text, json"),
        ({"CHAT_LOG_LEVEL": "loud"}, "CHAT_LOG_LEVEL must be one of"),
        ({"CHAT_MAX_BATCH": "0"}, "CHAT_MAX_BATCH must be positive"),
        ({"CHAT_SHUTDOWN_TIMEOUT": "-1"}, "CHAT_SHUTDOWN_TIMEOUT must be positive"),
        ({"CHAT_METRICS": "sometimes"}, "CHAT_METRICS must be on, off or a port number"),
        ({"PORT": "70000"}, "PORT must be 0-65535"),
        ({"CHAT_DATABASE_URL": "mysql+aiomysql://u@127.0.0.1/x"}, "backend 'mysql' is not supported"),
        ({"CHAT_DATABASE_URL": "sqlite:///x.db"}, "must use sqlite+aiosqlite"),
    ],
)
def test_check_fails_on_bad_settings(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    result = run_check(**{"CHAT_DATABASE_URL": migrated_sqlite(tmp_path), **env})
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_check_fails_on_a_setting_that_is_not_a_number(tmp_path: Path) -> None:
    result = run_check(CHAT_DATABASE_URL=migrated_sqlite(tmp_path), PORT="eighty")
    assert result.returncode != 0
    assert "PORT must be an integer" in result.stderr


def test_check_fails_on_a_missing_or_unmigrated_database_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    result = run_check(CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{missing}")
    assert result.returncode == 1 and "does not exist" in result.stdout, result.stdout
    assert not missing.exists()

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = run_check(CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{empty}")
    assert result.returncode == 1 and "alembic upgrade head" in result.stdout, result.stdout

    behind = migrated_sqlite(tmp_path, "behind.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "behind.db")) as db, db:
        db.execute("UPDATE alembic_version SET version_num = '0001'")
    result = run_check(CHAT_DATABASE_URL=behind)
    assert result.returncode == 1 and "at revision 0001, not 0007" in result.stdout, result.stdout


@pytest.mark.postgres
def test_check_on_postgresql_hides_the_password_and_reports_an_unreachable_server(pg_url: str) -> None:
    result = run_check(CHAT_DATABASE_URL=pg_url)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_check(CHAT_DATABASE_URL=f"postgresql+asyncpg://chat:s3cret@127.0.0.1:{free_port()}/chat")
    assert result.returncode == 1, result.stdout
    assert "s3cret" not in result.stdout and "***" in result.stdout
    assert "problem: cannot" in result.stdout, result.stdout


# -- packaging -------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            out = []  # only the last stage is what runs
        out.append((instruction.upper(), " ".join(args.split())))
    return out


def test_dockerfile_runs_our_commands_as_a_non_root_user_with_a_healthcheck() -> None:
    steps = dockerfile_instructions()
    first = dict(steps)
    assert "slim" in first["FROM"]
    assert first["USER"] not in ("root", "0")
    assert first["VOLUME"] == "/data"
    assert "/healthz" in first["HEALTHCHECK"]
    assert "sqlite+aiosqlite:////data/chat.db" in first["ENV"]
    # Every file it copies from the build context exists.
    for instruction, args in steps:
        if instruction == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    # The commands it runs are this project's console scripts.
    cmd = json.loads(first["CMD"])
    assert cmd[:2] == ["sh", "-c"] and cmd[2] == "alembic upgrade head && exec chatserver"
    health = json.loads(first["HEALTHCHECK"].split("CMD", 1)[1])
    assert health[0] == "python"
    bin_dir = Path(sys.executable).parent
    for script in ("alembic", "chatserver"):
        assert (bin_dir / script).exists(), script
    # The healthcheck's own Python line runs (against a closed port it fails fast).
    probe = subprocess.run([sys.executable, "-c", health[2]], env={**os.environ, "PORT": str(free_port())},
                           capture_output=True, text=True, timeout=20)
    assert probe.returncode != 0 and "Connection refused" in probe.stderr, probe.stderr


def test_compose_runs_postgres_and_two_chat_processes_behind_a_proxy() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "chat1", "chat2", "proxy"} <= services.keys()
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    nodes = set()
    for name in ("chat1", "chat2"):
        chat = services[name]
        assert chat["command"] == ["chatserver"]
        env = chat["environment"]
        assert env["CHAT_DATABASE_URL"].startswith("postgresql+asyncpg://")
        nodes.add(env["CHAT_NODE_ID"])
        assert chat["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        # The settings the chat processes get are valid settings.
        from chatserver.check import validate
        from chatserver.config import Settings

        problems, _warnings = validate(Settings.from_env({k: str(v) for k, v in env.items()}))
        assert not problems, problems
    assert len(nodes) == 2, "each process needs its own CHAT_NODE_ID"
    nginx = compose["configs"]["nginx"]["content"]
    assert "server chat1:8080;" in nginx and "server chat2:8080;" in nginx
    assert "$$http_upgrade" in nginx  # compose turns $$ into the $ nginx reads


def test_the_server_refuses_to_start_on_a_bad_setting_and_names_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatserver"],
        cwd=ROOT,
        env={**os.environ, "CHAT_DATABASE_URL": migrated_sqlite(tmp_path), "CHAT_METRICS": "sometimes",
             "CHAT_LOG_FORMAT": "xml"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "CHAT_METRICS must be on, off or a port number" in result.stderr
    assert "CHAT_LOG_FORMAT must be one of text, json" in result.stderr
    assert "Traceback" not in result.stderr
