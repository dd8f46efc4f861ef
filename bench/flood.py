#!/usr/bin/env python3
"""Flood benchmark: does one flooding socket stall another user's chat?

Issue 10's target: with one socket flooding chat frames as fast as a client
on this machine can write, another (innocent) user's chat round trip p99
stays within 2x of the same measurement without the flood, and the flooder
is dropped within a few seconds.

What it does, every step bounded in time and on 127.0.0.1 only:

1. migrates a template SQLite database (``alembic upgrade head``);
2. for each phase (``baseline``, then ``flood``), starts our server
   (``python -m chatserver``, default settings: no CHAT_* variable of the
   caller's environment is passed on; ``--server-env`` adds some) on a fresh
   copy of that database, pinned to one core with ``taskset`` when there is
   one;
3. the innocent user (a python-socketio client in this process, pinned to
   the other core) logs in and sends chats with an acknowledgement at a fixed
   rate (default 20/s for 10 s, each in its own task, so a slow answer does
   not delay the next send), recording each round trip (emit to ack);
4. in the ``flood`` phase, one second into the measurement, a flooder in a
   separate process (same core as the innocent user) opens a WebSocket by
   hand, logs in and writes pre-built masked ``42["chat","spam"]`` frames with
   blocking ``sendall`` until the server hangs up (or ``--flood-max``
   seconds); with ``--reconnect`` it connects again each time it is dropped,
   for the whole measurement (a persistent attacker; also reported);
5. repeats (``--repeat``, default 3; the order of the phases alternates)
   and prints, per run and as medians, p50/p99 both ways, the ratio
   p99(flood)/p99(baseline) (target <= 2; the median of the per-run ratios),
   the time from the flooder's first flood frame until the server dropped it,
   and the frames it wrote; ``--json`` writes it all. Exit status 1 when the
   target is missed, the flooder was not dropped, an innocent chat failed or
   the server logged an ERROR.

Every process it starts is stopped before it returns. ``--code DIR`` measures
the server from another checkout (e.g. an export of main, for comparison).

    .venv/bin/python bench/flood.py
    .venv/bin/python bench/flood.py --reconnect --json flood.json
    .venv/bin/python bench/flood.py --code /tmp/main-export --flood-max 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from procs import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent

FLOOD_FRAME = '42["chat","spam"]'
FRAMES_PER_WRITE = 256


def log(msg: str) -> None:
    print(f"[flood {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pin(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# -- the flooder (a process of its own) -------------------------------------


def masked_frame(text: str, mask: bytes) -> bytes:
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class FrameReader:
    """Text frames from a blocking socket (server frames are unmasked)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        return b0 & 0x0F, self._need(n)

    def text_until(self, prefix: str) -> str:
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                raise EOFError
            text = payload.decode(errors="replace")
            if text.startswith(prefix):
                return text


def open_flood_socket(port: int, name: str) -> tuple[socket.socket, FrameReader]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("no handshake answer")
        head += chunk
    status, _, rest = head.partition(b"\r\n\r\n")
    if b" 101 " not in status.split(b"\r\n")[0]:
        raise RuntimeError(f"handshake refused: {status[:100]!r}")
    reader = FrameReader(sock)
    reader.buf = rest
    mask = os.urandom(4)
    reader.text_until("0{")
    sock.sendall(masked_frame("40", mask))
    reader.text_until("40")
    sock.sendall(masked_frame("420" + json.dumps(["login", name]), mask))
    ack = reader.text_until("430")
    if '"ok":true' not in ack.replace(" ", ""):
        raise RuntimeError(f"flooder login refused: {ack[:200]}")
    return sock, reader


