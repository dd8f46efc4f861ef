"""Three server processes sharing one PostgreSQL log: every process delivers
to its own sockets from the log, in position order, so every client sees
the events in the log's order, whichever process it is on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from chatserver.events import UserLeft
from tests.support import Client, Postgres, ServerProcess, log_of, migrate

pytestmark = pytest.mark.postgres

_db = iter(range(10_000))


@contextlib.asynccontextmanager
async def cluster(postgres: Postgres, n: int = 3, **env: str) -> AsyncIterator[tuple[str, list[ServerProcess]]]:
    url = postgres.create_database(f"multiproc_{next(_db)}")
    migrate(url)
    procs = [
        ServerProcess(url, CHAT_NODE_ID=f"node{i}", CHAT_RATE_PER_SECOND="10000", CHAT_RATE_BURST="10000", **env)
        for i in range(n)
    ]
    started: list[ServerProcess] = []
    try:
        for proc in procs:
            started.append(await asyncio.to_thread(proc.start))
        yield url, procs
    finally:
        for proc in started:
            await asyncio.to_thread(proc.terminate)


def seen_positions(client: Client) -> list[int]:
    """Positions of every live event the client received, in arrival order."""
    positions = []
    for (event, data), (_e, extra) in zip(client.received, client.extra, strict=True):
        if event == "chat":
            positions.append(data["position"])
        elif event in ("userJoined", "userLeft") and extra:
            positions.append(extra[0]["position"])
    return positions


async def test_every_client_sees_the_log_order_on_every_process(postgres: Postgres) -> None:
    async with cluster(postgres) as (url, procs):
        clients = [await Client(procs[i % 3].url).connect() for i in range(6)]
        try:
            for i, c in enumerate(clients):
                await c.login(f"user{i}")
            # Everyone has seen everyone join before the chatting starts.
            for c in clients:
                await c.wait_for(lambda c=c: len(c.events("userJoined")) >= 6 - clients.index(c), timeout=10)

            async def chatter(c: Client, who: int) -> list[Any]:
                return list(await asyncio.gather(*(c.call("chat", f"{who}:{k}") for k in range(30))))

            acks = await asyncio.gather(*(chatter(c, i) for i, c in enumerate(clients)))
            assert all(a["ok"] for batch in acks for a in batch)
            for c in clients:
                await c.wait_for(lambda c=c: len(c.events("chat")) == 180, timeout=20)
            followed = [await followed_events(proc) for proc in procs]
        finally:
            for c in clients:
                await c.disconnect()
        log = await log_of(url)
        chat_positions = [e.position for e in log if e.type == "MessagePosted"]
        for c in clients:
            seen = seen_positions(c)
            # The log's order, with nothing twice.
            assert seen == sorted(set(seen)), c.url
            assert [m["position"] for m in c.events("chat")] == chat_positions
        assert [e.position for e in log] == list(range(1, len(log) + 1))
        # Under concurrent appends, processes took others' events inside their
        # own appends (delivered with them), not only by separate reads.
        assert sum(f.get("append", 0) for f in followed) > 0, followed


async def followed_events(proc: ServerProcess) -> dict[str, int]:
    """chat_log_followed_events_total by ``via``, from the process's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as r:
        text = await r.text()
    counts = {}
    for line in text.splitlines():
        if line.startswith("chat_log_followed_events_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('via="')[1].split('"')[0]] = int(float(value))
    return counts


async def test_names_are_unique_and_history_shared_across_processes(postgres: Postgres) -> None:
    async with cluster(postgres, n=2) as (url, procs):
        one, two = procs
        a = await Client(one.url).connect()
        b = await Client(two.url).connect()
        c = await Client(two.url).connect()
        try:
            await a.login("alice")
            await b.login("bobby")
            assert (await c.call("login", "alice"))["error"] == "name_taken"
            await a.call("chat", "from one")
            await b.call("chat", "from two")
            for client in (a, b):
                await client.wait_for(lambda cl=client: len(cl.events("chat")) == 2)
                assert [m["message"] for m in client.events("chat")] == ["from one", "from two"]
                assert sorted(await client.call("onlineUsers")) == ["alice", "bobby"]
            await c.login("carol")
            # Each process is ready only while it holds its node lease.
            async with aiohttp.ClientSession() as http:
                for proc in procs:
                    async with http.get(proc.url + "/readyz") as r:
                        body = await r.json()
                    assert r.status == 200 and body["checks"]["lease"] == "held", body
            items = c.events("history")[0]["items"]
            assert [i["message"] for i in items if i["kind"] == "chat"] == ["from one", "from two"]
        finally:
            for client in (a, b, c):
                await client.disconnect()
        log = await log_of(url)
        nodes = {e.event.name: e.event.node for e in log if e.type == "UserLoggedIn"}
        assert nodes == {"alice": "node0", "bobby": "node1", "carol": "node1"}


async def test_resume_on_another_process_under_load_is_exact(postgres: Postgres) -> None:
    async with cluster(postgres) as (url, procs):
        talkers = [await Client(procs[i].url).connect() for i in range(3)]
        a = await Client(procs[0].url).connect()
        stop = asyncio.Event()
        try:
            for i, t in enumerate(talkers):
                await t.login(f"talk{i}")
            ack = await a.login("alice")
            token = a.events("welcome")[0]["resumeToken"]

            async def talk(t: Client, i: int) -> int:
                n = 0
                while not stop.is_set():
                    assert (await t.call("chat", f"{i}:{n}"))["ok"]
                    n += 1
                return n

            load = [asyncio.create_task(talk(t, i)) for i, t in enumerate(talkers)]
            await asyncio.sleep(0.3)
            await a.disconnect()
            await asyncio.sleep(0.2)
            last = max([m["position"] for m in a.events("chat")] or [ack["position"]])
            b = Client(procs[2].url)
            await b.connect(auth={"resumeToken": token, "lastPosition": last})
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*load)
            log = await log_of(url)
            wanted = [e.position for e in log if e.type == "MessagePosted" and e.position > last]
            await b.wait_for(lambda: [m["position"] for m in b.events("chat")][-1:] == wanted[-1:], timeout=20)
            got = [m["position"] for m in b.events("chat")]
            assert got == wanted  # every chat after last, once, in order
            assert b.events("welcome")[0]["resumed"] is True
            await b.disconnect()
        finally:
            stop.set()
            for t in talkers:
                await t.disconnect()


