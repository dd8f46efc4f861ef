"""chat-replay, the history CLI, run as the real console script against logs
written by the real server and real Socket.IO clients (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chatserver.database import create_engine
from chatserver.store import EventStore
from tests.support import Client, alembic, free_port, migrated_sqlite, running_server, settings_for, sqlite_url

REPLAY_SCRIPT = Path(sys.executable).parent / "chat-replay"
REPLAY = [str(REPLAY_SCRIPT)] if REPLAY_SCRIPT.exists() else [sys.executable, "-m", "chatserver.replay"]

INDENT_BOB = " " * len("2026-11-25 21:55:13Z <bob> ")

# The log the scenario writes: (position, user, type, payload) with payloads in
# the order the server writes their keys; logins (None) carry a session.
SCENARIO: list[tuple[int, str, str, dict[str, Any] | None]] = [
    (1, "alice", "UserLoggedIn", None),
    (2, "alice", "UserJoined", {"name": "alice", "room": "lobby"}),
    (3, "bob", "UserLoggedIn", None),
    (4, "bob", "UserJoined", {"name": "bob", "room": "lobby"}),
    (5, "alice", "MessagePosted", {"sender": "alice", "message": "hello bob", "room": "lobby"}),
    (6, "bob", "MessagePosted", {"sender": "bob", "message": "hi alice\nhow are you?\tfine", "room": "lobby"}),
    (7, "alice", "MessagePosted", {"sender": "alice", "message": '<b>bold</b> & "quotes" é 😀', "room": "lobby"}),
    (8, "bob", "UserLeft", {"name": "bob", "reason": "disconnected", "room": "lobby"}),
    (9, "carol", "UserLoggedIn", None),
    (10, "carol", "UserJoined", {"name": "carol", "room": "lobby"}),
    (11, "carol", "MessagePosted", {"sender": "carol", "message": "bye all", "room": "lobby"}),
    (12, "carol", "UserLeft", {"name": "carol", "reason": "disconnected", "room": "lobby"}),
    (13, "alice", "UserLeft", {"name": "alice", "reason": "disconnected", "room": "lobby"}),
]
LOGINS = [1, 3, 9]
TEXT = {  # the transcript line of each position after its time
    2: "* alice joined",
    4: "* bob joined",
    5: "<alice> hello bob",
    6: "<bob> hi alice\n" + INDENT_BOB + "how are you?\tfine",
    7: '<alice> <b>bold</b> & "quotes" é 😀',
    8: "* bob left (disconnected)",
    10: "* carol joined",
    11: "<carol> bye all",
    12: "* carol left (disconnected)",
    13: "* alice left (disconnected)",
}


def message(position: int) -> str:
    payload = SCENARIO[position - 1][3]
    assert payload is not None
    return payload["message"]


async def write_scenario(url: str) -> None:
    """SCENARIO, through a real server and real clients."""
    async with running_server(settings_for(url)) as server:
        alice = await Client(server.url).connect()
        await alice.login("alice")
        bob = await Client(server.url).connect()
        await bob.login("bob")
        for who, position in [(alice, 5), (bob, 6), (alice, 7)]:
            assert (await who.call("chat", message(position)))["ok"]
        await bob.disconnect()
        await alice.wait_for(lambda: "bob" in alice.events("userLeft"))
        carol = await Client(server.url).connect()
        await carol.login("carol")
        assert (await carol.call("chat", message(11)))["ok"]
        await carol.disconnect()
        await alice.wait_for(lambda: "carol" in alice.events("userLeft"))
        await alice.disconnect()
        await wait_for_head(url, len(SCENARIO))  # alice's leave lands after her socket closes


async def wait_for_head(url: str, position: int, timeout: float = 10) -> None:
    engine = create_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while await EventStore(engine).head() < position:
            assert time.monotonic() < deadline, f"the log never reached position {position}"
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()


@dataclass
class Row:
    position: int
    stream: str
    type: str
    time: str  # ISO 8601 UTC with microseconds and Z
    payload_text: str  # as stored (SQLite) or re-encoded in writer order (PostgreSQL)
    payload: dict[str, Any]
    scope: str | None  # the events table's scope column

    @property
    def stamp(self) -> str:
        return f"{self.time[:10]} {self.time[11:19]}Z"

    def jsonl(self) -> str:
        return (
            f'{{"position":{self.position},"stream":{js(self.stream)},"type":{js(self.type)},'
            f'"time":{js(self.time)},"payload":{self.payload_text},"scope":{js(self.scope)}}}'
        )


    def text(self) -> str:
        if self.type == "UserLoggedIn":
            p = self.payload
            return f"{self.stamp} * {p['name']} logged in (node {p['node']}, session {p['session']})"
        return f"{self.stamp} {TEXT[self.position]}"


def js(value: Any) -> str:
    """JSON as chat-replay writes it: compact, UTF-8 as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sqlite_rows(url: str) -> list[Row]:
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT position, stream, type, recorded_at, payload, scope FROM events ORDER BY position"
        ).fetchall()
    return [
        Row(p, s, t, iso(datetime.fromisoformat(r).replace(tzinfo=UTC)), payload, json.loads(payload), scope)
        for p, s, t, r, payload, scope in rows
    ]


def check_scenario(rows: list[Row]) -> None:
    assert [r.position for r in rows] == [p for p, *_ in SCENARIO]
    for row, (position, user, type_, payload) in zip(rows, SCENARIO, strict=True):
        assert (row.position, row.stream, row.type) == (position, f"user-{user}", type_)
        if payload is None:
            assert list(row.payload)[:3] == ["name", "session", "node"] and row.payload["name"] == user
            assert row.scope is None
        else:
            assert row.payload == payload and list(row.payload) == list(payload)
            assert row.scope == "room:lobby"


@dataclass
class Log:
    url: str
    rows: list[Row]

    def at(self, *positions: int) -> list[Row]:
        return [r for r in self.rows if r.position in positions]

    def jsonl(self, positions: Sequence[int]) -> str:
        return "".join(r.jsonl() + "\n" for r in self.at(*positions))

    def text(self, positions: Sequence[int]) -> str:
        return "".join(r.text() + "\n" for r in self.at(*positions))


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    url = migrated_sqlite(tmp_path_factory.mktemp("replay"))
    asyncio.run(write_scenario(url))
    rows = sqlite_rows(url)
    check_scenario(rows)
    return Log(url, rows)