def flood_once(port: int, name: str, seconds: float, ready: Any = None) -> dict[str, Any]:
    """One socket: log in, (call ``ready``, which waits for the go), then
    write frames until the server hangs up or ``seconds`` have passed."""
    sock, reader = open_flood_socket(port, name)
    sock.settimeout(None)
    if ready is not None:
        ready()
    deadline = time.monotonic() + seconds
    mask = os.urandom(4)
    block = masked_frame(FLOOD_FRAME, mask) * FRAMES_PER_WRITE
    closed_at: list[float] = []

    def drain() -> None:
        # Read (and discard) what the server sends, to see when it hangs up.
        with contextlib.suppress(OSError, EOFError):
            while True:
                opcode, _ = reader.frame()
                if opcode == 0x8:
                    break
        closed_at.append(time.monotonic())

    threading.Thread(target=drain, daemon=True).start()
    frames = 0
    started = time.monotonic()
    error = None
    try:
        while time.monotonic() < deadline and not closed_at:
            sock.sendall(block)
            frames += FRAMES_PER_WRITE
    except OSError as exc:
        error = type(exc).__name__
    ended = time.monotonic()
    # Hung up on (EOF, or a reset while writing), not merely out of time.
    dropped = bool(closed_at) or error is not None
    drop_time = min([*closed_at, ended]) if dropped else None
    with contextlib.suppress(OSError):
        sock.close()
    return {
        "frames": frames,
        "flood_seconds": ended - started,
        "dropped": dropped,
        "dropped_after_s": None if drop_time is None else drop_time - started,
        "error": error,
    }


def run_flooder(port: int, seconds: float, reconnect: bool) -> int:
    """Connect and log in, say "ready", wait for a line on stdin, flood."""
    runs: list[dict[str, Any]] = []
    deadline = float("inf")

    def ready() -> None:
        # The process start and the login stay out of the measured window.
        nonlocal deadline
        print("ready", flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + seconds

    while True:
        try:
            first = not runs
            left = seconds if first else deadline - time.monotonic()
            runs.append(flood_once(port, f"fl{len(runs) % 10000}", left, ready if first else None))
        except (OSError, EOFError, RuntimeError) as exc:
            runs.append({"frames": 0, "dropped": True, "dropped_after_s": None, "error": repr(exc)})
            if not runs[1:]:
                break  # not even the first socket logged in
        if not reconnect or time.monotonic() >= deadline:
            break
    print(json.dumps({"runs": runs}), flush=True)
    return 0


# -- the server and the innocent user ----------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.code = Path(args.code).resolve() if args.code else REPO
        self.template = scratch / "template.db"
        self.started: list[subprocess.Popen[bytes]] = []
        self.runs = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env["PYTHONPATH"] = str(self.code)
        return env

    def prepare(self) -> None:
        log("migrating a template SQLite database")
        subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(self.code / "alembic.ini"), "upgrade", "head"],
            cwd=self.code,
            env={**self.env(), "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{self.template}"},
            check=True, timeout=120, capture_output=True,
        )

    @contextlib.contextmanager
    def server(self) -> Iterator[tuple[int, Path]]:
        self.runs += 1
        port = free_port()
        db = self.scratch / f"chat-{self.runs}.db"
        shutil.copyfile(self.template, db)
        logfile = self.scratch / f"server-{self.runs}.log"
        env = self.env()
        env.update(HOST="127.0.0.1", PORT=str(port), CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{db}")
        for item in self.args.server_env:
            key, _, value = item.partition("=")
            env[key] = value
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(
                [*pin(self.args.server_cpu), sys.executable, "-m", "chatserver"],
                cwd=self.code, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        self.started.append(proc)
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {logfile.read_text()[-500:]}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not listen within 30 s")
                time.sleep(0.05)
            yield port, logfile
        finally:
            stop_process(proc, signal.SIGINT)
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.started):
            stop_process(proc, signal.SIGTERM, grace=5)

    def flooder(self, port: int, seconds: float) -> subprocess.Popen[str]:
        cmd = [*pin(self.args.flooder_cpu or self.args.client_cpu), sys.executable, str(Path(__file__).resolve()),
               "--flooder", str(port), "--flood-max", str(seconds)]
        if self.args.reconnect:
            cmd.append("--reconnect")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.started.append(proc)  # type: ignore[arg-type]
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the flooder did not get ready: {line!r}")
        return proc

    async def phase(self, flood: bool) -> dict[str, Any]:
        import socketio

        with self.server() as (port, logfile):
            client = socketio.AsyncClient(reconnection=False)
            await client.connect(f"http://127.0.0.1:{port}", transports=["websocket"], wait_timeout=10)
            result: dict[str, Any] = {}
            try:
                ack = await client.call("login", "innocent", timeout=10)
                assert ack.get("ok"), ack
                # A short warm-up, not measured.
                for i in range(20):
                    await client.call("chat", f"warm {i}", timeout=10)
                flooder = None
                flood_for = self.args.duration if self.args.reconnect else self.args.flood_max
                if flood:
                    flooder = await asyncio.to_thread(self.flooder, port, flood_for)
                go = False
                go_at: float | None = None
                rtts: list[float] = []
                slowest: list[tuple[float, float]] = []  # (sent at, s from the start; ms)
                failures: list[str] = []
                interval = 1.0 / self.args.rate
                count = int(self.args.duration * self.args.rate)

                async def one(i: int) -> None:
                    sent = time.perf_counter()
                    try:
                        answer = await client.call("chat", f"innocent {i}", timeout=30)
                    except Exception as exc:  # a lost chat is a finding, not a crash
                        failures.append(repr(exc))
                        return
                    if isinstance(answer, dict) and answer.get("ok"):
                        rtts.append((time.perf_counter() - sent) * 1000)
                        slowest.append((sent - start, rtts[-1]))
                    else:
                        failures.append(repr(answer))

                tasks = []
                start = time.perf_counter()
                for i in range(count):
                    if flooder is not None and not go and time.perf_counter() - start >= 1.0:
                        go = True
                        go_at = time.perf_counter() - start
                        assert flooder.stdin is not None
                        flooder.stdin.write("go\n")
                        flooder.stdin.flush()
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.perf_counter()))
                await asyncio.gather(*tasks)
                result.update(
                    chats=len(rtts),
                    failed=len(failures),
                    first_failures=failures[:3],
                    p50_ms=percentile(rtts, 50),
                    p99_ms=percentile(rtts, 99),
                    max_ms=max(rtts) if rtts else float("nan"),
                    # When the worst round trips were sent, against when the
                    # flood began: do they coincide with it, or with noise?
                    flood_began_s=go_at,
                    slowest=[(round(t, 3), round(ms, 1)) for t, ms in sorted(slowest, key=lambda x: -x[1])[:5]],
                )
                if flooder is not None:
                    out, _ = await asyncio.to_thread(flooder.communicate, timeout=flood_for + 30)
                    self.started.remove(flooder)  # type: ignore[arg-type]
                    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
                    result["flooder"] = json.loads(lines[-1]) if lines else {"error": "no output"}
            finally:
                await client.disconnect()
            text = logfile.read_text(errors="replace")
            result["server_error_lines"] = sum(
                1 for ln in text.splitlines() if " ERROR " in ln or ln.startswith("Traceback") or ln.startswith("ERROR")
            )
            result["server_warning_lines"] = sum(1 for ln in text.splitlines() if "WARNING" in ln)
        return result


