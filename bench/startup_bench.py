"""Benchmark: time from starting `chatserver` to its first HTTP answer.

Two databases, both migrated SQLite files: an empty log, and a log of
1,000,000 events (seeded as bench/replay_bench.py seeds it, then
`chatserver rebuild-projections` once, so the read models are current as a
running server leaves them). For each, `python -m chatserver` is started
--runs times (fresh process each time, a free loopback port) and
`GET /healthz` is polled every 5 ms from the moment the process is spawned;
the time to the first 200 is the figure, with the CPU the server process
used until then (less sensitive to other work on a shared machine). The process is then stopped with
SIGTERM. Prints every run and the median per database; the target is 1 s.

    .venv/bin/python bench/startup_bench.py                       # 1,000,000 events, 5 runs
    .venv/bin/python bench/startup_bench.py --events 200000 --runs 3
    .venv/bin/python bench/startup_bench.py --keep /tmp/startup   # keep (and reuse) the databases
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import replay_bench  # noqa: E402  (seeding: the same log the replay benchmark reads)

START_TIMEOUT = 60.0
TARGET = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def prepare(folder: Path, events: int) -> tuple[Path, Path]:
    empty, full = folder / "empty.db", folder / f"events-{events}.db"
    if not empty.exists():
        replay_bench.migrate(empty)
    if not full.exists():
        print(f"seeding {events:,} events ...", file=sys.stderr, flush=True)
        partial = full.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        replay_bench.seed(partial, events)
        subprocess.run(
            [sys.executable, "-m", "chatserver", "rebuild-projections"],
            cwd=ROOT, env={**os.environ, "CHAT_DATABASE_URL": url_of(partial)},
            check=True, capture_output=True, timeout=1800,
        )
        partial.rename(full)
    return empty, full


def answered(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used (Linux /proc): the figure that
    other work on a shared machine does not inflate."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_answer(database: Path) -> tuple[float, float]:
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "CHAT_DATABASE_URL": url_of(database),
           "CHAT_LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "chatserver"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if answered(port):
                return time.perf_counter() - started, cpu_seconds(proc.pid)
            if proc.poll() is not None:
                raise RuntimeError(f"chatserver exited with {proc.returncode}: {proc.stderr.read().decode()}")
            if time.perf_counter() - started > START_TIMEOUT:
                raise RuntimeError("no answer within 60 s")
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="folder for the databases (reused when present)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="chat-startup-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        empty, full = prepare(folder, args.events)
        results = {}
        for label, database in (("empty log", empty), (f"{args.events:,} events", full)):
            # One unmeasured start: the first reads the files from disk.
            first_answer(database)
            runs = [first_answer(database) for _ in range(args.runs)]
            wall = statistics.median(t for t, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            results[label] = wall
            print(f"{label:>18}: wall " + " ".join(f"{t:.3f}" for t, _ in runs) + f"  median {wall:.3f} s;"
                  f" server CPU median {cpu:.3f} s", flush=True)
        worst = max(results.values())
        print("first HTTP answer: " + ", ".join(f"{k} {v:.3f} s" for k, v in results.items())
              + f" (target <= {TARGET:g} s: {'met' if worst <= TARGET else 'not met'}; load average"
              f" {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