def replay_env(url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHAT_DATABASE_URL", "NO_COLOR")}
    if url is not None:
        env["CHAT_DATABASE_URL"] = url
    env.update(extra)
    return env


def replay(url: str | None, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REPLAY, *args],
        env=replay_env(url, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


def replay_all(url: str, cases: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run several chat-replay commands side by side (the suite stays quick)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: replay(url, *args), cases))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0 and result.stderr == "", (result.args, result.returncode, result.stderr)
    return result.stdout


ALL = [p for p, *_ in SCENARIO]
SHOWN = [p for p in ALL if p not in LOGINS]  # the transcript leaves logins out


# -- formats --------------------------------------------------------------------


def csv_line(r: Row) -> str:
    quoted = r.payload_text.replace('"', '""')
    scope = r.scope or ""
    if any(c in scope for c in ',"\n'):  # a name may hold a comma or a quote
        scope = '"' + scope.replace('"', '""') + '"'
    return f'{r.position},{r.stream},{r.type},{r.time},"{quoted}",{scope}\n'


def test_formats_exact(log: Log) -> None:
    text, jsonl, csv_out, bare_csv, colour = replay_all(
        log.url,
        [[], ["--format", "jsonl"], ["--format", "csv"], ["--format", "csv", "--no-header", "--type", "chat"],
         ["--color", "always", "--tail", "2", "--type", "chat,join"]],
    )
    assert ok(text) == log.text(SHOWN)  # piped: no colour
    assert ok(jsonl) == log.jsonl(ALL)
    # jsonl is the documented schema: these keys, these types.
    for line, row in zip(jsonl.stdout.splitlines(), log.rows, strict=True):
        obj = json.loads(line)
        assert list(obj) == ["position", "stream", "type", "time", "payload", "scope"]
        assert obj["position"] == row.position and obj["payload"] == row.payload
        assert obj["time"].endswith("Z") and datetime.fromisoformat(obj["time"]).tzinfo is not None
    header = "position,stream,type,time,payload,scope\n"
    assert ok(csv_out) == header + "".join(csv_line(r) for r in log.rows)
    assert ok(bare_csv) == "".join(csv_line(r) for r in log.at(5, 6, 7, 11))
    ten, eleven = log.at(10, 11)
    assert ok(colour) == (
        f"\x1b[2m{ten.stamp}\x1b[0m \x1b[32m* carol joined\x1b[0m\n"
        f"\x1b[2m{eleven.stamp}\x1b[0m \x1b[1m<carol>\x1b[0m bye all\n"
    )


def test_text_shows_logins_when_asked(log: Log) -> None:
    logins, with_chat = replay_all(
        log.url, [["--type", "login"], ["--type", "login", "--type", "chat", "--user", "bob"]]
    )
    assert ok(logins) == log.text(LOGINS)
    assert ok(with_chat) == log.text([3, 6])
    assert "* bob logged in (node local, session " in with_chat.stdout


def test_transcript_escapes_control_characters() -> None:
    # The server refuses control characters (but tabs and newlines) in names
    # and messages; a log written by other means must still not drive the
    # reader's terminal. Rendered here directly, as the server can't write it.
    from chatserver.replay_format import TextRenderer

    time_ = "2026-11-25T21:55:13.000001Z"
    rows = [
        [1, "user-a", "MessagePosted", time_, {"sender": "a\x1bb", "message": "\x1b[31mred\x07\n\tnext\x85"}],
        [2, "user-a", "UserJoined", time_, {"name": "bob", "room": "dev"}],
        [3, "user-a", "SomethingNew", time_, {"name": "\x1b"}],
        [4, "user-a", "UserLeft", time_, {"nom": "bob"}],
        # Bidi controls would reorder the line: "<eve> hi" could read as
        # another sender's; separators would break it.
        [5, "user-e", "MessagePosted", time_, {"sender": "\u202eeve", "message": "hi \u2066x\u2069\u2028y\u200f"}],
        [6, "user-e", "SomethingNew", time_, {"name": "\u202e"}],
        # Room names, recipients and topics are names too; a topic keeps to
        # one line.
        [7, "user-a", "PrivateMessageSent", time_, {"sender": "a", "recipient": "\u202eb", "message": "x"}],
        [8, "room-r", "RoomCreated", time_, {"room": "r\x1b", "creator": "c", "topic": "t\nu"}],
    ]
    assert TextRenderer().render(rows).decode() == (
        "2026-11-25 21:55:13Z <a\\x1bb> \\x1b[31mred\\x07\n"
        + " " * len("2026-11-25 21:55:13Z <a\\x1bb> ") + "\tnext\\x85\n"
        "2026-11-25 21:55:13Z [dev] * bob joined\n"
        '2026-11-25 21:55:13Z * SomethingNew {"name":"\\u001b"}\n'
        '2026-11-25 21:55:13Z * UserLeft {"nom":"bob"}\n'
        "2026-11-25 21:55:13Z <\\u202eeve> hi \\u2066x\\u2069\\u2028y\\u200f\n"
        '2026-11-25 21:55:13Z * SomethingNew {"name":"\\u202e"}\n'
        "2026-11-25 21:55:13Z <a -> \\u202eb> x\n"
        "2026-11-25 21:55:13Z [r\\x1b] * c created the room (topic: t\\x0au)\n"
    )


# -- filters --------------------------------------------------------------------


def test_each_filter(log: Log) -> None:
    t = {r.position: r.time for r in log.rows}
    cases: list[tuple[list[str], list[int]]] = [
        (["--user", "bob"], [3, 4, 6, 8]),
        (["--user", "bob", "--user", "carol"], [3, 4, 6, 8, 9, 10, 11, 12]),
        (["--type", "chat"], [5, 6, 7, 11]),
        (["--type", "join,leave", "--type", "login"], [1, 2, 3, 4, 8, 9, 10, 12, 13]),
        (["--after", "7"], [8, 9, 10, 11, 12, 13]),
        (["--limit", "3"], [1, 2, 3]),
        (["--tail", "2"], [12, 13]),
        (["--since", t[5]], list(range(5, 14))),
        (["--until", t[8]], list(range(1, 8))),
        (["--room", "lobby"], SHOWN),  # logins have no room
    ]
    results = replay_all(log.url, [["--format", "jsonl", *args] for args, _ in cases])
    for (args, positions), result in zip(cases, results, strict=True):
        assert ok(result) == log.jsonl(positions), args


def test_filters_combine(log: Log) -> None:
    t = {r.position: r.time for r in log.rows}
    cases: list[tuple[list[str], list[int]]] = [
        (["--since", t[5], "--until", t[9]], [5, 6, 7, 8]),  # 9 and 10 share their commit's time
        (["--user", "alice", "--type", "chat", "--after", "5"], [7]),
        (["--type", "chat", "--tail", "1", "--user", "bob"], [6]),
        (["--user", "carol", "--since", t[9], "--tail", "2"], [11, 12]),
        (["--room", "lobby", "--type", "chat,leave", "--after", "9", "--limit", "2"], [11, 12]),
    ]
    results = replay_all(log.url, [["--format", "jsonl", *args] for args, _ in cases])
    for (args, positions), result in zip(cases, results, strict=True):
        assert ok(result) == log.jsonl(positions), args
    # The transcript applies the same filters (and leaves logins out).
    text, tail = replay_all(log.url, [["--user", "bob"], ["--tail", "3", "--type", "join,leave,chat"]])
    assert ok(text) == log.text([4, 6, 8])
    assert ok(tail) == log.text([11, 12, 13])


def replay_in_process(url: str, *args: str) -> tuple[int, str, str]:
    """main() in this process: for the many small filter cases (no start-up cost)."""
    from chatserver import replay as replay_module

    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        try:
            code = replay_module.main(["--database-url", url, *args])
        except SystemExit as exit_:  # argparse's answer to a usage error
            code = exit_.code  # type: ignore[assignment]
    finally:
        sys.stdout, sys.stderr = saved
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out.flush()
    return code, out.buffer.getvalue().decode(), err.getvalue()  # type: ignore[attr-defined]


def test_filter_edges_and_more_combinations(log: Log) -> None:
    t = {r.position: r.time for r in log.rows}
    cases: list[tuple[list[str], list[int]]] = [
        (["--user", "nobody"], []),
        (["--type", "join", "--type", "leave"], [2, 4, 8, 10, 12, 13]),
        (["--type", "UserLoggedIn"], LOGINS),
        (["--after", "13"], []),
        (["--after", "0"], ALL),
        (["--limit", "0"], []),
        (["--tail", "0"], []),
        (["--tail", "100"], ALL),
        (["--until", "1h"], []),
        (["--since", "1h"], ALL),
        (["--since", "2000-01-01"], ALL),
        (["--since", "2h", "--until", "1h"], []),
        (["--room", "kitchen"], []),
        (["--user", "alice", "--type", "chat"], [5, 7]),
        (["--user", "alice", "--type", "chat", "--limit", "1"], [5]),
        (["--type", "chat", "--tail", "2"], [7, 11]),
        (["--type", "leave", "--after", "8", "--limit", "1"], [12]),
        (["--type", "join", "--since", t[4], "--until", t[10]], [4]),
        (["--tail", "3", "--after", "11"], [12, 13]),
        (["--tail", "2", "--until", t[9]], [7, 8]),
        (["--since", t[13].replace("Z", "+00:00").replace("T", " ")], [13]),
    ]
    for args, positions in cases:
        assert replay_in_process(log.url, "--format", "jsonl", *args) == (0, log.jsonl(positions), ""), args


# -- errors ---------------------------------------------------------------------


def test_usage_errors_exit_2_with_one_line(log: Log) -> None:
    cases = [
        ["--since", "yesterday"],
        ["--until", "2026-13-45"],
        ["--since", "2026-01-02", "--until", "2026-01-01"],
        ["--type", "shout"],
        ["--limit", "-1"],
        ["--tail", "many"],
        ["--after", "x"],
        ["--limit", "1", "--tail", "1"],
        ["--follow", "--until", "1h"],
        ["--format", "xml"],
        ["--user", ""],
        ["--interval", "0"],
        ["--bogus"],
        ["--database-url", "mysql://u@h/db"],
        ["--database-url", "not a url"],
    ]
    for args, result in zip(cases, replay_all(log.url, cases), strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("chat-replay: "), (args, result.stderr)
        assert "Traceback" not in result.stderr


NOT_UTF8 = os.fsdecode(b"x\xff")  # how Python sees an argument whose bytes are not UTF-8


def test_unusable_values_exit_2_with_one_line(log: Log) -> None:
    """Values the CLI parses but cannot use (issue 10): out of the BIGINT
    range, out of datetime's range, not UTF-8, a URL it cannot connect with."""
    cases = [
        ["--after", "1" + "0" * 30],
        ["--after", str(2**63)],
        ["--after", "9" * 5000],  # more digits than int() takes
        ["--limit", "1" + "0" * 30],
        ["--tail", "1" + "0" * 30],
        ["--since", "99999999999d"],
        ["--until", "99999999999d"],
        ["--since", "1000000d"],  # before year 1000
        ["--since", "1" + "0" * 400 + "s"],
        ["--since", "9999-12-31T23:59:59-05:00"],  # beyond year 9999 in UTC
        ["--until", "0001-01-01T00:00+01:00"],  # before year 1 in UTC
        ["--since", "0300-01-01"],
        ["--interval", "nan"],
        ["--interval", "1e-300"],
        ["--user", NOT_UTF8],
        ["--room", NOT_UTF8],
        ["--since", NOT_UTF8],
        [arg for i in range(1001) for arg in ("--user", f"u{i}")],
        ["--database-url", "postgresql+asyncpg://u@127.0.0.1:abc/db"],
        ["--database-url", "postgresql+asyncpg://u@[::1/db"],
        ["--database-url", "postgresql+asyncpg://u@127.0.0.1:0/db"],
        ["--database-url", "postgresql+asyncpg://u@127.0.0.1:70000/db"],
        ["--database-url", f"postgresql+asyncpg://{NOT_UTF8}@127.0.0.1:1/db"],
        ["--database-url", "postgresql+asyncpg://u@127.0.0.1:1/db?sslmode=bogus"],
    ]
    # In this process (quick): a traceback would be an exception here. A few
    # through the real console script as well, and the URL from the environment.
    answers = [replay_in_process(log.url, *args) for args in cases]
    real = [cases[0], cases[5], cases[14], cases[22], cases[23]]
    answers += [(r.returncode, r.stdout, r.stderr) for r in replay_all(log.url, real)]
    env_url = replay("postgresql+asyncpg://u@127.0.0.1:x/db")
    answers.append((env_url.returncode, env_url.stdout, env_url.stderr))
    for args, (code, out, err) in zip([*cases, *real, ["CHAT_DATABASE_URL"]], answers, strict=True):
        shown = [a[:60] for a in args[:4]]
        assert code == 2, (shown, err[-300:])
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("chat-replay: "), (shown, err)
        assert "Traceback" not in err and len(err) < 400, (shown, err)  # a long value is cut short


def test_largest_usable_values(log: Log) -> None:
    top = str(2**63 - 1)
    cases: list[tuple[list[str], list[int]]] = [
        (["--after", top], []),
        (["--limit", top], ALL),
        (["--tail", top], ALL),
        (["--since", "1000-01-01"], ALL),
        (["--until", "9999-12-31T23:59:59.999999Z"], ALL),
        (["--since", "9999-12-31"], []),
        (["--since", "365000d"], ALL),
    ]
    for args, positions in cases:
        assert replay_in_process(log.url, "--format", "jsonl", *args) == (0, log.jsonl(positions), ""), args
    many = [arg for i in range(999) for arg in ("--user", f"u{i}")]
    assert replay_in_process(log.url, "--format", "jsonl", *many, "--user", "bob") == (0, log.jsonl([3, 4, 6, 8]), "")


def insert_events(url: str, rows: list[tuple[str, str, str]]) -> None:
    """(stream, type, payload JSON text) rows appended straight to the table."""
    with sqlite3.connect(os.fsencode(url.split(":///", 1)[1])) as conn:
        conn.executemany(
            "INSERT INTO events (position, stream, version, type, payload, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(i, stream, i, type_, payload, "2026-01-01 00:00:00.000000")
             for i, (stream, type_, payload) in enumerate(rows, start=1)],
        )


def test_user_in_nfd_and_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path, os.fsdecode(b"log-\xff.db"))
    insert_events(url, [("user-jos\u00e9", "UserJoined", '{"name":"jos\u00e9","room":"lobby"}')])
    result = replay(url, "--user", "jose\u0301")  # NFD, as some keyboards type it
    assert ok(result) == "2026-01-01 00:00:00Z * jos\u00e9 joined\n"