def summarize(baseline: dict[str, Any], flood: dict[str, Any]) -> dict[str, Any]:
    attempts = flood.get("flooder", {}).get("runs", [])
    # A reconnecting flooder's connections the server refused at the
    # handshake (429 for an address it just dropped) are not sockets.
    refused = [r for r in attempts if "handshake refused" in str(r.get("error"))]
    runs = [r for r in attempts if r not in refused]
    drops = [r["dropped_after_s"] for r in runs if r.get("dropped_after_s") is not None]
    return {
        "baseline_p50_ms": baseline["p50_ms"],
        "baseline_p99_ms": baseline["p99_ms"],
        "flood_p50_ms": flood["p50_ms"],
        "flood_p99_ms": flood["p99_ms"],
        "p99_ratio": flood["p99_ms"] / baseline["p99_ms"] if baseline["p99_ms"] else float("nan"),
        "flood_sockets": len(runs),
        "refused_connects": len(refused),
        "flood_frames": sum(r.get("frames", 0) for r in runs),
        # With --reconnect the last socket is usually cut short by the end
        # of the measurement, not dropped: it does not count against.
        "flooder_dropped": bool(runs) and all(r.get("dropped") for r in (runs[:-1] if len(runs) > 1 else runs)),
        "first_drop_after_s": drops[0] if drops else None,
        "median_drop_after_s": statistics.median(drops) if drops else None,
        "innocent_failed": baseline["failed"] + flood["failed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of innocent chats per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="innocent chats per second")
    parser.add_argument("--flood-max", type=float, default=10.0, help="longest a flooder writes")
    parser.add_argument("--reconnect", action="store_true", help="the flooder reconnects each time it is dropped")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1", help="core of the innocent user and the flooder")
    parser.add_argument("--flooder-cpu", help="core of the flooder (default: the innocent user's)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--code", help="measure the server from this folder (a copy of the repository)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--flooder", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.flooder is not None:
        return run_flooder(args.flooder, args.flood_max, args.reconnect)

    if pin(args.client_cpu):
        os.sched_setaffinity(0, {int(args.client_cpu)})
    scratch = Path(tempfile.mkdtemp(prefix="chatflood-"))
    bench = Bench(args, scratch)
    reps: list[dict[str, Any]] = []
    try:
        bench.prepare()
        for rep in range(args.repeat):
            # Alternate which phase goes first, so a drift in the machine's
            # load does not always land on the same one.
            order = [False, True] if rep % 2 == 0 else [True, False]
            phases: dict[bool, dict[str, Any]] = {}
            for flood in order:
                what = "flood" + (" (reconnecting flooder)" if args.reconnect else "") if flood else "baseline"
                log(f"run {rep + 1}/{args.repeat}: {what}, {args.rate:g} chats/s for {args.duration:g} s")
                phases[flood] = asyncio.run(bench.phase(flood=flood))
                log(f"  {json.dumps(phases[flood])[:500]}")
            reps.append({"baseline": phases[False], "flood": phases[True],
                         "summary": summarize(phases[False], phases[True])})
    finally:
        bench.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"innocent chat round trip, {args.rate:g}/s for {args.duration:g} s, ms "
          f"({'reconnecting flooder' if args.reconnect else 'one flooding socket'}):")
    for n, r in enumerate(reps, 1):
        b, f, sm = r["baseline"], r["flood"], r["summary"]
        drop = sm["first_drop_after_s"]
        print(f"  run {n}: baseline p50 {b['p50_ms']:7.2f} p99 {b['p99_ms']:7.2f} | flood p50 {f['p50_ms']:7.2f} "
              f"p99 {f['p99_ms']:7.2f} max {f['max_ms']:7.2f} | ratio {sm['p99_ratio']:5.2f} | "
              f"{sm['flood_sockets']} socket(s), {sm['flood_frames']:,} frames, "
              + (f"{sm['refused_connects']:,} connects refused, " if sm["refused_connects"] else "")
              + f"dropped {sm['flooder_dropped']} after {'-' if drop is None else f'{drop:.3f} s'}"
              + (f" (median {sm['median_drop_after_s']:.3f} s)" if sm["flood_sockets"] > 1 else ""))
    med = {key: statistics.median(r["summary"][key] for r in reps)
           for key in ("baseline_p50_ms", "baseline_p99_ms", "flood_p50_ms", "flood_p99_ms", "p99_ratio")}
    print(f"  median: baseline p50 {med['baseline_p50_ms']:.2f} p99 {med['baseline_p99_ms']:.2f} | "
          f"flood p50 {med['flood_p50_ms']:.2f} p99 {med['flood_p99_ms']:.2f} | "
          f"p99 ratio (median of runs) {med['p99_ratio']:.2f} (target <= 2)")
    failed = sum(r["summary"]["innocent_failed"] for r in reps)
    errors = sum(r["baseline"]["server_error_lines"] + r["flood"]["server_error_lines"] for r in reps)
    dropped = all(r["summary"]["flooder_dropped"] for r in reps)
    print(f"flooder always dropped: {dropped}; innocent chats failed: {failed}; server ERROR lines: {errors}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": reps, "median": med}, indent=2))
    ok = med["p99_ratio"] <= 2 and dropped and failed == 0 and errors == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
