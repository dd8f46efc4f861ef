#!/usr/bin/env python3
"""Cluster benchmark: our server as two processes on one PostgreSQL log, next
to the same load on one process, and next to the tutorial's Node server run
as two processes with socket.io's Redis adapter (issue 11, Performance).

What it does, every step bounded in time and on 127.0.0.1 only:

1. copies the shared bench folder (``../shared/bench``; read-only) and
   ``bench/peer-cluster`` to a scratch folder and runs ``npm ci`` in the
   load generator's folder and in the peer's, and puts
   ``bench/cluster_loadgen.js`` next to the shared load generator (it uses
   the ``ws`` installed there);
2. starts one PostgreSQL 15 cluster (``/usr/lib/postgresql/15/bin``, as the
   ``postgres`` user when run as root, fsync on) and migrates a template
   database once; every run of our server gets a fresh database copied from
   it (``CREATE DATABASE ... TEMPLATE``);
3. for every repetition, runs each configuration in turn (their order
   alternates between repetitions):

   - ``ours1``: one ``python -m chatserver`` process, all clients on it;
   - ``ours2``: two processes on the same database, clients split between
     them (client i on process i mod 2; the senders alternate too);
   - ``node2``: two processes of ``bench/peer-cluster/server.js`` (socket.io
     4.8 + ``@socket.io/redis-adapter`` 8.3 over ``redis`` 4.7, user list
     in a Redis sorted set) and a ``redis-server`` of their own;

   (``oursN`` / ``nodeN`` for any N work too). Every server process, the
   PostgreSQL cluster and redis-server are pinned to one core
   (``--server-cpu``, default 0) and the load generator to another
   (``--loadgen-cpu``, default 1) with ``taskset``. So the two processes of
   a pair share one core: the figures compare what the cluster costs, not
   what a second core would add;
4. prints the medians of every figure, and the targets of issue 11 as the
   median of per-repetition ratios (runs of one repetition are made back to
   back, so the noise of a shared machine cancels out as far as it can), and
   can write everything as JSON.

The load, on 200 logged-in clients (``bench/cluster_loadgen.js``): a
warm-up (10 chats per sender, closed loop); then ``fixed``: 10 senders x
3 chats/s for 10 s (latency); then ``closed``: each sender sends 300 chats,
the next on its own echo (``--window`` 1 outstanding, as in compare.py:
deliveries/s then follows the round trip, commit included, more than the
server's CPU; ``--window 4`` shows capacity instead). 64-byte chats.

Figures:

- deliveries/s: chats received by all clients in the closed phase, over its
  duration (first send to last receipt);
- server CPU per delivery (us): utime+stime from /proc of the chat processes
  over the closed phase, per delivery; and the same including the database
  (the PostgreSQL postmaster and all its backends) or Redis (redis-server);
  the chat processes' write system calls per delivery (``syscw`` of
  /proc/<pid>/io: how well writes to one socket are coalesced); and, over
  the whole run, PostgreSQL transactions and scans of ``events`` per event
  appended (``pg_stat_database``, ``pg_stat_user_tables``);
- latency (ms, fixed phase), per delivery, same-process (the receiver is on
  the sender's process) and cross-process:

  - send->delivery: the sender's emit to the receiver's receipt (all three
    configurations);
  - commit->delivery: the chat's ``time`` (our ``recorded_at``, taken in the
    append transaction just before its INSERT and COMMIT, so it includes the
    commit itself) to the receipt; the same host's clock on both sides;
  - ack->delivery: the sender's receipt of its acknowledgement (sent after
    the commit) to the receipt; negative when the delivery came first.

  The targets use send->delivery and commit->delivery p99: cross-process
  (two processes) over same-process (same run; and over the one-process
  run).

Checks (listed under "Problems seen", exit status 1): every client received
every chat exactly once, each sender's chats in order, and (ours) positions
strictly increasing on every client and one delivery order shared by all
clients; no load generator error; no ERROR line or traceback in our servers'
logs. For the Node pair the number of distinct delivery orders among the
clients is a figure, not a problem: its adapter does not order across
processes.

Every process this script starts is stopped before it returns.

    .venv/bin/python bench/cluster.py                     # 3 repetitions, ~4 minutes
    .venv/bin/python bench/cluster.py --repeat 1 --configs ours1,ours2
    .venv/bin/python bench/cluster.py --repeat 5 --json cluster.json
    .venv/bin/python bench/cluster.py --repeat 1 --configs ours1,ours2 --profile   # where the CPU goes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import free_port, stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CONFIG_RE = re.compile(r"^(ours|node)([1-9])$")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- PostgreSQL -------------------------------------------------------------------


class Postgres:
    """One throwaway PostgreSQL 15 cluster on a free loopback port, pinned."""

    def __init__(self, cpu: str) -> None:
        self.cpu = cpu
        self.dir = Path(tempfile.mkdtemp(prefix="chatbench-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        self.started = False

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout)[-500:]}")

    def start(self) -> None:
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        data = self.dir / "data"
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
        # taskset before pg_ctl: the postmaster and every backend inherit the core.
        self._run(
            "taskset", "-c", self.cpu, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(self.dir / "log"),
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on", "start",
        )
        self.started = True

    @property
    def postmaster_pid(self) -> int:
        return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])

    def url(self, name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def sql(self, statement: str) -> None:
        self._run(str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", statement, timeout=60)

    def query(self, db: str, statement: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        done = subprocess.run(
            [*prefix, str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
             "-At", "-F", " ", "-c", statement], capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr[-300:]}")
        return done.stdout.split()

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast", "stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- one benchmark session ------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    scratch: Path
    pg: Postgres | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    run_no: int = 0

    @property
    def loadgen_dir(self) -> Path:
        return self.scratch / "bench" / "loadgen"

    @property
    def peer_dir(self) -> Path:
        return self.scratch / "peer-cluster"

    def python(self) -> str:
        return str(Path(self.args.venv) / "bin" / "python")

    def prepare(self, kinds: set[str]) -> None:
        shared = Path(self.args.shared).resolve()
        if not (shared / "loadgen" / "package-lock.json").is_file():
            raise SystemExit(f"{shared}/loadgen not found: pass --shared or set CHAT_BENCH_SHARED")
        target = self.scratch / "bench"
        if not (self.loadgen_dir / "node_modules").is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(shared, target)
            for path in [target, *target.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)  # the copy of a read-only folder
            self.npm_ci(self.loadgen_dir)
        shutil.copyfile(HERE / "cluster_loadgen.js", self.loadgen_dir / "cluster_loadgen.js")
        if "node" in kinds:
            if shutil.which(self.args.redis_server) is None:
                raise SystemExit(f"{self.args.redis_server} not found (apt-get install -y redis-server)")
            if not (self.peer_dir / "node_modules").is_dir():
                if self.peer_dir.exists():
                    shutil.rmtree(self.peer_dir)
                self.peer_dir.mkdir()
                for name in ("server.js", "package.json", "package-lock.json"):
                    shutil.copyfile(HERE / "peer-cluster" / name, self.peer_dir / name)
                self.npm_ci(self.peer_dir)
        if "ours" in kinds:
            if not (PG_BIN / "initdb").exists():
                raise SystemExit(f"PostgreSQL not found in {PG_BIN} (set PG_BIN)")
            self.pg = Postgres(self.args.server_cpu)
            log(f"starting PostgreSQL on 127.0.0.1:{self.pg.port} (core {self.args.server_cpu}), migrating a template")
            self.pg.start()
            self.pg.sql("CREATE DATABASE chat_template")
            subprocess.run(
                [self.python(), "-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head"],
                cwd=REPO, env={**self.clean_env(), "CHAT_DATABASE_URL": self.pg.url("chat_template")},
                check=True, capture_output=True, timeout=120,
            )

    def npm_ci(self, folder: Path) -> None:
        log(f"npm ci in {folder}")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=folder, check=True, timeout=300, stdout=sys.stderr)

    @staticmethod
    def clean_env() -> dict[str, str]:
        # None of the caller's CHAT_* settings: the servers run on their defaults.
        return {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}

    def spawn(self, cmd: list[str], env: dict[str, str], logfile: Path, cwd: Path) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as out:  # a file, not a pipe nobody drains
            proc = subprocess.Popen(["taskset", "-c", self.args.server_cpu, *cmd], cwd=cwd, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc, signal.SIGKILL, 5)
        self.started.clear()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None

    # -- the servers of one run ------------------------------------------------------
    @contextlib.contextmanager
    def ours(self, count: int) -> Iterator[tuple[list[int], list[int], list[int], list[Path], dict[str, Any]]]:
        assert self.pg is not None
        db = f"run{self.run_no}"
        self.pg.sql(f"CREATE DATABASE {db} TEMPLATE chat_template")
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []
        ports = [free_port() for _ in range(count)]
        try:
            for i, port in enumerate(ports):
                env = {**self.clean_env(), "HOST": "127.0.0.1", "PORT": str(port),
                       "CHAT_DATABASE_URL": self.pg.url(db), "CHAT_NODE_ID": f"bench-{chr(97 + i)}"}
                for item in self.args.server_env:
                    key, _, value = item.partition("=")
                    env[key] = value
                logfile = self.scratch / f"run{self.run_no}-ours-{i}.log"
                logs.append(logfile)
                cmd = [self.python(), "-m", "chatserver"]
                if self.args.profile:
                    # The sampling profiler prints its report into the server's log at exit.
                    folded = self.scratch / f"run{self.run_no}-ours-{i}.folded"
                    cmd = [self.python(), str(HERE / "profile_server.py"), "--window-signals", "--folded", str(folded)]
                procs.append(self.spawn(cmd, env, logfile, REPO))
            for port, proc in zip(ports, procs, strict=True):
                wait_listening(port, proc, 30, "our server")
            db_stats: dict[str, Any] = {}
            yield ports, [p.pid for p in procs], [self.pg.postmaster_pid], logs, db_stats
            db_stats.update(follow_reads(ports))
        finally:
            for proc in procs:
                stop_process(proc, signal.SIGINT)
                self.started.remove(proc)
            # Whole-run counts, read once the servers' backends have exited
            # (a backend reports its statistics by the time it ends).
            with contextlib.suppress(Exception):
                time.sleep(0.5)
                commits, head = self.pg.query(
                    db, f"SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'), "
                    "(SELECT coalesce(max(position), 0) FROM events)")
                scans = self.pg.query(
                    db, "SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) FROM pg_stat_user_tables "
                    "WHERE relname = 'events'")
                db_stats.update(transactions=int(commits), events=int(head), events_scans=int(scans[0]))
            with contextlib.suppress(Exception):
                self.pg.sql(f"DROP DATABASE IF EXISTS {db}")

    @contextlib.contextmanager
    def node(self, count: int) -> Iterator[tuple[list[int], list[int], list[int], list[Path], dict[str, Any]]]:
        redis_port = free_port()
        redis_dir = self.scratch / f"redis{self.run_no}"
        redis_dir.mkdir(exist_ok=True)
        redis_log = self.scratch / f"run{self.run_no}-redis.log"
        redis = self.spawn(
            [self.args.redis_server, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(redis_dir), "--protected-mode", "yes"],
            dict(os.environ), redis_log, self.scratch,
        )
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []
        ports = [free_port() for _ in range(count)]
        try:
            wait_listening(redis_port, redis, 15, "redis-server")
            for i, port in enumerate(ports):
                env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port),
                       "REDIS_URL": f"redis://127.0.0.1:{redis_port}", "NODE_NAME": f"node-{chr(97 + i)}"}
                logfile = self.scratch / f"run{self.run_no}-node-{i}.log"
                logs.append(logfile)
                procs.append(self.spawn(["node", str(self.peer_dir / "server.js")], env, logfile, self.peer_dir))
            for port, proc in zip(ports, procs, strict=True):
                wait_listening(port, proc, 30, "the Node peer")
            yield ports, [p.pid for p in procs], [redis.pid], logs, {}
        finally:
            for proc in [*procs, redis]:
                stop_process(proc, signal.SIGTERM)
                self.started.remove(proc)
            shutil.rmtree(redis_dir, ignore_errors=True)

    # -- one measurement ---------------------------------------------------------------
    def run(self, config: str) -> dict[str, Any]:
        kind, count = parse_config(config)
        self.run_no += 1
        servers = self.ours(count) if kind == "ours" else self.node(count)
        max_s = 120 + 2 * self.args.fixed_k / self.args.rate
        with servers as (ports, pids, aux, logs, db_stats):
            cmd = [
                "taskset", "-c", self.args.loadgen_cpu, "node", str(self.loadgen_dir / "cluster_loadgen.js"),
                "--urls", ",".join(f"http://127.0.0.1:{p}" for p in ports),
                "--server-pids", ",".join(map(str, pids)), "--aux-trees", ",".join(map(str, aux)),
                "--n", str(self.args.clients), "--m", str(self.args.senders), "--warm", "10",
                "--rate", str(self.args.rate), "--fixed-k", str(self.args.fixed_k),
                "--closed-k", str(self.args.closed_k), "--window", str(self.args.window), "--size", "64",
                "--acks", "1" if kind == "ours" else "0", "--clk-tck", str(os.sysconf("SC_CLK_TCK")),
                "--timeout-s", "60", "--max-s", str(int(max_s)), "--label", config,
                "--mark-window", "1" if self.args.profile and kind == "ours" else "0",
            ]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=max_s + 30)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                result = json.loads(lines[-1]) if lines else {"error": f"no output: {done.stderr[-500:]}"}
            except subprocess.TimeoutExpired:
                result = {"error": "load generator timed out"}
        if db_stats:
            result["database"] = db_stats
        problems = check(result, kind)
        for logfile in logs:
            lines = logfile.read_text(errors="replace").splitlines()
            if kind == "ours":
                bad = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]
                warned = [ln for ln in lines if " WARNING " in ln]
                if warned:
                    problems.append(f"{len(warned)} warnings in {logfile.name}, first: {warned[0][:200]}")
            else:  # the peer logs nothing but its start line, unless something failed
                bad = [ln for ln in lines if ln.strip() and "listening on" not in ln]
            if bad:
                problems.append(f"{len(bad)} error lines in {logfile.name}, first: {bad[0][:200]}")
        return {"config": config, "raw": result, "figures": extract(result), "problems": problems}


FOLLOW_LINE = re.compile(r'^chat_log_(follow_reads|followed_events)_total\{via="(\w+)"\} (\S+)$', re.M)


def follow_reads(ports: list[int]) -> dict[str, int]:
    """Whole-run counts from our servers' /metrics, summed: reads of other
    processes' events (``follow_reads_signal``: by the follower, each its own
    transaction; ``follow_reads_append``: in an append's transaction) and the
    events they brought."""
    totals: dict[str, int] = {}
    for port in ports:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            for what, via, value in FOLLOW_LINE.findall(text):
                key = f"{what}_{via}"
                totals[key] = totals.get(key, 0) + int(float(value))
    return totals


def parse_config(config: str) -> tuple[str, int]:
    m = CONFIG_RE.match(config)
    if not m:
        raise ValueError(config)
    return m.group(1), int(m.group(2))


# -- figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    digits: int = 1


FIGURES = (
    Figure("deliveries_per_s", "deliveries/s (closed loop)", 0),
    Figure("us_per_delivery", "server CPU per delivery, chat processes, us", 2),
    Figure("us_per_delivery_all", "server CPU per delivery incl. PostgreSQL / Redis, us", 2),
    Figure("writes_per_delivery", "server write syscalls per delivery (/proc/<pid>/io syscw)", 3),
    Figure("server_cpu_pct", "closed loop: chat processes' CPU, % of a core", 0),
    Figure("aux_cpu_pct", "closed loop: PostgreSQL / Redis CPU, % of a core", 0),
    Figure("loadgen_cpu_pct", "closed loop: load generator CPU, % of a core", 0),
    Figure("closed_send_same_p99", "closed loop: send->delivery p99, same process, ms", 1),
    Figure("closed_send_cross_p99", "closed loop: send->delivery p99, cross-process, ms", 1),
    Figure("send_same_p50", "send->delivery p50, same process, ms", 2),
    Figure("send_same_p99", "send->delivery p99, same process, ms", 2),
    Figure("send_cross_p50", "send->delivery p50, cross-process, ms", 2),
    Figure("send_cross_p99", "send->delivery p99, cross-process, ms", 2),
    Figure("commit_same_p50", "commit->delivery p50, same process, ms", 2),
    Figure("commit_same_p99", "commit->delivery p99, same process, ms", 2),
    Figure("commit_cross_p50", "commit->delivery p50, cross-process, ms", 2),
    Figure("commit_cross_p99", "commit->delivery p99, cross-process, ms", 2),
    Figure("ack_cross_p50", "sender's ack->delivery p50, cross-process, ms", 2),
    Figure("ack_cross_p99", "sender's ack->delivery p99, cross-process, ms", 2),
    Figure("fixed_us_per_delivery_all", "fixed rate: CPU per delivery incl. PostgreSQL / Redis, us", 1),
    Figure("db_transactions_per_event", "whole run: PostgreSQL transactions per event appended", 2),
    Figure("db_scans_per_event", "whole run: scans of the events table per event appended", 2),
    Figure("follow_reads_per_event", "whole run: follower reads (own transactions) per event appended", 2),
    Figure("append_reads_per_event", "whole run: reads in an append's transaction per event appended", 2),
    Figure("distinct_orders", "distinct delivery orders among the clients (closed loop)", 0),
)

NAN = float("nan")


def extract(r: dict[str, Any]) -> dict[str, float]:
    fixed = r.get("fixed") or {}
    closed = r.get("closed") or {}
    f: dict[str, float] = {}
    cpu = closed.get("cpu") or {}
    delivered = closed.get("delivered") or 0
    f["deliveries_per_s"] = closed.get("deliveries_per_s", NAN)
    f["us_per_delivery"] = 1e6 * cpu["server_cpu_s"] / delivered if delivered and "server_cpu_s" in cpu else NAN
    f["us_per_delivery_all"] = (1e6 * (cpu["server_cpu_s"] + cpu["aux_cpu_s"]) / delivered
                                if delivered and "server_cpu_s" in cpu else NAN)
    writes = cpu.get("server_write_syscalls")
    f["writes_per_delivery"] = writes / delivered if delivered and isinstance(writes, (int, float)) else NAN
    f["server_cpu_pct"] = cpu.get("server_cpu_pct", NAN)
    f["aux_cpu_pct"] = cpu.get("aux_cpu_pct", NAN)
    f["loadgen_cpu_pct"] = cpu.get("loadgen_cpu_pct", NAN)
    for prefix, phase in (("closed_", closed), ("", fixed)):
        lat = phase.get("latency_ms") or {}
        for kind in ("send", "commit", "ack"):
            for where in ("same", "cross"):
                s = lat.get(f"{kind}_{where}") or {}
                for q in ("p50", "p99"):
                    f[f"{prefix}{kind}_{where}_{q}"] = s.get(q, NAN)
    fcpu = fixed.get("cpu") or {}
    fdel = fixed.get("delivered") or 0
    f["fixed_us_per_delivery_all"] = (1e6 * (fcpu["server_cpu_s"] + fcpu["aux_cpu_s"]) / fdel
                                      if fdel and "server_cpu_s" in fcpu else NAN)
    db = r.get("database") or {}
    events = db.get("events") or 0
    f["db_transactions_per_event"] = db["transactions"] / events if events and "transactions" in db else NAN
    f["db_scans_per_event"] = db["events_scans"] / events if events and "events_scans" in db else NAN
    f["follow_reads_per_event"] = db.get("follow_reads_signal", 0) / events if events and db else NAN
    f["append_reads_per_event"] = db.get("follow_reads_append", 0) / events if events and db else NAN
    f["distinct_orders"] = (closed.get("checks") or {}).get("distinct_orders", NAN)
    return f


def check(r: dict[str, Any], kind: str) -> list[str]:
    problems = []
    if r.get("error"):
        problems.append(f"error: {r['error']} {r.get('errors', '')}")
    if r.get("errors"):
        problems.append(f"{r['errors']} load generator errors, first: {r.get('first_errors')}")
    for name in ("fixed", "closed"):
        phase = r.get(name)
        if phase is None:
            if not r.get("error"):
                problems.append(f"{name}: no result")
            continue
        c = phase.get("checks") or {}
        if not phase.get("complete"):
            problems.append(f"{name}: {phase.get('delivered')} of {phase.get('expected')} delivered "
                            f"({c.get('missing')} missing)")
        for key in ("duplicates", "fifo_violations", "ack_errors"):
            if c.get(key):
                problems.append(f"{name}: {c[key]} {key.replace('_', ' ')}")
        if kind == "ours":
            if c.get("position_order_violations"):
                problems.append(f"{name}: {c['position_order_violations']} deliveries out of position order")
            if c.get("distinct_orders") != 1:
                problems.append(f"{name}: {c.get('distinct_orders')} distinct delivery orders among the clients")
            if c.get("chats_delivered_never_acked"):
                problems.append(f"{name}: {c['chats_delivered_never_acked']} chats delivered but never acked")
    return problems


# -- targets (ratios per repetition, then their median) ---------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    num: tuple[str, str]  # (config, figure)
    den: tuple[str, str]
    better: str  # "higher" or "lower"
    bound: float | None


def targets(configs: list[str]) -> list[Target]:
    ours = [c for c in configs if c.startswith("ours")]
    nodes = [c for c in configs if c.startswith("node")]
    multi = next((c for c in ours if c != "ours1"), None)
    node_multi = next((c for c in nodes if c != "node1"), None)
    out: list[Target] = []
    if multi:
        out += [
            Target(f"{multi}: send->delivery p99, cross-process / same process (same run)",
                   (multi, "send_cross_p99"), (multi, "send_same_p99"), "lower", 2.0),
            Target(f"{multi}: commit->delivery p99, cross-process / same process (same run)",
                   (multi, "commit_cross_p99"), (multi, "commit_same_p99"), "lower", 2.0),
        ]
        if "ours1" in ours:
            out += [
                Target(f"send->delivery p99: {multi} cross-process / ours1",
                       (multi, "send_cross_p99"), ("ours1", "send_same_p99"), "lower", 2.0),
                Target(f"commit->delivery p99: {multi} cross-process / ours1",
                       (multi, "commit_cross_p99"), ("ours1", "commit_same_p99"), "lower", 2.0),
                Target(f"CPU per delivery, chat processes: {multi} / ours1",
                       (multi, "us_per_delivery"), ("ours1", "us_per_delivery"), "lower", 1.5),
                Target(f"CPU per delivery incl. PostgreSQL: {multi} / ours1",
                       (multi, "us_per_delivery_all"), ("ours1", "us_per_delivery_all"), "lower", 1.5),
                Target(f"deliveries/s: {multi} / ours1",
                       (multi, "deliveries_per_s"), ("ours1", "deliveries_per_s"), "higher", None),
            ]
    if node_multi:
        out.append(Target(f"{node_multi}: send->delivery p99, cross-process / same process (same run)",
                          (node_multi, "send_cross_p99"), (node_multi, "send_same_p99"), "lower", None))
        if multi:
            out += [
                Target(f"deliveries/s: {multi} / {node_multi}",
                       (multi, "deliveries_per_s"), (node_multi, "deliveries_per_s"), "higher", 1.0),
                Target(f"CPU per delivery, chat processes: {multi} / {node_multi}",
                       (multi, "us_per_delivery"), (node_multi, "us_per_delivery"), "lower", None),
                Target(f"CPU per delivery incl. PostgreSQL / Redis: {multi} / {node_multi}",
                       (multi, "us_per_delivery_all"), (node_multi, "us_per_delivery_all"), "lower", None),
                Target(f"send->delivery p99, cross-process: {multi} / {node_multi}",
                       (multi, "send_cross_p99"), (node_multi, "send_cross_p99"), "lower", None),
            ]
    return out


def median(values: list[float]) -> float:
    good = [v for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.median(good) if good else NAN


def fmt(value: float, digits: int) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def summarize(results: dict[str, list[dict[str, Any]]], configs: list[str]) -> dict[str, Any]:
    figures = []
    for fig in FIGURES:
        row: dict[str, Any] = {"figure": fig.key, "label": fig.label}
        for config in configs:
            values = [run["figures"].get(fig.key, NAN) for run in results[config]]
            row[config] = median(values)
            row[f"{config}_runs"] = values
        figures.append(row)
    rows = []
    for t in targets(configs):
        ratios = []
        for a, b in zip(results[t.num[0]], results[t.den[0]], strict=False):
            x, y = a["figures"].get(t.num[1], NAN), b["figures"].get(t.den[1], NAN)
            ratios.append(x / y if y and y == y and x == x else NAN)
        ratio = median(ratios)
        row = {"target": t.label, "ratio": ratio, "ratio_runs": ratios, "bound": t.bound, "better": t.better}
        if t.bound is not None and ratio == ratio:
            row["met"] = ratio >= t.bound if t.better == "higher" else ratio <= t.bound
        rows.append(row)
    return {"figures": figures, "targets": rows}


def print_summary(summary: dict[str, Any], configs: list[str], heading: str) -> None:
    digits = {f.key: f.digits for f in FIGURES}
    print(f"\n{heading}\n")
    print("| figure | " + " | ".join(configs) + " |")
    print("|---|" + "---|" * len(configs))
    for row in summary["figures"]:
        if all(row[c] != row[c] for c in configs):
            continue  # n/a everywhere (e.g. commit times with Node only)
        print(f"| {row['label']} | " + " | ".join(fmt(row[c], digits[row['figure']]) for c in configs) + " |")
    if summary["targets"]:
        print("\n| ratio (median of per-repetition ratios) | value | per repetition | target | met |")
        print("|---|---|---|---|---|")
        for row in summary["targets"]:
            bound = "" if row["bound"] is None else (">= " if row["better"] == "higher" else "<= ") + f"{row['bound']:g}"
            met = "" if "met" not in row else ("yes" if row["met"] else "NO")
            runs = ", ".join(fmt(v, 2) for v in row["ratio_runs"])
            print(f"| {row['target']} | {fmt(row['ratio'], 2)} | {runs} | {bound} | {met} |")


def default_shared() -> Path:
    for base in (REPO.parent, REPO.parent.parent):  # the main checkout, or a worktree under wt/
        if (base / "shared" / "bench").is_dir():
            return base / "shared" / "bench"
    return REPO.parent / "shared" / "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("CHAT_BENCH_SHARED", str(default_shared())),
                        help="the shared bench folder (default <repo>/../shared/bench, or ../../shared/bench "
                        "from a worktree; env CHAT_BENCH_SHARED)")
    parser.add_argument("--venv", default=str(REPO / ".venv"), help="our virtualenv (default <repo>/.venv)")
    parser.add_argument("--scratch", help="scratch folder to reuse (default: a new temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (server logs)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--configs", default="ours1,ours2,node2",
                        help="oursN (N chat processes on one PostgreSQL) and nodeN (N Node processes + Redis)")
    parser.add_argument("--server-cpu", default="0", help="core(s) of every server process, PostgreSQL and Redis")
    parser.add_argument("--loadgen-cpu", default="1", help="core(s) of the load generator")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for our server (repeatable)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--rate", type=float, default=3.0, help="chats/s per sender in the fixed phase")
    parser.add_argument("--fixed-k", type=int, default=30, help="chats per sender in the fixed phase")
    parser.add_argument("--closed-k", type=int, default=300, help="chats per sender in the closed loop")
    parser.add_argument("--window", type=int, default=1,
                        help="chats outstanding per sender in the closed loop (1: deliveries/s follows the "
                        "commit latency; more: it approaches what the server core can do)")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--profile", action="store_true",
                        help="run our servers under bench/profile_server.py, sampling the closed loop only "
                        "(reports in the kept scratch folder's server logs, folded stacks beside them); "
                        "implies --keep; its figures are not benchmark figures")
    parser.add_argument("--json", help="write every run and the summary to this file")
    args = parser.parse_args(argv)
    args.keep = args.keep or args.profile

    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if not CONFIG_RE.match(c):
            parser.error(f"unknown configuration {c!r} (oursN or nodeN)")
    for tool in ("taskset", "node", "npm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")

    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="chatbench-cluster-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, scratch)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    started_at = dt.datetime.now(dt.UTC)
    interrupted = False
    try:
        bench.prepare({parse_config(c)[0] for c in configs})
        for rep in range(args.repeat):
            # Alternate the order so a drift in the machine's load does not
            # always favour the same configuration.
            order = configs if rep % 2 == 0 else list(reversed(configs))
            for config in order:
                log(f"run {rep + 1}/{args.repeat}: {config}")
                run = bench.run(config)
                results[config].append(run)
                f = run["figures"]
                log(f"  {fmt(f['deliveries_per_s'], 0)} deliveries/s, {fmt(f['us_per_delivery'], 2)} us "
                    f"({fmt(f['us_per_delivery_all'], 2)} us incl. db/redis) per delivery; send->delivery p99 "
                    f"same {fmt(f['send_same_p99'], 2)} / cross {fmt(f['send_cross_p99'], 2)} ms; commit->delivery "
                    f"p99 same {fmt(f['commit_same_p99'], 2)} / cross {fmt(f['commit_cross_p99'], 2)} ms")
                for problem in run["problems"]:
                    log(f"  PROBLEM: {problem}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: summarising what was measured")
    finally:
        bench.stop_all()

    summary = summarize(results, configs)
    heading = (
        f"{started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; servers, PostgreSQL and Redis pinned to core "
        f"{args.server_cpu}, load generator to core {args.loadgen_cpu} (taskset); {args.clients} clients split "
        f"round-robin over the processes, {args.senders} senders, 64-byte chats; latency at "
        f"{args.senders} x {args.rate:g} chats/s, throughput and CPU in a closed loop of {args.closed_k} "
        f"chats per sender, {args.window} outstanding. Medians of {args.repeat} repetition(s)."
    )
    print_summary(summary, configs, heading)
    problems = [(c, i, p) for c, runs in results.items() for i, run in enumerate(runs) for p in run["problems"]]
    if problems:
        print("\nProblems seen:")
        for c, i, p in problems:
            print(f"- {c} / run {i + 1}: {p}")
    if args.json:
        doc = {
            "started_at": started_at.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "host": {"cpus": os.cpu_count(),
                     "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()},
            "params": vars(args),
            "summary": summary,
            "runs": results,
            "problems": [{"config": c, "run": i + 1, "problem": p} for c, i, p in problems],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        log(f"wrote {args.json}")
    if own_scratch and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    elif args.keep:
        log(f"kept {scratch}")
    return 130 if interrupted else (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
