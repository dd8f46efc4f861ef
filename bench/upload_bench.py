"""Benchmark: upload throughput of a 25 MiB file, next to a plain `cp`.

Starts `python -m chatserver` on a migrated SQLite file in a temporary
folder (its CHAT_DATA_DIR in the same folder, so both figures write to the
same file system), logs a user in over Socket.IO, takes an upload token and
POSTs a file of random bytes (fresh bytes each run: no deduplication helps)
to /api/uploads over loopback, streamed from disk by the client. The time
is from the request's first byte to the 201 answer: HTTP, multipart parsing,
SHA-256, the write to a staging file and its rename into the blob store,
the database row, and the content sniffing. Then `cp` copies the same
file the same number of times. Neither calls fsync. Prints every run and
the median MiB/s of each.

    .venv/bin/python bench/upload_bench.py              # 25 MiB, 5 runs
    .venv/bin/python bench/upload_bench.py --mib 10 --runs 9
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from procs import free_port, stop_process, wait_listening  # noqa: E402

MIB = 1024 * 1024


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
        f.write(os.urandom(size % MIB))


async def token_for(url: str) -> tuple[socketio.AsyncClient, str]:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, transports=["websocket"], wait_timeout=10)
    ack = await sio.call("login", "bench")
    assert ack["ok"], ack
    ack = await sio.call("uploadToken")
    assert ack["ok"], ack
    return sio, ack["token"]


async def upload_runs(url: str, files: list[Path]) -> list[float]:
    sio, token = await token_for(url)
    seconds = []
    try:
        async with aiohttp.ClientSession() as http:
            for path in files:
                with open(path, "rb") as f:
                    form = aiohttp.FormData()
                    form.add_field("file", f, filename=path.name, content_type="application/octet-stream")
                    started = time.perf_counter()
                    async with http.post(
                        f"{url}/api/uploads", data=form, headers={"Authorization": f"Bearer {token}"}
                    ) as resp:
                        body = await resp.json()
                    seconds.append(time.perf_counter() - started)
                    assert resp.status == 201, body
    finally:
        await sio.disconnect()
    return seconds


def cp_runs(files: list[Path], folder: Path) -> list[float]:
    seconds = []
    for i, path in enumerate(files):
        target = folder / f"copy-{i}"
        started = time.perf_counter()
        subprocess.run(["cp", str(path), str(target)], check=True)
        seconds.append(time.perf_counter() - started)
        target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=25.0, help="file size in MiB (default 25)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    size = int(args.mib * MIB)
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        folder = Path(tmp)
        files = [folder / f"random-{i}.bin" for i in range(args.runs)]
        for path in files:
            random_file(path, size)
        database = f"sqlite+aiosqlite:///{folder / 'chat.db'}"
        env = {**os.environ, "CHAT_DATABASE_URL": database}
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        port = free_port()
        env.update(HOST="127.0.0.1", PORT=str(port), CHAT_DATA_DIR=str(folder / "data"), CHAT_LOG_LEVEL="WARNING",
                   CHAT_UPLOAD_MAX_BYTES=str(max(size, 25 * MIB)),
                   CHAT_UPLOAD_BYTES_PER_HOUR=str(size * (args.runs + 1)))
        proc = subprocess.Popen([sys.executable, "-m", "chatserver"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc, 30)
            uploads = asyncio.run(upload_runs(f"http://127.0.0.1:{port}", files))
        finally:
            stop_process(proc, signal.SIGTERM)
        copies = cp_runs(files, folder)
    mib = size / MIB
    for name, runs in (("upload", uploads), ("cp", copies)):
        rates = ", ".join(f"{mib / s:.0f}" for s in runs)
        print(f"{name:6s} {mib:g} MiB x {len(runs)}: median {mib / statistics.median(runs):.0f} MiB/s (runs: {rates})")


if __name__ == "__main__":
    main()
