#!/usr/bin/env python3
"""Side-by-side benchmark: our durable chat server against the tutorial's Node
server (the reference peer in ``<repo>/../shared/bench``).

What it does, every step bounded in time and on 127.0.0.1 only:

1. copies the shared bench folder (the peer and the load generator) to a
   scratch folder and runs ``npm ci`` there (the shared folder is read-only);
2. for every repetition and every scenario, starts our server (``chatserver``
   on a fresh migrated SQLite file, default durable settings) and the Node
   peer in turn, each pinned to one core with ``taskset``, and runs the same
   load generator command against each, pinned to the other core;
3. prints the medians of every figure and the median of the per-repetition
   ratios ours/peer (a ratio is taken between two runs made back to back, so
   the noise of a shared machine cancels out as far as it can), and can write
   everything as JSON.

Scenarios (the load generator's own, plus ``idle`` from ``bench/idle.js``):

- ``fanout``: 200 logged-in clients, 10 senders, 64-byte chats, closed loop
  (one chat outstanding per sender): deliveries/s and server CPU per delivery;
- ``fixed``: the same clients, 30 chats/s in all (10 senders x 3/s) for 10 s:
  end-to-end latency p50/p99;
- ``login``: 200 clients connect and log in at once, 5 rounds: logins/s;
- ``churn``: 50 observers, 20 workers cycling connect/login/onlineUsers/
  disconnect, 1,000 cycles: cycles/s;
- ``idle``: 1,000 logged-in idle clients: resident memory growth per client;
- ``rooms`` (our server only, ``bench/rooms.js``; the peer has no rooms):
  1,000 logged-in clients, 100 closed-loop senders, first chatting in the
  lobby (each chat to all 1,000), then in 20 rooms of 50 members (each chat to
  its room's 50; the senders spread evenly over the rooms, 20 times as many
  chats so both phases make the same number of deliveries), on one server
  process: deliveries/s and server CPU per delivery of both phases and their
  ratio rooms/lobby (target: CPU per delivery within 1.25x); 20-50 s a
  repetition. ``--rooms-phases lobby,rooms,all`` adds a control, one room of
  all 1,000 clients.

Our server runs with its default, durable settings (WAL, synchronous=FULL,
every chat committed before it is broadcast): no CHAT_* variable of the
caller's environment is passed on, and the script sets none (``--server-env``
adds some on purpose). The default per-socket rate limit (200 events/s, burst
400) is not reached: at ~130,000 deliveries/s each closed-loop sender sends
~65 chats/s. A refused chat would leave a run incomplete, and every
incomplete run, load-generator error or ERROR line in our server's log is
listed under "Problems seen" (exit status 1).

Every process this script starts is stopped before it returns (servers by
SIGINT/SIGTERM, then SIGKILL after a grace period).

    .venv/bin/python bench/compare.py                 # 3 repetitions, all scenarios, ~7 minutes
    .venv/bin/python bench/compare.py --repeat 5 --json bench-results.json
    .venv/bin/python bench/compare.py --scenarios fanout,fixed --repeat 1
    .venv/bin/python bench/compare.py --ref <commit>   # our server as of a commit
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import free_port, stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


# -- scenarios and the figures taken from them ---------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher" or "lower"
    target: float | None = None  # ratio ours/peer to meet (>= for higher, <= for lower)
    digits: int = 1
    # True: the target applies to our figure itself (a ratio between two of
    # our own measurements, such as rooms/lobby), not to ours/peer.
    own_target: bool = False
    optional: bool = False  # from a phase not run by default: no row when not measured


@dataclass(frozen=True)
class Scenario:
    name: str
    args: Callable[[argparse.Namespace], list[str]]
    extract: Callable[[dict[str, Any]], dict[str, float]]
    check: Callable[[dict[str, Any]], list[str]]
    metrics: tuple[Metric, ...]
    script: str = "loadgen.js"
    max_s: float = 120.0
    ours_only: bool = False  # the peer lacks the feature (rooms): our server only


def _cpu_us_per(result: dict[str, Any], count: float) -> float:
    cpu = (result.get("cpu") or {}).get("server_cpu_s")
    if cpu is None or not count:
        return float("nan")
    return 1e6 * float(cpu) / count


def _fanout_extract(r: dict[str, Any]) -> dict[str, float]:
    lat = r.get("latency_ms") or {}
    return {
        "deliveries_per_s": r.get("deliveries_per_s", float("nan")),
        "server_us_per_delivery": _cpu_us_per(r, r.get("delivered", 0)),
        "fanout_p50_ms": lat.get("p50", float("nan")),
        "fanout_p99_ms": lat.get("p99", float("nan")),
        "fanout_loadgen_cpu_pct": (r.get("cpu") or {}).get("loadgen_cpu_pct", float("nan")),
        "fanout_server_cpu_pct": (r.get("cpu") or {}).get("server_cpu_pct", float("nan")),
    }


def _fixed_extract(r: dict[str, Any]) -> dict[str, float]:
    lat = r.get("latency_ms") or {}
    return {
        "fixed_p50_ms": lat.get("p50", float("nan")),
        "fixed_p99_ms": lat.get("p99", float("nan")),
        "fixed_server_us_per_delivery": _cpu_us_per(r, r.get("delivered", 0)),
    }


def _common_problems(r: dict[str, Any]) -> list[str]:
    """What any load generator result can report: its own error, client errors."""
    problems = []
    if r.get("error"):
        problems.append(f"error: {r['error']}")
    if r.get("errors"):
        problems.append(f"{r['errors']} errors: {r.get('first_errors')}")
    return problems


def _fanout_check(r: dict[str, Any]) -> list[str]:
    problems = []
    if not r.get("complete"):
        problems.append(f"incomplete: {r.get('delivered')} of {r.get('expected')} delivered")
    if r.get("bad_payloads"):
        problems.append(f"{r['bad_payloads']} bad payloads")
    return problems


def _login_extract(r: dict[str, Any]) -> dict[str, float]:
    lat = r.get("login_latency_ms") or {}
    return {
        "logins_per_s": r.get("logins_per_s_median_of_rounds", float("nan")),
        "login_p99_ms": lat.get("p99", float("nan")),
        "server_ms_per_login": r.get("server_cpu_ms_per_login", float("nan")),
    }


def _login_check(r: dict[str, Any]) -> list[str]:
    problems = []
    n = (r.get("params") or {}).get("N")
    for i, rnd in enumerate(r.get("rounds") or []):
        if rnd.get("logins_ok") != n:
            problems.append(f"round {i}: {rnd.get('logins_ok')} of {n} logins")
    return problems


def _churn_extract(r: dict[str, Any]) -> dict[str, float]:
    lat = r.get("cycle_latency_ms") or {}
    return {
        "churn_cycles_per_s": r.get("cycles_per_s", float("nan")),
        "churn_cycle_p99_ms": lat.get("p99", float("nan")),
    }


def _churn_check(r: dict[str, Any]) -> list[str]:
    problems = []
    if r.get("failed"):
        problems.append(f"{r['failed']} failed cycles")
    expected = r.get("observer_expected_each")  # cycles x observers
    if expected is not None:
        for key in ("observer_userJoined", "observer_userLeft"):
            if r.get(key) != expected:
                problems.append(f"{key} {r.get(key)} != {expected}")
    return problems


def _idle_extract(r: dict[str, Any]) -> dict[str, float]:
    return {
        "rss_kb_per_client": r.get("rss_kb_per_client", float("nan")),
        "rss_mb_with_clients": r.get("rss_after_kb", float("nan")) / 1024,
    }


def _idle_check(r: dict[str, Any]) -> list[str]:
    problems = []
    n = (r.get("params") or {}).get("N")
    if r.get("logged_in") != n:
        problems.append(f"{r.get('logged_in')} of {n} logged in")
    return problems


def _rooms_extract(r: dict[str, Any]) -> dict[str, float]:
    nan = float("nan")
    out: dict[str, float] = {}
    for scope in ("lobby", "rooms", "all"):
        phase = r.get(scope) or {}
        lat = phase.get("latency_ms") or {}
        out[f"{scope}_deliveries_per_s"] = phase.get("deliveries_per_s", nan)
        out[f"{scope}_us_per_delivery"] = phase.get("server_us_per_delivery", nan)
        out[f"{scope}_us_per_chat"] = phase.get("server_us_per_chat", nan)
        out[f"{scope}_p99_ms"] = lat.get("p99", nan)
        out[f"{scope}_server_cpu_pct"] = (phase.get("cpu") or {}).get("server_cpu_pct", nan)
        out[f"{scope}_deliveries_per_write"] = phase.get("deliveries_per_write", nan)
    for scope in ("rooms", "all"):
        ratio = r.get(f"{scope}_over_lobby") or {}
        out[f"{scope}_lobby_cpu_ratio"] = ratio.get("server_us_per_delivery", nan)
        out[f"{scope}_lobby_deliveries_ratio"] = ratio.get("deliveries_per_s", nan)
    return out


def _rooms_check(r: dict[str, Any]) -> list[str]:
    problems = []
    phases = (r.get("params") or {}).get("phases") or ["lobby", "rooms"]
    for scope in phases:
        phase = r.get(scope)
        if not phase:
            problems.append(f"{scope} phase not run")
            continue
        if not phase.get("complete"):
            problems.append(f"{scope}: incomplete, {phase.get('delivered')} of {phase.get('expected')} delivered")
        bad = {k: v for k, v in (phase.get("checks") or {}).items() if v}
        if bad:
            problems.append(f"{scope}: checks failed {bad}")
    if r.get("position_order_violations"):
        problems.append(f"{r['position_order_violations']} deliveries out of log order")
    for scope, setup in (r.get("setup") or {}).items():
        if not isinstance(setup, dict):
            continue
        for key in ("roomJoined", "roomCreated"):
            if key in setup and setup[key] != setup.get(f"{key}_expected"):
                problems.append(f"{scope}: {key} events {setup[key]} != {setup.get(f'{key}_expected')}")
    return problems


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "fanout",
            lambda a: [
                "--scenario", "fanout", "--n", str(a.clients), "--m", "10", "--k", str(a.fanout_k),
                "--rate", "0", "--window", "1", "--warm", "10", "--size", "64", "--timeout-s", "90",
            ],
            _fanout_extract,
            _fanout_check,
            (
                Metric("deliveries_per_s", "fan-out deliveries/s (closed loop)", "higher", 1.5, 0),
                Metric("server_us_per_delivery", "server CPU per delivery, us", "lower", 0.5, 2),
                Metric("fanout_p50_ms", "fan-out latency p50, ms", "lower", None, 1),
                Metric("fanout_p99_ms", "fan-out latency p99, ms", "lower", None, 1),
                Metric("fanout_server_cpu_pct", "fan-out server CPU, % of a core", "lower", None, 0),
                Metric("fanout_loadgen_cpu_pct", "fan-out load generator CPU, % of a core", "lower", None, 0),
            ),
            max_s=150,
        ),
        Scenario(
            "fixed",
            lambda a: [
                "--scenario", "fanout", "--n", str(a.clients), "--m", "10", "--k", str(a.fixed_k),
                "--rate", "3", "--warm", "2", "--size", "64", "--timeout-s", "60",
            ],
            _fixed_extract,
            _fanout_check,
            (
                Metric("fixed_p50_ms", "latency p50 at 30 chats/s x 200, ms", "lower", None, 2),
                Metric("fixed_p99_ms", "latency p99 at 30 chats/s x 200, ms", "lower", 1.0, 2),
                Metric("fixed_server_us_per_delivery", "server CPU per delivery at 30 chats/s, us", "lower", None, 1),
            ),
            max_s=120,
        ),
        Scenario(
            "login",
            lambda a: ["--scenario", "login", "--n", str(a.clients), "--rounds", str(a.login_rounds)],
            _login_extract,
            _login_check,
            (
                Metric("logins_per_s", "logins/s (200 at once)", "higher", 1.0, 0),
                Metric("login_p99_ms", "login latency p99, ms", "lower", None, 0),
                Metric("server_ms_per_login", "server CPU per login, ms", "lower", None, 3),
            ),
            max_s=150,
        ),
        Scenario(
            "churn",
            lambda a: [
                "--scenario", "churn", "--b", "50", "--c", "20", "--l", str(a.churn_cycles),
                "--duration-s", "60",
            ],
            _churn_extract,
            _churn_check,
            (
                Metric("churn_cycles_per_s", "churn cycles/s", "higher", 1.0, 0),
                Metric("churn_cycle_p99_ms", "churn cycle latency p99, ms", "lower", None, 0),
            ),
            max_s=150,
        ),
        Scenario(
            "idle",
            lambda a: ["--n", str(a.idle_clients), "--conc", "50", "--warm", "20"],
            _idle_extract,
            _idle_check,
            (
                Metric("rss_kb_per_client", "RSS per idle logged-in client, kB", "lower", 2.0, 1),
                Metric("rss_mb_with_clients", "RSS with the idle clients, MB", "lower", None, 1),
            ),
            script="idle.js",
            max_s=300,
        ),
        Scenario(
            "rooms",
            lambda a: [
                "--n", str(a.rooms_clients), "--rooms", str(a.rooms), "--m", str(a.rooms_senders),
                "--lobby-k", str(a.rooms_lobby_k), "--warm", "3", "--window", "1", "--size", "64",
                "--timeout-s", "90", "--phases", a.rooms_phases,
            ],
            _rooms_extract,
            _rooms_check,
            (
                Metric("lobby_deliveries_per_s", "lobby x1000: deliveries/s (closed loop)", "higher", None, 0),
                Metric("lobby_us_per_delivery", "lobby x1000: server CPU per delivery, us", "lower", None, 2),
                Metric("lobby_us_per_chat", "lobby x1000: server CPU per chat, us", "lower", None, 0),
                Metric("lobby_p99_ms", "lobby x1000: latency p99, ms", "lower", None, 0),
                Metric("lobby_deliveries_per_write", "lobby x1000: deliveries per server write call", "higher", None, 1),
                Metric("rooms_deliveries_per_s", "rooms 20x50: deliveries/s (closed loop)", "higher", None, 0),
                Metric("rooms_us_per_delivery", "rooms 20x50: server CPU per delivery, us", "lower", None, 2),
                Metric("rooms_us_per_chat", "rooms 20x50: server CPU per chat, us", "lower", None, 0),
                Metric("rooms_p99_ms", "rooms 20x50: latency p99, ms", "lower", None, 0),
                Metric("rooms_server_cpu_pct", "rooms 20x50: server CPU, % of a core", "lower", None, 0),
                Metric("rooms_deliveries_per_write", "rooms 20x50: deliveries per server write call", "higher", None, 1),
                Metric("rooms_lobby_deliveries_ratio", "rooms/lobby deliveries/s", "higher", None, 2),
                Metric("rooms_lobby_cpu_ratio", "rooms/lobby server CPU per delivery", "lower", 1.25, 2,
                       own_target=True),
                Metric("all_us_per_delivery", "one room of all 1000: server CPU per delivery, us", "lower", None, 2,
                       optional=True),
                Metric("all_deliveries_per_write", "one room of all 1000: deliveries per server write call", "higher",
                       None, 1, optional=True),
                Metric("all_lobby_cpu_ratio", "one room of all 1000/lobby server CPU per delivery", "lower", None, 2,
                       optional=True),
            ),
            script="rooms.js",
            max_s=240,
            ours_only=True,
        ),
    )
}


# -- processes -------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    scratch: Path
    template_db: Path | None = None
    code_root: Path = REPO  # the checkout whose server is measured
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    run_no: int = 0

    # setup ---------------------------------------------------------------
    def prepare(self) -> None:
        shared = Path(self.args.shared).resolve()
        for rel in ("peer-node/server.js", "loadgen/loadgen.js", "loadgen/rawclient.js"):
            if not (shared / rel).is_file():
                raise SystemExit(f"{shared / rel} not found: pass --shared or set CHAT_BENCH_SHARED")
        target = self.scratch / "bench"
        if not (target / "loadgen" / "node_modules").is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(shared, target)
            for path in [target, *target.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)  # the copy of a read-only folder
            for sub in ("peer-node", "loadgen"):
                log(f"npm ci in {target / sub}")
                subprocess.run(
                    ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                    cwd=target / sub, check=True, timeout=300, stdout=sys.stderr,
                )
        for script in ("idle.js", "rooms.js"):
            shutil.copyfile(HERE / script, target / "loadgen" / script)
        if self.args.code:
            self.code_root = Path(self.args.code).resolve()
            log(f"measuring our server from {self.code_root}")
        elif self.args.ref:
            # Measure the server as committed at --ref (e.g. a baseline), not
            # the working tree: export that commit into the scratch folder.
            self.code_root = self.scratch / "src"
            if self.code_root.exists():
                shutil.rmtree(self.code_root)
            self.code_root.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", self.args.ref],
                                     check=True, capture_output=True, timeout=60).stdout
            subprocess.run(["tar", "-x", "-C", str(self.code_root)], input=archive, check=True, timeout=60)
            log(f"measuring our server as of {self.args.ref}")
        if "ours" in self.args.servers:
            # Migrated afresh by every invocation: the schema follows the code.
            self.template_db = self.scratch / "template.db"
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.template_db}{suffix}")
            log("migrating a template SQLite database")
            subprocess.run(
                [str(self.venv_bin("python")), "-m", "alembic", "-c", str(self.code_root / "alembic.ini"),
                 "upgrade", "head"],
                cwd=self.code_root,
                env={**self.server_env(), "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{self.template_db}"},
                check=True, timeout=120, capture_output=True,
            )

    def venv_bin(self, name: str) -> Path:
        return Path(self.args.venv) / "bin" / name

    def server_env(self) -> dict[str, str]:
        # No CHAT_* setting leaks in from the caller's shell: default settings.
        # PYTHONPATH makes `python -m chatserver` run this checkout's code even
        # with a virtualenv that has another checkout installed (a worktree).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env["PYTHONPATH"] = str(self.code_root)
        return env

    # servers -------------------------------------------------------------
    @contextlib.contextmanager
    def server(self, kind: str) -> Iterator[tuple[int, int, Path]]:
        self.run_no += 1
        port = free_port()
        logfile = self.scratch / f"server-{self.run_no:03d}-{kind}.log"
        pin = ["taskset", "-c", self.args.server_cpu]
        env = self.server_env()
        env.update(HOST="127.0.0.1", PORT=str(port))
        if kind == "ours":
            assert self.template_db is not None
            db = self.scratch / f"chat-{self.run_no:03d}.db"
            shutil.copyfile(self.template_db, db)
            env["CHAT_DATABASE_URL"] = f"sqlite+aiosqlite:///{db}"
            for item in self.args.server_env:
                key, _, value = item.partition("=")
                env[key] = value
            cmd = [*pin, str(self.venv_bin("python")), "-m", "chatserver"]
            cwd, stop_sig = self.code_root, signal.SIGINT
        else:
            db = None
            cmd = [*pin, "node", str(self.scratch / "bench" / "peer-node" / "server.js")]
            cwd, stop_sig = self.scratch / "bench" / "peer-node", signal.SIGTERM
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append(proc)
        try:
            wait_listening(port, proc, 30)
            yield port, proc.pid, logfile
        finally:
            stop_process(proc, stop_sig)
            self.started.remove(proc)
            if db is not None and not self.args.keep:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{db}{suffix}")

    def stop_all(self) -> None:
        for proc in list(self.started):
            stop_process(proc, signal.SIGTERM, grace=5)

    # one measurement -----------------------------------------------------
    def run(self, scenario: Scenario, kind: str) -> dict[str, Any]:
        with self.server(kind) as (port, pid, logfile):
            script = self.scratch / "bench" / "loadgen" / scenario.script
            cmd = [
                "taskset", "-c", self.args.loadgen_cpu, "node", str(script),
                "--url", f"http://127.0.0.1:{port}", "--server-pid", str(pid),
                "--max-s", str(int(scenario.max_s)), *scenario.args(self.args),
            ]
            if scenario.script == "loadgen.js":
                cmd += ["--label", kind]
                if self.args.client != "raw":
                    cmd += ["--client", self.args.client]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=scenario.max_s + 30)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                result = json.loads(lines[-1]) if lines else {"error": f"no output: {done.stderr[-500:]}"}
            except subprocess.TimeoutExpired:
                result = {"error": "load generator timed out"}
            server_log = logfile.read_text(errors="replace")
        problems = _common_problems(result) + scenario.check(result)
        if kind == "ours":
            errors = [ln for ln in server_log.splitlines() if " ERROR " in ln or ln.startswith("Traceback")]
            if errors:
                problems.append(f"{len(errors)} error lines in the server log, first: {errors[0][:200]}")
        return {"raw": result, "figures": scenario.extract(result), "problems": problems}


# -- statistics and output ------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    good = [v for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.median(good) if good else float("nan")


def fmt(value: float, digits: int) -> str:
    if value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]], servers: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, per_kind in results.items():
        scenario = SCENARIOS[name]
        for metric in scenario.metrics:
            row: dict[str, Any] = {"scenario": name, "metric": metric.key, "label": metric.label,
                                   "better": metric.better, "target": metric.target}
            for kind in servers:
                values = [run["figures"].get(metric.key, float("nan")) for run in per_kind.get(kind, [])]
                row[kind] = median(values)
                row[f"{kind}_runs"] = values
            if "ours" in servers and "peer" in servers and not scenario.ours_only:
                ratios = [
                    o["figures"][metric.key] / p["figures"][metric.key]
                    for o, p in zip(per_kind["ours"], per_kind["peer"], strict=False)
                    if p["figures"].get(metric.key) not in (0, None)
                ]
                row["ratio"] = median(ratios)
                row["ratio_runs"] = ratios
            # The figure that a target applies to: ours/peer, or our own
            # figure when that is already a ratio of two of our measurements.
            judged = row.get("ours") if metric.own_target else row.get("ratio")
            if metric.target is not None and judged is not None and judged == judged:
                row["met"] = judged >= metric.target if metric.better == "higher" else judged <= metric.target
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], servers: list[str], repeat: int, heading: str = "") -> None:
    digits = {m.key: m.digits for s in SCENARIOS.values() for m in s.metrics}
    own = {m.key for s in SCENARIOS.values() for m in s.metrics if m.own_target}
    both = "ours" in servers and "peer" in servers
    head = ["figure", *servers, *(["ours/peer"] if both else []), "target", "met"]
    optional = {m.key for s in SCENARIOS.values() for m in s.metrics if m.optional}
    lines = [head]
    for row in rows:
        if row["metric"] in optional and all(row[k] != row[k] for k in servers):
            continue
        d = digits[row["metric"]]
        # An ours-only scenario (rooms) has no peer figure: blank, not n/a.
        line = [row["label"], *("" if k != "ours" and SCENARIOS[row["scenario"]].ours_only else fmt(row[k], d)
                                for k in servers)]
        if both:
            line.append(fmt(row["ratio"], 2) if "ratio" in row else "")
        target = ""
        if row["target"] is not None:
            target = (">= " if row["better"] == "higher" else "<= ") + f"{row['target']:g}"
            if row["metric"] in own:
                target += " (ours)"
        met = "" if "met" not in row else ("yes" if row["met"] else "NO")
        line += [target, met]
        lines.append(line)
    print(f"\n{heading}Medians of {repeat} run(s); ratio = median of the per-run ratios ours/peer; "
          "rooms: our server only, its lobby and rooms phases on one server process\n")
    print("| " + " | ".join(lines[0]) + " |")
    print("|" + "|".join("---" for _ in lines[0]) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(line) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("CHAT_BENCH_SHARED", str(REPO.parent / "shared" / "bench")),
                        help="the shared bench folder (default <repo>/../shared/bench, env CHAT_BENCH_SHARED)")
    parser.add_argument("--venv", default=str(REPO / ".venv"), help="our virtualenv (default <repo>/.venv)")
    parser.add_argument("--ref", help="measure our server as committed at this git ref (default: the working tree)")
    parser.add_argument("--code", help="measure our server from this folder (a copy of the repository)")
    parser.add_argument("--scratch", help="scratch folder to reuse (default: a new temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and databases")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenarios", default="fanout,fixed,login,churn,idle,rooms")
    parser.add_argument("--servers", default="ours,peer", help="ours,peer (default), or one of them")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--loadgen-cpu", default="1")
    parser.add_argument("--client", default="raw", choices=["raw", "sio"], help="load generator client")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for our server (repeatable)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fanout-k", type=int, default=100, help="chats per sender, closed loop")
    parser.add_argument("--fixed-k", type=int, default=30, help="chats per sender at 3/s")
    parser.add_argument("--login-rounds", type=int, default=5)
    parser.add_argument("--churn-cycles", type=int, default=1000)
    parser.add_argument("--idle-clients", type=int, default=1000)
    parser.add_argument("--rooms-clients", type=int, default=1000, help="rooms scenario: clients (all in the lobby)")
    parser.add_argument("--rooms", type=int, default=20, help="rooms scenario: rooms (clients split evenly)")
    parser.add_argument("--rooms-senders", type=int, default=100,
                        help="rooms scenario: closed-loop senders, in both phases (spread evenly over the rooms)")
    parser.add_argument("--rooms-phases", default="lobby,rooms",
                        help="rooms scenario: phases in order; add 'all' for a control, one room of all the clients")
    parser.add_argument("--rooms-lobby-k", type=int, default=5,
                        help="rooms scenario: chats per sender in the lobby phase; the rooms phase sends --rooms "
                             "times as many, so both phases make the same number of deliveries")
    parser.add_argument("--json", help="write every run and the summary to this file")
    args = parser.parse_args(argv)

    args.servers = [s for s in args.servers.split(",") if s]
    if not set(args.servers) <= {"ours", "peer"}:
        parser.error("--servers takes ours and/or peer")
    names = [s for s in args.scenarios.split(",") if s]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    for tool in ("taskset", "node", "npm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")

    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="chatbench-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, scratch)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {k: [] for k in args.servers} for n in names}
    started_at = dt.datetime.now(dt.UTC)
    interrupted = False
    try:
        bench.prepare()
        for rep in range(args.repeat):
            # Alternate who goes first so a drift in the machine's load does
            # not always favour the same server.
            order = args.servers if rep % 2 == 0 else list(reversed(args.servers))
            for name in names:
                for kind in order:
                    if SCENARIOS[name].ours_only and kind != "ours":
                        continue
                    log(f"run {rep + 1}/{args.repeat}: {name} against {kind}")
                    run = bench.run(SCENARIOS[name], kind)
                    results[name][kind].append(run)
                    shown = ", ".join(f"{k}={fmt(v, 2)}" for k, v in run["figures"].items())
                    log(f"  {shown}")
                    for problem in run["problems"]:
                        log(f"  PROBLEM: {problem}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: summarising what was measured")
    finally:
        bench.stop_all()

    # Only the servers something was measured on (rooms alone: ours only).
    shown = [k for k in args.servers if any(results[n][k] for n in names)] or args.servers
    rows = summarize(results, shown)
    what = f"git {args.ref}" if args.ref else (str(bench.code_root) if args.code else "working tree")
    print_table(rows, shown, args.repeat,
                f"{started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, our server: {what}. ")
    problems = [(n, k, i, p) for n, per in results.items() for k, runs in per.items()
                for i, run in enumerate(runs) for p in run["problems"]]
    if problems:
        print("\nProblems seen:")
        for n, k, i, p in problems:
            print(f"- {n} / {k} / run {i + 1}: {p}")
    if args.json:
        doc = {
            "started_at": started_at.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "host": {"cpus": os.cpu_count(), "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()},
            "params": {k: v for k, v in vars(args).items()},
            "summary": rows,
            "runs": results,
            "problems": [{"scenario": n, "server": k, "run": i + 1, "problem": p} for n, k, i, p in problems],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        log(f"wrote {args.json}")
    if own_scratch and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 130 if interrupted else (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
