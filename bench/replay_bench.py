"""Benchmark: `chat-replay --format jsonl` against the `sqlite3` shell.

Seeds a migrated SQLite event log with N events (default 1,000,000) written
straight into the `events` table in one transaction (a realistic mix: each
session is a login and a join, a few dozen chats of about 64 bytes, a leave),
then dumps the same rows, in the same run, with

    chat-replay --format jsonl > /dev/null
    sqlite3 -json FILE "select ... order by position" > /dev/null
    sqlite3 FILE "select ... order by position" > /dev/null     (.mode list)

and prints the best of --runs wall-clock (and CPU) times and the ratios. The
target is time(chat-replay) <= 2 x time(sqlite3 -json). The sqlite3 shell
must be installed (Debian: apt-get install sqlite3).

    .venv/bin/python bench/replay_bench.py                # 1,000,000 events
    .venv/bin/python bench/replay_bench.py --events 200000 --keep /tmp/log.db
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatserver.events import (  # noqa: E402
    LOBBY,
    MessagePosted,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    to_payload,
    user_stream,
)

# The columns chat-replay's jsonl carries, in position order.
SHELL_QUERY = "select position, stream, type, recorded_at, payload from events order by position"

WORDS = (
    "the a to and of in is it you that for on was with he as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people "
    "deploy merge review ship lunch coffee meeting tomorrow tonight friday build green red flaky"
).split()


def migrate(path: Path) -> None:
    env = {**os.environ, "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=120,
    )


def messages(rng: random.Random, count: int = 4096) -> list[str]:
    """Chat lines of 40 to 90 characters (about 64 on average)."""
    out = []
    for _ in range(count):
        size = rng.randint(40, 88)
        words: list[str] = []
        length = 0
        while length < size:
            word = rng.choice(WORDS)
            words.append(word)
            length += len(word) + 1
        out.append(" ".join(words))
    return out


def rows(count: int, seed: int = 1) -> list[tuple[int, str, int, str, str, str]]:
    """`count` events as the store writes them: payload keys in field order,
    recorded_at as SQLAlchemy writes it on SQLite (naive UTC text); a login
    and its join share their commit's time."""
    rng = random.Random(seed)
    lines = messages(rng)
    names = [f"user{i:04d}" for i in range(2000)]
    versions = dict.fromkeys(names, 0)
    online: list[str] = []
    online_set: set[str] = set()
    clock = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[tuple[int, str, int, str, str, str]] = []
    dumps = orjson.dumps

    def add(name: str, type_: str, payload: dict[str, object], recorded_at: str) -> None:
        versions[name] += 1
        out.append((len(out) + 1, user_stream(name), versions[name], type_, dumps(payload).decode(), recorded_at))

    def tick() -> str:
        nonlocal clock
        clock += timedelta(microseconds=rng.randint(1, 40_000))
        return clock.strftime("%Y-%m-%d %H:%M:%S.%f")

    while len(out) < count:
        roll = rng.random()
        if roll < 0.03 or len(online) < 5:
            name = rng.choice(names)
            if name not in online_set:
                at = tick()
                add(name, UserLoggedIn.type, {"name": name, "session": rng.randbytes(16).hex(), "node": "local"}, at)
                add(name, UserJoined.type, {"name": name, "room": LOBBY}, at)
                online.append(name)
                online_set.add(name)
        elif roll < 0.06:
            name = online.pop(rng.randrange(len(online)))
            online_set.discard(name)
            add(name, UserLeft.type, {"name": name, "reason": "disconnected", "room": LOBBY}, tick())
        else:
            name = rng.choice(online)
            add(name, MessagePosted.type, {"sender": name, "message": rng.choice(lines), "room": LOBBY}, tick())
    del out[count:]
    return out


def check_payload_order() -> None:
    """The hand-built payloads above have the keys the server writes, in its order."""
    samples = {
        UserLoggedIn.type: UserLoggedIn("ann", "s", "local"),
        UserJoined.type: UserJoined("ann", LOBBY),
        MessagePosted.type: MessagePosted("ann", "hi", LOBBY),
        UserLeft.type: UserLeft("ann", "disconnected", LOBBY),
    }
    written = {type_: list(to_payload(event)) for type_, event in samples.items()}
    ours = {
        UserLoggedIn.type: ["name", "session", "node"],
        UserJoined.type: ["name", "room"],
        MessagePosted.type: ["sender", "message", "room"],
        UserLeft.type: ["name", "reason", "room"],
    }
    for type_, keys in ours.items():
        # The server may write more keys (a newer UserLoggedIn); ours come first, in order.
        assert written[type_][: len(keys)] == keys, (type_, written[type_])