async def test_takeover_across_processes(postgres: Postgres) -> None:
    async with cluster(postgres, n=2) as (url, procs):
        one, two = procs
        a = await Client(one.url).connect()
        watcher = await Client(one.url).connect()
        try:
            await watcher.login("watcher")
            ack = await a.login("alice")
            token = a.events("welcome")[0]["resumeToken"]
            # alice's socket on one is half-open; she comes back on two.
            b = Client(two.url)
            await b.connect(auth={"resumeToken": token, "lastPosition": ack["position"]})
            await b.wait_event("welcome")
            # One drops the old socket at once; it takes no more chats.
            await a.wait_for(lambda: not a.sio.connected, timeout=10)
            assert (await b.call("chat", "back"))["ok"]
            await watcher.wait_for(lambda: "back" in [m["message"] for m in watcher.events("chat")])
            assert watcher.events("userLeft") == ["alice"] and watcher.events("userJoined")[-1] == "alice"
            await b.disconnect()
        finally:
            for client in (a, watcher):
                if client.sio.connected:
                    await client.disconnect()
        log = await log_of(url)
        reasons = [e.event.reason for e in log if isinstance(e.event, UserLeft) and e.event.name == "alice"]
        assert reasons[0] == "taken over" and reasons.count("taken over") == 1