def test_a_payload_that_is_not_unicode_exits_4(tmp_path: Path) -> None:
    # SQLite's JSON takes a lone surrogate escape; our server never writes
    # one (it refuses them), another tool might.
    url = migrated_sqlite(tmp_path)
    insert_events(url, [("user-x", "MessagePosted", '{"sender":"x","message":"a\\ud800b","room":"lobby"}')])
    for fmt in ("text", "csv"):
        result = replay(url, "--format", fmt)
        assert result.returncode == 4 and result.stderr.count("\n") == 1, result.stderr
        assert "not valid Unicode" in result.stderr and "Traceback" not in result.stderr


def test_missing_database_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.db"
    result = replay(f"sqlite+aiosqlite:///{missing}")
    assert result.returncode == 3 and result.stdout == ""
    assert "alembic upgrade head" in result.stderr and result.stderr.count("\n") == 1
    # The default URL (chat.db in the working directory) is not created either.
    default = replay(None, cwd=tmp_path)
    assert default.returncode == 3 and "chat.db" in default.stderr
    assert list(tmp_path.iterdir()) == []


def test_unmigrated_and_unreadable_databases(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = replay(f"sqlite:///{empty}")
    assert result.returncode == 3 and "alembic upgrade head" in result.stderr and result.stderr.count("\n") == 1
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    result = replay(f"sqlite:///{junk}")
    assert result.returncode == 4 and "not a database" in result.stderr and result.stderr.count("\n") == 1


def test_unreachable_postgres_exits_4() -> None:
    port = free_port()  # nothing listens there
    result = replay(f"postgresql+asyncpg://postgres:secret@127.0.0.1:{port}/chat")
    assert result.returncode == 4, result.stderr
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in result.stderr
    assert result.stderr.count("\n") == 1 and "secret" not in result.stderr


# -- pipes ----------------------------------------------------------------------


def seed_bulk(url: str, count: int) -> None:
    """Many plain chats written straight into the table (for pipes and windows):
    every third in the room dev, the others in the lobby."""
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO events (position, stream, version, type, payload, recorded_at, scope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    i,
                    f"user-u{i % 7}",
                    i,
                    "MessagePosted",
                    json.dumps({"sender": f"u{i % 7}", "message": f"message number {i} " + "x" * 40,
                                "room": "dev" if i % 3 == 0 else "lobby"}, separators=(",", ":")),
                    f"2026-01-01 00:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}000",
                    "room:dev" if i % 3 == 0 else "room:lobby",
                )
                for i in range(1, count + 1)
            ),
        )


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = migrated_sqlite(tmp_path_factory.mktemp("bulk"))
    seed_bulk(url, 40_000)  # a few MB of jsonl: more than any pipe buffer
    return url


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_head_closes_the_pipe_cleanly(bulk: str, fmt: str) -> None:
    replay_proc = subprocess.Popen(
        [*REPLAY, "--format", fmt], env=replay_env(bulk), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    head = subprocess.run(["head", "-1"], stdin=replay_proc.stdout, capture_output=True, timeout=60)
    assert replay_proc.stdout is not None
    replay_proc.stdout.close()
    _, err = replay_proc.communicate(timeout=60)
    assert head.stdout.count(b"\n") == 1
    assert replay_proc.returncode == 0 and err == b""


def test_long_dumps_cross_chunks_in_order(bulk: str) -> None:
    # SQLite renders jsonl 4096 events at a time: no event lost or repeated
    # at a chunk's edge, whatever the limit.
    whole, limited, across, tail, dev, both, dev_tail = replay_all(bulk, [
        ["--format", "jsonl"],
        ["--format", "jsonl", "--limit", "10000"],
        ["--format", "jsonl", "--after", "4095", "--limit", "2"],
        ["--format", "jsonl", "--tail", "3"],
        # One scope reads its index, several the log in position order.
        ["--format", "jsonl", "--room", "dev"],
        ["--format", "jsonl", "--room", "dev", "--room", "lobby", "--conversation", "u1,u2"],
        ["--format", "jsonl", "--room", "dev", "--room", "lobby", "--tail", "5000"],
    ])
    lines = ok(whole).splitlines()
    assert [json.loads(line)["position"] for line in lines] == list(range(1, 40_001))
    assert ok(limited).splitlines() == lines[:10_000]
    assert ok(across).splitlines() == lines[4095:4097]
    assert ok(tail).splitlines() == lines[-3:]
    assert ok(dev).splitlines() == lines[2::3]
    assert ok(both).splitlines() == lines
    assert ok(dev_tail).splitlines() == lines[-5000:]


def test_progress_only_on_a_terminal(bulk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from chatserver import replay as replay_module

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Piped(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False

    err = Terminal()
    out = Piped(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(replay_module.Progress, "DELAY", 0.0)
    monkeypatch.setattr(replay_module.Progress, "EVERY", 0.0)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("CHAT_DATABASE_URL", bulk)
    try:
        assert replay_module.main(["--format", "jsonl"]) == 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "chat-replay: " in err.getvalue() and "events, position " in err.getvalue()
    assert err.getvalue().endswith("\r\x1b[K")  # the progress line is cleared
    out.flush()
    assert out.buffer.getvalue().count(b"\n") == 40_000  # type: ignore[attr-defined]


# -- follow (with the server running) -------------------------------------------


async def start_follow(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *REPLAY, "--follow", "--interval", "0.05", *args,
        env=replay_env(url), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def read_lines(proc: asyncio.subprocess.Process, count: int, timeout: float = 15) -> list[str]:
    assert proc.stdout is not None
    return [
        (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode() for _ in range(count)
    ]


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, bytes, bytes]:
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, out, err


def positions(lines: list[str]) -> list[int]:
    return [json.loads(line)["position"] for line in lines]


async def test_follow_sqlite_prints_new_events_once(db_url: str) -> None:
    async with running_server(settings_for(db_url)) as server:
        alice = await Client(server.url).connect()
        await alice.login("alice")
        everything = await start_follow(db_url, "--format", "jsonl")
        chats = await start_follow(db_url, "--type", "chat", "--user", "bob")
        tail = await start_follow(db_url, "--tail", "1", "--format", "jsonl")
        try:
            assert positions(await read_lines(everything, 2)) == [1, 2]
            assert positions(await read_lines(tail, 1)) == [2]
            bob = await Client(server.url).connect()
            await bob.login("bob")
            await bob.call("chat", "first")
            await alice.call("chat", "from alice")
            await bob.call("chat", "second\nline")
            assert positions(await read_lines(everything, 5)) == [3, 4, 5, 6, 7]
            lines = await read_lines(chats, 3)
            assert [lines[0][21:], lines[1][21:], lines[2]] == ["<bob> first\n", "<bob> second\n", " " * 27 + "line\n"]
            await bob.disconnect()
            assert positions(await read_lines(everything, 1)) == [8]
            assert positions(await read_lines(tail, 6)) == [3, 4, 5, 6, 7, 8]
        finally:
            results = [await stop(p) for p in (everything, chats, tail)]
            await alice.disconnect()
    for code, rest, err in results:
        assert (code, err) == (0, b""), err.decode()
        assert rest == b""  # nothing printed twice, nothing left


async def test_follow_with_limit_stops_by_itself(db_url: str) -> None:
    async with running_server(settings_for(db_url)) as server:
        alice = await Client(server.url).connect()
        await alice.login("alice")
        proc = await start_follow(db_url, "--format", "jsonl", "--type", "chat", "--limit", "2")
        try:
            await asyncio.sleep(0.3)
            for text in ("one", "two", "three"):
                await alice.call("chat", text)
            out, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
            await alice.disconnect()
    assert (proc.returncode, err) == (0, b"")
    assert [json.loads(line)["payload"]["message"] for line in out.decode().splitlines()] == ["one", "two"]


async def test_follow_reader_going_away_exits_quietly(db_url: str) -> None:
    async with running_server(settings_for(db_url)) as server:
        alice = await Client(server.url).connect()
        await alice.login("alice")
        read_end, write_end = os.pipe()
        proc = subprocess.Popen(
            [*REPLAY, "--follow", "--interval", "0.05"],
            env=replay_env(db_url),
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
        os.close(write_end)
        try:
            first = await asyncio.to_thread(os.read, read_end, 65536)
            assert first.endswith(b"* alice joined\n")
            os.close(read_end)  # like `head -1` exiting
            for i in range(50):
                await alice.call("chat", f"into the void {i}")
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            _, err = await asyncio.to_thread(proc.communicate, None, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
            await alice.disconnect()
    assert (proc.returncode, err) == (0, b"")


# -- PostgreSQL -------------------------------------------------------------------


async def pg_rows(url: str) -> list[Row]:
    import asyncpg

    from chatserver.replay_format import written_order

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        records = await conn.fetch(
            "SELECT position, stream, type, recorded_at, payload::text, scope FROM events ORDER BY position"
        )
    finally:
        await conn.close()
    rows = []
    for position, stream, type_, recorded_at, payload_text, scope in records:
        payload = json.loads(payload_text)
        if type_ != "UserLoggedIn":  # the scenario's literal key order
            payload = next(p for pos, _, _, p in SCENARIO if pos == position) or payload
            assert json.loads(payload_text) == payload
        else:
            payload = written_order(type_, payload)
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        rows.append(Row(position, stream, type_, iso(recorded_at), text, payload, scope))
    return rows


@pytest.mark.postgres
async def test_postgres_dump_filters_and_follow(pg_url: str) -> None:
    await write_scenario(pg_url)
    rows = await pg_rows(pg_url)
    check_scenario(rows)
    pg = Log(pg_url, rows)

    t = {r.position: r.time for r in rows}
    cases = [
        ["--format", "jsonl"],
        [],
        ["--user", "alice", "--type", "chat", "--tail", "1", "--format", "jsonl"],
        ["--since", t[5], "--until", t[9], "--room", "lobby", "--format", "csv", "--no-header"],
    ]
    jsonl, text, chats, window = await asyncio.gather(*(asyncio.to_thread(replay, pg_url, *args) for args in cases))
    assert ok(jsonl) == pg.jsonl(ALL)  # the same bytes as from SQLite: keys in writer order
    assert ok(text) == pg.text(SHOWN)
    assert ok(chats) == pg.jsonl([7])
    assert ok(window) == "".join(csv_line(r) for r in pg.at(5, 6, 7, 8))
    # The largest values the options take fit PostgreSQL's BIGINT and timestamptz.
    top = str(2**63 - 1)
    edges = [
        (["--after", top], []),
        (["--limit", top], ALL),
        (["--tail", top], ALL),
        (["--since", "1000-01-01", "--until", "9999-12-31T23:59:59.999999Z"], ALL),
    ]
    results = await asyncio.gather(
        *(asyncio.to_thread(replay, pg_url, "--format", "jsonl", *args) for args, _ in edges)
    )
    for (args, expected), result in zip(edges, results, strict=True):
        assert ok(result) == pg.jsonl(expected), args

    async with running_server(settings_for(pg_url)) as server:
        proc = await start_follow(pg_url, "--format", "jsonl", "--tail", "1")
        try:
            assert positions(await read_lines(proc, 1)) == [13]
            dave = await Client(server.url).connect()
            await dave.login("dave")
            await dave.call("chat", "hello from postgres")
            lines = await read_lines(proc, 3)
            assert positions(lines) == [14, 15, 16]
            payload = json.loads(lines[2])["payload"]
            assert payload == {"sender": "dave", "message": "hello from postgres", "room": "lobby"}
            assert list(payload) == ["sender", "message", "room"]  # as from SQLite, not jsonb's order
            await dave.disconnect()
        finally:
            code, rest, err = await stop(proc)
    assert (code, err) == (0, b""), err.decode()
    assert positions(rest.decode().splitlines()) in ([], [17])  # dave's leave, if it came before the stop


@pytest.mark.postgres
async def test_postgres_follow_reconnects_when_its_connection_drops(pg_url: str) -> None:
    import sqlalchemy as sa

    await write_scenario(pg_url)
    proc = await start_follow(pg_url, "--format", "jsonl", "--tail", "1")
    engine = create_engine(pg_url)
    try:
        assert positions(await read_lines(proc, 1)) == [13]
        # Cut the follower off, as a database restart or an admin would.
        async with engine.connect() as conn:
            killed = (
                await conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            ).scalar_one()
        assert killed >= 1
        async with running_server(settings_for(pg_url)) as server:
            erin = await Client(server.url).connect()
            await erin.login("erin")
            await erin.call("chat", "after the drop")
            lines = await read_lines(proc, 3)
            assert positions(lines) == [14, 15, 16]
            assert json.loads(lines[2])["payload"]["message"] == "after the drop"
            await erin.disconnect()
    finally:
        await engine.dispose()
        code, rest, err = await stop(proc)
    assert code == 0, err.decode()
    assert positions(rest.decode().splitlines()) in ([], [17])  # erin's leave, if it came before the stop
    notes = err.decode().splitlines()
    assert notes[0].startswith("chat-replay: lost the PostgreSQL connection") and notes[0].endswith("reconnecting")
    assert notes[1:] == ["chat-replay: reconnected to PostgreSQL"], notes


@pytest.mark.postgres
def test_postgres_missing_or_unmigrated_database_exit_3(postgres: Any) -> None:
    bare = postgres.create_database("chat_bare")
    result = replay(bare)
    assert result.returncode == 3 and "alembic upgrade head" in result.stderr, result.stderr
    missing = bare.rsplit("/", 1)[0] + "/no_such_db"
    result = replay(missing)
    assert result.returncode == 3 and "no_such_db" in result.stderr and result.stderr.count("\n") == 1


# -- rooms and private messages (issue 12) ---------------------------------------

CAFE = "Caf\u00e9 Stra\u00dfe"  # a space, an accent, and an ß that casefolds to "ss"
CAFE_SCOPE = "room:caf\u00e9 strasse"
ALICE_BOB = "dm:alice\tbob"
ALICE_XY = "dm:alice\tzo\u00e9,x"

# (position, stream, type, payload in writer order (None: a login), scope,
# transcript line after the time (None: hidden by default)).
ROOMS: list[tuple[int, str, str, dict[str, Any] | None, str | None, str | None]] = [
    (1, "user-alice", "UserLoggedIn", None, None, None),
    (2, "user-alice", "UserJoined", {"name": "alice", "room": "lobby"}, "room:lobby", "* alice joined"),
    (3, "user-bob", "UserLoggedIn", None, None, None),
    (4, "user-bob", "UserJoined", {"name": "bob", "room": "lobby"}, "room:lobby", "* bob joined"),
    (5, "user-zo\u00e9,x", "UserLoggedIn", None, None, None),
    (6, "user-zo\u00e9,x", "UserJoined", {"name": "zo\u00e9,x", "room": "lobby"}, "room:lobby", "* zo\u00e9,x joined"),
    (7, "room-dev", "RoomCreated", {"room": "Dev", "creator": "alice", "topic": "Python"}, "room:dev",
     "[Dev] * alice created the room (topic: Python)"),
    (8, "user-alice", "RoomJoined", {"name": "alice", "room": "Dev"}, "room:dev", "[Dev] * alice joined"),
    (9, "user-bob", "RoomJoined", {"name": "bob", "room": "Dev"}, "room:dev", "[Dev] * bob joined"),
    (10, "user-alice", "MessagePosted", {"sender": "alice", "message": "hi dev\nline two", "room": "Dev"}, "room:dev",
     "[Dev] <alice> hi dev\n" + " " * len("2026-11-25 21:55:13Z [Dev] <alice> ") + "line two"),
    (11, "user-bob", "MessagePosted", {"sender": "bob", "message": "lobby hello", "room": "lobby"}, "room:lobby",
     "<bob> lobby hello"),
    (12, "room-caf\u00e9 strasse", "RoomCreated", {"room": CAFE, "creator": "bob", "topic": ""}, CAFE_SCOPE,
     f"[{CAFE}] * bob created the room"),
    (13, "user-bob", "RoomJoined", {"name": "bob", "room": CAFE}, CAFE_SCOPE, f"[{CAFE}] * bob joined"),
    (14, "user-bob", "MessagePosted", {"sender": "bob", "message": "tea?", "room": CAFE}, CAFE_SCOPE,
     f"[{CAFE}] <bob> tea?"),
    (15, "user-alice", "PrivateMessageSent", {"sender": "alice", "recipient": "bob", "message": "psst"}, ALICE_BOB,
     "<alice -> bob> psst"),
    (16, "user-bob", "PrivateMessageSent", {"sender": "bob", "recipient": "alice", "message": "what?"}, ALICE_BOB,
     "<bob -> alice> what?"),
    (17, "user-alice", "PrivateMessageSent", {"sender": "alice", "recipient": "zo\u00e9,x", "message": "a comma"}, ALICE_XY,
     "<alice -> zo\u00e9,x> a comma"),
    (18, "user-bob", "ConversationRead", {"name": "bob", "position": 15, "room": "", "peer": "alice"}, None, None),
    (19, "user-bob", "RoomLeft", {"name": "bob", "room": "Dev"}, "room:dev", "[Dev] * bob left"),
    (20, "user-zo\u00e9,x", "UserLeft", {"name": "zo\u00e9,x", "reason": "disconnected", "room": "lobby"}, "room:lobby",
     "* zo\u00e9,x left (disconnected)"),
    (21, "user-bob", "UserLeft", {"name": "bob", "reason": "disconnected", "room": "lobby"}, "room:lobby",
     "* bob left (disconnected)"),
    (22, "user-alice", "UserLeft", {"name": "alice", "reason": "disconnected", "room": "lobby"}, "room:lobby",
     "* alice left (disconnected)"),
]
ROOMS_ALL = [p for p, *_ in ROOMS]
ROOMS_SHOWN = [p for p, *_, line in ROOMS if line is not None]
DEV = [7, 8, 9, 10, 19]
CAFE_EVENTS = [12, 13, 14]
LOBBY_EVENTS = [2, 4, 6, 11, 20, 21, 22]
ALICE_AND_BOB = [15, 16]


async def write_rooms(url: str) -> None:
    """ROOMS, through a real server and real clients speaking the rooms protocol."""
    async with running_server(settings_for(url)) as server:
        alice, bob, xy = [await Client(server.url).connect() for _ in range(3)]
        for client, name in ((alice, "alice"), (bob, "bob"), (xy, "zo\u00e9,x")):
            await client.login(name)

        async def ok_call(client: Client, event: str, *args: Any) -> Any:
            ack = await client.call(event, *args)
            assert ack["ok"], (event, args, ack)
            return ack

        await ok_call(alice, "createRoom", {"room": "Dev", "topic": "Python"})
        await ok_call(bob, "joinRoom", {"room": "dev"})  # any case names the room
        await ok_call(alice, "chat", "hi dev\nline two", {"room": "DEV"})
        await ok_call(bob, "chat", "lobby hello")
        await ok_call(bob, "createRoom", {"room": CAFE})
        await ok_call(bob, "chat", "tea?", {"room": CAFE.upper()})
        psst = await ok_call(alice, "chat", "psst", {"to": "bob"})
        await ok_call(bob, "chat", "what?", {"to": "alice"})
        await ok_call(alice, "chat", "a comma", {"to": "zo\u00e9,x"})
        await ok_call(bob, "markRead", {"with": "alice", "position": psst["position"]})
        await ok_call(bob, "leaveRoom", {"room": "Dev"})
        for leaving in (xy, bob):
            await leaving.disconnect()
        await alice.wait_for(lambda: alice.events("userLeft") == ["zo\u00e9,x", "bob"])
        await alice.disconnect()
        await wait_for_head(url, len(ROOMS))


@dataclass
class RoomsLog(Log):
    def text(self, positions: Sequence[int]) -> str:
        lines = {p: line for p, *_, line in ROOMS}
        return "".join(f"{r.stamp} {lines[r.position]}\n" for r in self.at(*positions))


def check_rooms(rows: list[Row], *, key_order: bool = True) -> None:
    assert [r.position for r in rows] == ROOMS_ALL
    for row, (position, stream, type_, payload, scope, _line) in zip(rows, ROOMS, strict=True):
        assert (row.position, row.stream, row.type, row.scope) == (position, stream, type_, scope)
        if payload is None:
            assert row.payload["name"] == stream.removeprefix("user-")
        else:
            assert row.payload == payload
            assert not key_order or list(row.payload) == list(payload)


@pytest.fixture(scope="module")
def rooms(tmp_path_factory: pytest.TempPathFactory) -> RoomsLog:
    url = migrated_sqlite(tmp_path_factory.mktemp("rooms"))
    asyncio.run(write_rooms(url))
    rows = sqlite_rows(url)
    check_rooms(rows)
    return RoomsLog(url, rows)


# (arguments, positions): every one is run in process, as jsonl.
ROOM_FILTERS: list[tuple[list[str], list[int]]] = [
    (["--room", "dev"], DEV),
    (["--room", "DEV"], DEV),  # any case
    (["--room", "Dev", "--room", "dEv"], DEV),  # one room, given twice
    (["--room", "caf\u00e9 strasse"], CAFE_EVENTS),  # casefolded: ß is ss
    (["--room", "CAF\u00c9 STRASSE"], CAFE_EVENTS),
    (["--room", "Cafe\u0301 Stra\u00dfe"], CAFE_EVENTS),  # typed in NFD
    (["--room", "cafe strasse"], []),  # an accent is not a case
    (["--room", "Caf\u00e9"], []),  # a name, not a prefix
    (["--room", "lobby"], LOBBY_EVENTS),
    (["--room", "LOBBY"], LOBBY_EVENTS),
    (["--room", "dev", "--room", "lobby"], sorted(DEV + LOBBY_EVENTS)),
    (["--room", "nosuch"], []),
    (["--conversation", "alice,bob"], ALICE_AND_BOB),
    (["--conversation", "bob,alice"], ALICE_AND_BOB),  # either order
    (["--conversation", "bob , alice"], ALICE_AND_BOB),  # no name ends in a space
    (["--conversation", '["bob","alice"]'], ALICE_AND_BOB),
    (["--conversation", "Alice,bob"], []),  # user names keep their case
    (["--conversation", '["zo\u00e9,x","alice"]'], [17]),  # a name holding a comma
    (["--conversation", '["alice", "zo\u00e9,x"]'], [17]),
    (["--conversation", '["zoe\u0301,x","alice"]'], [17]),  # typed in NFD
    (["--conversation", "alice,x"], []),
    (["--conversation", "alice,bob", "--conversation", '["zo\u00e9,x","alice"]'], [15, 16, 17]),
    (["--room", "dev", "--conversation", "alice,bob"], sorted(DEV + ALICE_AND_BOB)),  # any of them
    (["--room", "dev", "--type", "chat"], [10]),
    (["--room", "dev", "--type", "join"], [8, 9]),
    (["--room", "lobby", "--type", "join"], [2, 4, 6]),
    (["--type", "join"], [2, 4, 6, 8, 9, 13]),  # joins of the lobby and of rooms
    (["--type", "leave"], [19, 20, 21, 22]),
    (["--type", "room-join"], [8, 9, 13]),
    (["--type", "UserJoined"], [2, 4, 6]),
    (["--type", "room-created"], [7, 12]),
    (["--type", "private"], [15, 16, 17]),
    (["--type", "read"], [18]),
    (["--type", "chat"], [10, 11, 14]),
    (["--type", "chat,private", "--room", CAFE], [14]),
    (["--user", "bob", "--conversation", "alice,bob"], [16]),  # a PM is in its sender's stream
    (["--room", "dev", "--tail", "2"], [10, 19]),
    (["--room", "dev", "--after", "9", "--limit", "1"], [10]),
    (["--conversation", "alice,bob", "--after", "15"], [16]),
]


def test_room_and_conversation_filters(rooms: RoomsLog) -> None:
    for args, positions in ROOM_FILTERS:
        assert replay_in_process(rooms.url, "--format", "jsonl", *args) == (0, rooms.jsonl(positions), ""), args


def test_rooms_in_every_format(rooms: RoomsLog) -> None:
    text, dev, pms, reads, jsonl, csv_out, colour = replay_all(
        rooms.url,
        [[], ["--room", "DEV"], ["--conversation", "bob,alice"], ["--type", "read"],
         ["--format", "jsonl"], ["--format", "csv", "--room", CAFE, "--conversation", '["zo\u00e9,x","alice"]'],
         ["--color", "always", "--room", "dev", "--type", "chat,private", "--conversation", "alice,bob", "--limit", "2"]],
    )
    assert ok(text) == rooms.text(ROOMS_SHOWN)
    assert ok(dev) == rooms.text(DEV)
    assert ok(pms) == rooms.text(ALICE_AND_BOB)
    assert ok(reads) == f"{rooms.at(18)[0].stamp} * bob read the conversation with alice up to 15\n"
    assert ok(jsonl) == rooms.jsonl(ROOMS_ALL)
    # The scope key, as the log holds it (check_rooms compared those to ROOMS).
    scopes = [json.loads(line)["scope"] for line in jsonl.stdout.splitlines()]
    assert scopes == [scope for _, _, _, _, scope, _ in ROOMS]
    assert ok(csv_out) == "position,stream,type,time,payload,scope\n" + "".join(
        csv_line(r) for r in rooms.at(12, 13, 14, 17)
    )
    assert csv_out.stdout.splitlines()[-1].endswith(',"dm:alice\tzo\u00e9,x"')
    ten, fifteen = rooms.at(10, 15)
    assert ok(colour) == (
        f"\x1b[2m{ten.stamp}\x1b[0m [Dev] \x1b[1m<alice>\x1b[0m hi dev\n"
        + " " * len("2026-11-25 21:55:13Z [Dev] <alice> ") + "line two\n"
        f"\x1b[2m{fifteen.stamp}\x1b[0m \x1b[1m<alice -> bob>\x1b[0m psst\n"
    )


def test_bad_conversations_and_rooms_exit_2_with_one_line(rooms: RoomsLog) -> None:
    cases = [
        ["--conversation", "alice"],
        ["--conversation", "a,b,c"],  # which comma? the JSON form says
        ["--conversation", ",bob"],
        ["--conversation", "alice, "],
        ["--conversation", ""],
        ["--conversation", "[oops"],
        ["--conversation", '["alice"]'],
        ["--conversation", '["a","b","c"]'],
        ["--conversation", '["alice",1]'],
        ["--conversation", '["alice",""]'],
        ["--conversation", '{"a":"b"}'],
        ["--conversation", '["\\ud800","bob"]'],  # a lone surrogate: no name
        ["--conversation", NOT_UTF8 + ",bob"],
        ["--room", ""],
        ["--room", NOT_UTF8],
        [arg for i in range(1001) for arg in ("--conversation", f"u{i},v")],
        [arg for i in range(1001) for arg in ("--room", f"r{i}")],
    ]
    answers = [replay_in_process(rooms.url, *args) for args in cases]
    real = replay(rooms.url, "--conversation", "a,b,c")  # the console script says the same
    answers.append((real.returncode, real.stdout, real.stderr))
    for args, (code, out, err) in zip([*cases, cases[1]], answers, strict=True):
        shown = [a[:60] for a in args[:4]]
        assert code == 2 and out == "", (shown, err)
        assert err.count("\n") == 1 and err.startswith("chat-replay: "), (shown, err)
        assert "Traceback" not in err and len(err) < 400, (shown, err)
    for code, _, err in (answers[1], answers[-1]):
        assert """'["a,b","c"]'""" in err, err  # how to give a name that holds a comma


async def test_follow_a_room(db_url: str) -> None:
    async with running_server(settings_for(db_url)) as server:
        alice = await Client(server.url).connect()
        await alice.login("alice")
        assert (await alice.call("createRoom", {"room": "Ops"}))["ok"]
        proc = await start_follow(db_url, "--format", "jsonl", "--room", "ops", "--conversation", "alice,bob")
        try:
            assert positions(await read_lines(proc, 2)) == [3, 4]  # created, alice joined
            bob = await Client(server.url).connect()
            await bob.login("bob")  # 5, 6: not in ops
            assert (await bob.call("chat", "lobby chatter"))["ok"]  # 7
            assert (await bob.call("chat", "not a member", {"room": "ops"}))["error"] == "not_a_member"
            assert (await alice.call("chat", "in ops", {"room": "OPS"}))["ok"]  # 8
            assert (await bob.call("chat", "hi alice", {"to": "alice"}))["ok"]  # 9
            lines = await read_lines(proc, 2)
            assert positions(lines) == [8, 9]
            assert [json.loads(line)["scope"] for line in lines] == ["room:ops", "dm:alice\tbob"]
            await bob.disconnect()
            await alice.wait_for(lambda: "bob" in alice.events("userLeft"))
        finally:
            code, rest, err = await stop(proc)
            await alice.disconnect()
    assert (code, err) == (0, b""), err.decode()
    assert rest == b""  # bob's leave is the lobby's


def test_a_log_never_upgraded_reads_as_after_the_upgrade(tmp_path: Path) -> None:
    """A log at revision 0004 (no scope column) still reads, its scopes what
    migration 0005 backfills; after the upgrade the output is the same bytes."""
    url = sqlite_url(tmp_path / "old.db")
    result = alembic(url, "upgrade", "0004")
    assert result.returncode == 0, result.stderr
    insert_events(url, [
        ("user-ann", "UserLoggedIn", '{"name":"ann","session":"s1","node":"local","resume_hash":"","resumed":false}'),
        ("user-ann", "UserJoined", '{"name":"ann","room":"lobby"}'),
        ("user-ann", "MessagePosted", '{"sender":"ann","message":"old times","room":"lobby"}'),
        ("user-ann", "UserLeft", '{"name":"ann","reason":"disconnected","room":"lobby"}'),
    ])
    cases = [["--format", "jsonl"], ["--format", "csv"], [], ["--room", "LOBBY", "--format", "jsonl"],
             ["--room", "dev"], ["--conversation", "ann,bob"], ["--type", "login,chat"]]
    before = replay_all(url, cases)
    lines = ok(before[0]).splitlines()
    assert [json.loads(line)["scope"] for line in lines] == [None, "room:lobby", "room:lobby", "room:lobby"]
    assert ok(before[3]) == "".join(line + "\n" for line in lines[1:])
    assert ok(before[4]) == ok(before[5]) == ""
    assert ok(before[2]).splitlines() == [
        "2026-01-01 00:00:00Z * ann joined",
        "2026-01-01 00:00:00Z <ann> old times",
        "2026-01-01 00:00:00Z * ann left (disconnected)",
    ]
    result = alembic(url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    after = replay_all(url, cases)
    assert [ok(r) for r in after] == [ok(r) for r in before]


@pytest.mark.postgres
async def test_postgres_rooms(pg_url: str) -> None:
    import asyncpg

    from chatserver.replay_format import written_order

    await write_rooms(pg_url)
    conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        records = await conn.fetch(
            "SELECT position, stream, type, recorded_at, payload::text, scope FROM events ORDER BY position"
        )
    finally:
        await conn.close()
    rows = []
    for position, stream, type_, recorded_at, payload_text, scope in records:
        payload = written_order(type_, json.loads(payload_text))  # jsonb keeps its own key order
        rows.append(Row(position, stream, type_, iso(recorded_at), js(payload), payload, scope))
    check_rooms(rows)
    pg = RoomsLog(pg_url, rows)
    cases = [(["--format", "jsonl"], ROOMS_ALL), *ROOM_FILTERS[:22:3]]
    results = await asyncio.gather(
        *(asyncio.to_thread(replay, pg_url, "--format", "jsonl", *args) for args, _ in cases),
        asyncio.to_thread(replay, pg_url),
        asyncio.to_thread(replay, pg_url, "--format", "csv", "--no-header", "--conversation", "alice,bob"),
    )
    for (args, expected), result in zip(cases, results, strict=False):
        assert ok(result) == pg.jsonl(expected), args  # the same bytes as from SQLite
    assert ok(results[-2]) == pg.text(ROOMS_SHOWN)
    assert ok(results[-1]) == "".join(csv_line(r) for r in pg.at(*ALICE_AND_BOB))