def seed(path: Path, count: int) -> None:
    check_payload_order()
    migrate(path)
    data = rows(count)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Seeding only: no rollback journal, a large cache; WAL (as the server
        # runs it) once the rows are in.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (position, stream, version, type, payload, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
            data,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def replay_command() -> list[str]:
    script = Path(sys.executable).parent / "chat-replay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "chatserver.replay"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one run, output to /dev/null."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.devnull, "wb") as devnull:
        start = time.perf_counter()
        subprocess.run(cmd, stdout=devnull, check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def check_same_rows(replay: list[str], env: dict[str, str], shell: str, path: Path) -> None:
    """Both sides dump the same events (first and last few, field by field)."""
    for extra, order in ((["--limit", "3"], "asc limit 3"), (["--tail", "3"], "desc limit 3")):
        ours = subprocess.run(
            [*replay, "--format", "jsonl", *extra], env=env, cwd=ROOT, capture_output=True, check=True
        ).stdout.splitlines()
        query = SHELL_QUERY.replace("order by position", f"order by position {order}")
        shell_out = subprocess.run([shell, "-json", str(path), query], capture_output=True, check=True).stdout
        theirs = orjson.loads(shell_out)
        theirs.sort(key=lambda row: row["position"])
        assert len(ours) == len(theirs) == 3
        for line, row in zip(ours, theirs, strict=True):
            event = orjson.loads(line)
            assert (event["position"], event["stream"], event["type"]) == (row["position"], row["stream"], row["type"])
            assert event["payload"] == orjson.loads(row["payload"])
            assert event["time"] == row["recorded_at"].replace(" ", "T") + "Z"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events to seed (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command; the best counts")
    parser.add_argument("--keep", type=Path, help="seed this file (kept) instead of a temporary one; reused if present")
    parser.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "text"], help="the format to time")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = parser.parse_args()

    shell = shutil.which("sqlite3")
    if shell is None:
        print("replay_bench: the sqlite3 shell is not installed (apt-get install sqlite3)", file=sys.stderr)
        return 2

    tmp = None
    if args.keep is not None:
        path = args.keep.resolve()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="replay-bench-"))
        path = tmp / "bench.db"
    try:
        if not path.exists():
            start = time.perf_counter()
            seed(path, args.events)
            print(f"seeded {args.events:,} events into {path.name} in {time.perf_counter() - start:.1f} s "
                  f"({path.stat().st_size / 1e6:.0f} MB)")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            (count,) = conn.execute("select count(*) from events").fetchone()
            types = conn.execute("select type, count(*) from events group by type order by 2 desc").fetchall()
        print(f"{count:,} events: " + ", ".join(f"{t} {n:,}" for t, n in types))

        env = {**os.environ, "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
        commands = {
            f"chat-replay --format {args.format}": (replay_command() + ["--format", args.format], env),
            "sqlite3 -json": ([shell, "-json", str(path), SHELL_QUERY], None),
            "sqlite3 (.mode list)": ([shell, str(path), SHELL_QUERY], None),
        }
        check_same_rows(commands[f"chat-replay --format {args.format}"][0][:-2], env, shell, path)
        # Warm the page cache and check every command works before timing.
        for cmd, cmd_env in commands.values():
            timed(cmd, cmd_env)
        # Alternate the commands run after run, so that a busy machine slows
        # them alike; the best run of each counts.
        best = dict.fromkeys(commands, float("inf"))
        cpu = dict.fromkeys(commands, float("inf"))
        for _ in range(args.runs):
            for label, (cmd, cmd_env) in commands.items():
                wall, used = timed(cmd, cmd_env)
                if args.verbose:
                    print(f"  {label:<28} {wall:8.3f} s, CPU {used:.3f} s", flush=True)
                best[label] = min(best[label], wall)
                cpu[label] = min(cpu[label], used)

        ours_label = next(iter(commands))
        ours = best[ours_label]
        print(f"\nbest of {args.runs} runs, output to /dev/null; CPU is user + system of the process")
        print(f"{'command':<28} {'seconds':>8} {'rows/s':>12} {'CPU s':>8}")
        for label, seconds in best.items():
            print(f"{label:<28} {seconds:8.3f} {count / seconds:12,.0f} {cpu[label]:8.3f}")
        for label in list(commands)[1:]:
            print(f"ratio {ours_label} / {label}: {ours / best[label]:.2f}")
        print(f"CPU ratio {ours_label} / sqlite3 -json: {cpu[ours_label] / cpu['sqlite3 -json']:.2f}")
        ratio = ours / best["sqlite3 -json"]
        verdict = "meets" if ratio <= 2.0 else "MISSES"
        print(f"{verdict} the target (<= 2.00 x sqlite3 -json): {ratio:.2f}")
        return 0 if ratio <= 2.0 else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