async def test_a_killed_process_users_leave_once_and_can_log_in_elsewhere(postgres: Postgres) -> None:
    async with cluster(postgres, CHAT_NODE_LEASE="2") as (url, procs):
        doomed, survivor, third = procs
        watcher = await Client(survivor.url).connect()
        talker = await Client(third.url).connect()
        victims = [await Client(doomed.url).connect() for _ in range(2)]
        stop = asyncio.Event()
        acked: list[str] = []
        try:
            await watcher.login("watcher")
            await talker.login("talker")
            for i, v in enumerate(victims):
                await v.login(f"victim{i}")

            async def talk(c: Client, tag: str) -> None:
                n = 0
                while not stop.is_set():
                    with contextlib.suppress(Exception):
                        ack = await c.call("chat", f"{tag}:{n}", timeout=2)
                        if ack["ok"]:
                            acked.append(f"{tag}:{n}")
                    n += 1
                    await asyncio.sleep(0.01)

            load = [asyncio.create_task(talk(c, t)) for c, t in ((talker, "t"), (victims[0], "v0"), (victims[1], "v1"))]
            await asyncio.sleep(0.5)
            doomed.kill()
            killed_at = asyncio.get_running_loop().time()
            # A login of a victim's name on another process gets in as soon
            # as the dead process's lease has expired.
            again = await Client(third.url).connect()
            while True:
                ack = await again.call("login", "victim0")
                if ack["ok"]:
                    break
                assert ack["error"] == "name_taken", ack
                assert asyncio.get_running_loop().time() - killed_at < 10, "the name was never freed"
                await asyncio.sleep(0.2)
            await watcher.wait_for(lambda: sorted(watcher.events("userLeft")) == ["victim0", "victim1"], timeout=10)
            took = asyncio.get_running_loop().time() - killed_at
            assert took < 2 + 5, took
            stop.set()
            await asyncio.gather(*load)
            await again.disconnect()
        finally:
            stop.set()
            for c in (watcher, talker, *victims):
                with contextlib.suppress(Exception):
                    await c.disconnect()
        log = await log_of(url)
        stored = {e.event.message for e in log if e.type == "MessagePosted"}
        assert set(acked) <= stored  # nothing acknowledged is lost
        for i in range(2):
            reasons = [e.event.reason for e in log if isinstance(e.event, UserLeft) and e.event.name == f"victim{i}"]
            assert reasons[0] == "node lost" and reasons.count("node lost") == 1, reasons


async def test_processes_with_no_node_id_do_not_interfere(postgres: Postgres) -> None:
    url = postgres.create_database(f"multiproc_{next(_db)}")
    migrate(url)
    one = await asyncio.to_thread(ServerProcess(url).start)
    two: ServerProcess | None = None
    a = await Client(one.url).connect()
    try:
        await a.login("alice")
        # A second process with the same (default) name starts: it must not
        # take alice's session for its own previous run's.
        two = await asyncio.to_thread(ServerProcess(url).start)
        b = await Client(two.url).connect()
        await b.login("bobby")
        assert sorted(await b.call("onlineUsers")) == ["alice", "bobby"]
        assert (await a.call("chat", "still here"))["ok"]
        await b.wait_for(lambda: "still here" in [m["message"] for m in b.events("chat")])
        await b.disconnect()
    finally:
        await a.disconnect()
        await asyncio.to_thread(one.terminate)
        if two is not None:
            await asyncio.to_thread(two.terminate)
    log = await log_of(url)
    reasons = [e.event.reason for e in log if isinstance(e.event, UserLeft) and e.event.name == "alice"]
    assert reasons == ["server shutdown"] or reasons == ["disconnected"], reasons


