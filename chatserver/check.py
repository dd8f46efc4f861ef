"""``chatserver check``: validate the settings and the database without
serving, print what the server would run with, exit 1 on any problem.

It never changes anything: a missing SQLite file is reported, not created.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa

from .config import Settings
from .health import MigrationsUnreadable, head_revision, schema_revision
from .logs import FORMATS, LEVELS
from .metrics import parse_setting

DATABASE_TIMEOUT = 5.0
DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def redacted(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by validate(); never echo a password
        return "<unparsable>"


def validate(settings: Settings) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the settings alone."""
    problems: list[str] = []
    warnings: list[str] = []
    s = settings
    if not 0 <= s.port <= 65535:
        problems.append(f"PORT must be 0-65535, got {s.port}")
    try:
        url = sa.make_url(s.database_url)
    except Exception:
        problems.append("CHAT_DATABASE_URL is not a database URL")
    else:
        backend, driver = url.get_backend_name(), url.get_driver_name()
        if backend not in DRIVERS:
            problems.append(f"CHAT_DATABASE_URL: backend {backend!r} is not supported (sqlite or postgresql)")
        elif driver != DRIVERS[backend]:
            problems.append(f"CHAT_DATABASE_URL must use {backend}+{DRIVERS[backend]}, got {backend}+{driver}")
    if any(c.isspace() for c in s.node_id) or len(s.node_id) > 64:
        problems.append(f"CHAT_NODE_ID must be one word of at most 64 characters, got {s.node_id!r}")
    positive = {
        "CHAT_MAX_MESSAGE_CHARS": s.max_message_chars,
        "CHAT_MAX_PACKET_BYTES": s.max_packet_bytes,
        "CHAT_RATE_PER_SECOND": s.rate_per_second,
        "CHAT_RATE_BURST": s.rate_burst,
        "CHAT_PING_INTERVAL": s.ping_interval,
        "CHAT_PING_TIMEOUT": s.ping_timeout,
        "CHAT_HISTORY_PAGE_MAX": s.history_page_max,
        "CHAT_RESUME_TTL": s.resume_ttl_seconds,
        "CHAT_RECONCILE_INTERVAL": s.reconcile_interval,
        "CHAT_MAX_BATCH": s.max_batch,
        "CHAT_SHUTDOWN_TIMEOUT": s.shutdown_timeout,
        "CHAT_UPLOAD_MAX_BYTES": s.upload_max_bytes,
        "CHAT_UPLOAD_BYTES_PER_HOUR": s.upload_bytes_per_hour,
        "CHAT_FILES_PER_MESSAGE": s.files_per_message,
        "CHAT_UPLOAD_TOKEN_TTL": s.upload_token_ttl,
        "CHAT_UPLOAD_UNPOSTED_TTL": s.upload_unposted_ttl,
        "CHAT_UPLOAD_MAX_PIXELS": s.upload_max_pixels,
        "CHAT_TOKEN_TTL": s.token_ttl,
        "CHAT_LOGIN_FAILURES_PER_ACCOUNT": s.login_failures_per_account,
        "CHAT_LOGIN_FAILURES_PER_ADDRESS": s.login_failures_per_address,
        "CHAT_LOGIN_FAILURE_WINDOW": s.login_failure_window,
    }
    if s.auth_mode not in ("open", "accounts"):
        problems.append(f"CHAT_AUTH must be open or accounts, got {s.auth_mode!r}")
    if s.secret_key and len(s.secret_key.encode()) < 32:
        # HS256 with a short key can be brute-forced offline from one token.
        problems.append("CHAT_SECRET_KEY must be at least 32 bytes")
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append("CHAT_TLS_CERT and CHAT_TLS_KEY go together: set both or neither")
    for key, path in (("CHAT_TLS_CERT", s.tls_cert), ("CHAT_TLS_KEY", s.tls_key)):
        if path and not Path(path).is_file():
            problems.append(f"{key}: no such file {path!r}")
    for key, value in positive.items():
        if not value > 0:
            problems.append(f"{key} must be positive, got {value}")
    for key, value in {"CHAT_HISTORY_SIZE": s.history_size, "CHAT_RESUME_MAX_GAP": s.resume_max_gap}.items():
        if value < 0:
            problems.append(f"{key} must not be negative, got {value}")
    if s.log_format not in FORMATS:
        problems.append(f"CHAT_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {s.log_format!r}")
    if s.log_level not in LEVELS:
        problems.append(f"CHAT_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {s.log_level!r}")
    try:
        metrics = parse_setting(s.metrics)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if metrics is not True and metrics is not False and metrics == s.port:
            problems.append(f"CHAT_METRICS port {metrics} is the chat's own PORT")
    if not (s.public_dir / "index.html").is_file():
        warnings.append(f"{s.public_dir}/index.html is missing: the browser client will not load")
    if not (s.node_modules_dir / "socket.io-client").is_dir():
        warnings.append(f"{s.node_modules_dir} has no socket.io-client: run `npm ci` for the browser client")
    return problems, warnings


async def check_database(settings: Settings) -> tuple[list[str], list[str]]:
    """(problems, facts) about the database: reachable, schema at head."""
    from .database import create_engine

    problems: list[str] = []
    facts: list[str] = []
    try:
        head = head_revision()
        facts.append(f"migrations head: {head}")
    except (OSError, MigrationsUnreadable) as exc:
        return [f"cannot read the migrations: {exc}"], facts
    url = sa.make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).is_file():
            return [f"the SQLite file {url.database} does not exist: run `alembic upgrade head`"], facts
    engine = create_engine(settings.database_url)
    try:
        revision = await schema_revision(engine, DATABASE_TIMEOUT)
        async with engine.connect() as conn:
            position = (await conn.execute(sa.text("SELECT max(position) FROM events"))).scalar()
    except TimeoutError:
        problems.append(f"the database did not answer within {DATABASE_TIMEOUT:g} s")
    except sa.exc.DBAPIError as exc:
        text = str(exc.orig).strip().splitlines()
        reason = text[0] if text else type(exc.orig).__name__
        if "alembic_version" in reason or "events" in reason:
            problems.append(f"the database has no chat schema ({reason}): run `alembic upgrade head`")
        else:
            problems.append(f"cannot use the database: {reason}")
    except OSError as exc:
        problems.append(f"cannot reach the database: {exc}")
    else:
        facts.append(f"schema revision: {revision}")
        facts.append(f"log head position: {position or 0}")
        if revision != head:
            problems.append(f"the schema is at revision {revision}, not {head}: run `alembic upgrade head`")
    finally:
        await engine.dispose()
    return problems, facts


def run(settings: Settings, out: TextIO = sys.stdout) -> int:
    problems, warnings = validate(settings)
    print("settings:", file=out)
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name == "database_url" and value:
            value = redacted(value)
        if field.name == "secret_key":
            # A signing key printed is a key leaked (terminals, CI logs).
            value = "(set)" if value else "(unset: generated into the database)"
        print(f"  {field.name} = {value}", file=out)
    if not any(p.startswith("CHAT_DATABASE_URL") for p in problems):
        db_problems, facts = asyncio.run(check_database(settings))
        problems += db_problems
        print("database:", file=out)
        for fact in facts:
            print(f"  {fact}", file=out)
    for warning in warnings:
        print(f"warning: {warning}", file=out)
    for problem in problems:
        print(f"problem: {problem}", file=out)
    print("ok" if not problems else f"{len(problems)} problem(s)", file=out)
    return 0 if not problems else 1
