"""Benchmark: the longest append stall while `chatserver rebuild-projections`
runs against a live server.

Seeds a migrated SQLite file with N events (default 1,000,000) by U users
(default 100,000: resume_tokens gets one row per name) written straight into
the `events` table, with the projection's position at the head but its tables
emptied (the worst case: every row must be written again; `--intact` rebuilds
them first so that the measured rebuild finds nothing to change). Starts the
server (`python -m chatserver`, its own process), then real Socket.IO clients
append continuously: one chats with acknowledgements, one logs seeded and
fresh names in and out. After `--baseline` seconds of that, it runs
`python -m chatserver rebuild-projections` and reports, for acks sent before
and during the rebuild, p50 / p99 / max round trip, and every failure.

    .venv/bin/python bench/rebuild_bench.py
    .venv/bin/python bench/rebuild_bench.py --events 200000 --names 20000
    .venv/bin/python bench/rebuild_bench.py --ref 69f4ba5   # the rebuild as of a commit

Uses only 127.0.0.1 and stops what it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Client, ServerProcess, migrate, sqlite_url  # noqa: E402


def seed(path: Path, count: int, names: int) -> None:
    """Sessions (a login with a resume hash, a join, 0-5 chats, a leave) by
    random users, streamed into the file in chunks; the sessions still open at
    the end stay online on a node no server has."""
    rng = random.Random(count)
    versions: dict[str, int] = {}
    online: dict[str, int] = {}
    clock = datetime(2026, 11, 1, tzinfo=UTC)
    chunk: list[tuple[Any, ...]] = []
    position = 0
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("BEGIN")

    def add(name: str, type_: str, payload: dict[str, object]) -> None:
        nonlocal position, clock
        position += 1
        clock += timedelta(microseconds=rng.randint(1, 20_000))
        stream = f"user-{name}"
        versions[stream] = versions.get(stream, 0) + 1
        chunk.append(
            (position, stream, versions[stream], type_, orjson.dumps(payload).decode(),
             clock.strftime("%Y-%m-%d %H:%M:%S.%f"))
        )
        if len(chunk) >= 50_000:
            flush()

    def flush() -> None:
        db.executemany(
            "INSERT INTO events (position, stream, version, type, payload, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
            chunk,
        )
        chunk.clear()

    while position < count:
        name = f"u{rng.randrange(names):06d}"
        left = online.get(name)
        if left is None:
            add(name, "UserLoggedIn", {"name": name, "session": rng.randbytes(16).hex(), "node": "seed",
                                       "resume_hash": rng.randbytes(32).hex(), "resumed": False})
            add(name, "UserJoined", {"name": name, "room": "lobby"})
            online[name] = rng.randrange(6)
        elif left == 0:
            add(name, "UserLeft", {"name": name, "reason": "disconnected", "room": "lobby"})
            del online[name]
        else:
            add(name, "MessagePosted", {"sender": name, "message": f"message number {position}", "room": "lobby"})
            online[name] = left - 1
    flush()
    db.execute("DELETE FROM online_users")
    db.execute("DELETE FROM resume_tokens")
    db.execute("DELETE FROM projection_positions")
    db.execute("INSERT INTO projection_positions VALUES ('online_users', ?)", (position,))
    db.execute("COMMIT")
    db.close()


class Load:
    """Appends through the server and times every acknowledgement."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = asyncio.Event()
        self.acks: list[tuple[float, float]] = []  # (sent at, seconds)
        self.failures: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _timed(self, client: Client, event: str, arg: str) -> None:
        started = time.monotonic()
        try:
            ack = await client.call(event, arg, timeout=60)
        except Exception as exc:  # a timeout is a result here
            ack = repr(exc)
        self.acks.append((started, time.monotonic() - started))
        if not (isinstance(ack, dict) and ack.get("ok")):
            self.failures.append(f"{event} {arg}: {ack}")

    async def _chat(self) -> None:
        client = await Client(self.url).connect()
        await client.login("chatter")
        i = 0
        while not self.stop.is_set():
            await self._timed(client, "chat", f"line {i}")
            i += 1
            await asyncio.sleep(0.005)
        await client.disconnect()

    async def _cycle(self) -> None:
        i = 0
        while not self.stop.is_set():
            client = await Client(self.url).connect()
            await self._timed(client, "login", f"cy{i % 1000}x")
            await client.disconnect()
            i += 1
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._chat()), asyncio.create_task(self._cycle())]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)


def summary(label: str, took: list[float]) -> str:
    if not took:
        return f"{label}: no acks"
    took = sorted(took)
    p50 = took[len(took) // 2]
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    return f"{label}: {len(took)} acks, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms"


async def measure(path: Path, source: Path, baseline: float) -> int:
    url = sqlite_url(path)
    server = ServerProcess(url, CHAT_RATE_PER_SECOND="100000", CHAT_RATE_BURST="100000").start(timeout=120)
    try:
        load = Load(server.url)
        load.start()
        await asyncio.sleep(baseline)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatserver", "rebuild-projections",
            cwd=source, env={**os.environ, "CHAT_DATABASE_URL": url},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        ended = time.monotonic()
        await asyncio.sleep(1)
        await load.finish()
    finally:
        server.terminate()
    print(out.decode().rstrip())
    print(f"rebuild-projections exit {proc.returncode} after {ended - started:.1f} s (process start included)")
    print(summary("acks before the rebuild", [t for at, t in load.acks if at < started]))
    print(summary("acks sent during the rebuild", [t for at, t in load.acks if started <= at <= ended]))
    stalled = [t for at, t in load.acks if at < ended and at + t > started]
    print(f"longest append stall overlapping the rebuild: {max(stalled, default=0) * 1000:.1f} ms")
    print(f"failed appends: {len(load.failures)}")
    for failure in load.failures[:10]:
        print(f"  {failure}")
    return 0 if proc.returncode == 0 and not load.failures else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events to seed (default 1,000,000)")
    parser.add_argument("--names", type=int, default=100_000, help="distinct users (default 100,000)")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of load before the rebuild")
    parser.add_argument("--intact", action="store_true", help="rebuild the tables first: the measured run changes nothing")
    parser.add_argument("--ref", help="run the rebuild command of this commit (its chatserver/ via git archive)")
    parser.add_argument("--keep", type=Path, help="seed this file (kept) instead of a temporary one; reused if present")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rebuild-bench-"))
    try:
        path = args.keep.resolve() if args.keep else tmp / "bench.db"
        if not path.exists():
            migrate(sqlite_url(path))
            start = time.perf_counter()
            seed(path, args.events, args.names)
            print(f"seeded {args.events:,} events by up to {args.names:,} users in {time.perf_counter() - start:.1f} s")
        source = ROOT
        if args.ref:
            source = tmp / "ref"
            source.mkdir()
            archive = subprocess.run(["git", "archive", args.ref, "chatserver"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
            print(f"rebuild-projections as of {args.ref}")
        if args.intact:
            subprocess.run([sys.executable, "-m", "chatserver", "rebuild-projections"], cwd=ROOT, check=True,
                           env={**os.environ, "CHAT_DATABASE_URL": sqlite_url(path)}, capture_output=True)
        return asyncio.run(measure(path, source, args.baseline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