async def test_a_database_restart_loses_no_delivery(postgres: Postgres) -> None:
    async with cluster(postgres, n=2) as (url, procs):
        a = await Client(procs[0].url).connect()
        b = await Client(procs[1].url).connect()
        try:
            await a.login("alice")
            await b.login("bobby")
            assert (await a.call("chat", "before"))["ok"]
            await asyncio.to_thread(postgres.stop_server)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(postgres.start_server)
            # Both processes find the log again by themselves: what is
            # stored from now on reaches the other process's socket.
            deadline = asyncio.get_running_loop().time() + 20
            n = 0
            while True:
                ack = await a.call("chat", f"after{n}")
                if ack["ok"]:
                    break
                assert asyncio.get_running_loop().time() < deadline, ack
                n += 1
                await asyncio.sleep(0.2)
            await b.wait_for(lambda: f"after{n}" in [m["message"] for m in b.events("chat")], timeout=10)
            log = await log_of(url)
            stored = [e.position for e in log if e.type == "MessagePosted"]
            assert [m["position"] for m in b.events("chat")] == stored
        finally:
            await a.disconnect()
            await b.disconnect()


class Partition:
    """A TCP proxy to PostgreSQL that can cut one process off (and heal)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_off = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Partition:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_w]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self) -> None:
        """Silently drop every connection (no FIN reaches PostgreSQL's side in
        time to matter) and refuse new ones."""
        self.cut_off = True
        for w in self._writers:
            transport = w.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()

    def heal(self) -> None:
        self.cut_off = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_a_process_cut_off_from_the_database_stops_serving_before_it_is_reaped(postgres: Postgres) -> None:
    url = postgres.create_database(f"multiproc_{next(_db)}")
    migrate(url)
    partition = await Partition(postgres.port).start()
    cut_url = url.replace(f":{postgres.port}/", f":{partition.port}/")
    env = {"CHAT_NODE_LEASE": "3"}
    lonely = await asyncio.to_thread(ServerProcess(cut_url, CHAT_NODE_ID="lonely", **env).start)
    healthy = await asyncio.to_thread(ServerProcess(url, CHAT_NODE_ID="healthy", **env).start)
    a = await Client(lonely.url).connect()
    b = await Client(healthy.url).connect()
    try:
        await a.login("alice")
        await b.login("bobby")
        await b.wait_for(lambda: "alice" in b.events("userJoined") or "alice" in str(b.events("history")))
        await asyncio.sleep(3.5)  # both leases renewed for a whole period
        partition.cut()
        cut_at = asyncio.get_running_loop().time()
        # The cut-off process drops its sockets itself (2/3 of the lease)...
        await a.wait_for(lambda: not a.sio.connected, timeout=10)
        dropped = asyncio.get_running_loop().time() - cut_at
        async with aiohttp.ClientSession() as http, http.get(lonely.url + "/readyz") as r:
            body = await r.json()
        assert r.status == 503 and body["checks"]["lease"] == "fenced", body
        # ...before the healthy one reaps its lease (the whole lease).
        await b.wait_for(lambda: "alice" in b.events("userLeft"), timeout=15)
        reaped = asyncio.get_running_loop().time() - cut_at
        assert dropped < reaped, (dropped, reaped)
        partition.heal()
        # Back in touch: it serves again under a new lease.
        c = await Client(lonely.url).connect()
        deadline = asyncio.get_running_loop().time() + 15
        while not (ack := await c.call("login", "alice"))["ok"]:
            assert asyncio.get_running_loop().time() < deadline, ack
            await asyncio.sleep(0.3)
        await b.wait_for(lambda: b.events("userJoined").count("alice") >= 1 and b.events("userLeft").count("alice") == 1)
        await c.disconnect()
    finally:
        for client in (a, b):
            with contextlib.suppress(Exception):
                await client.disconnect()
        await asyncio.to_thread(lonely.terminate)
        await asyncio.to_thread(healthy.terminate)
        await partition.stop()
    log = await log_of(url)
    alice = [(e.type, getattr(e.event, "reason", None)) for e in log if e.stream == "user-alice"]
    # Never online twice: logins and leaves alternate.
    kinds = [t for t, _ in alice if t in ("UserJoined", "UserLeft")]
    assert kinds == ["UserJoined", "UserLeft"] * (len(kinds) // 2), alice
    assert ("UserLeft", "node lost") in alice
