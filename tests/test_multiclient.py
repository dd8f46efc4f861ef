"""Several clients at once: who sees what, and what the log holds."""

from __future__ import annotations

import asyncio

from tests.support import Client, InProcessServer, log_of, running_server, settings_for


async def read_log(db_url: str) -> list[tuple[str, str, int, str]]:
    return [
        (e.type, e.stream, e.version, getattr(e.event, "message", getattr(e.event, "name", "")))
        for e in await log_of(db_url)
    ]


async def test_join_chat_leave_seen_by_logged_in_only_and_logged(server: InProcessServer, db_url: str) -> None:
    lurker = await Client(server.url).connect()  # stays on the login screen
    a = await Client(server.url).connect()
    b = await Client(server.url).connect()
    try:
        await a.login("alice")
        await b.login("bobby")
        await a.wait_for(lambda: "bobby" in a.events("userJoined"))
        await a.call("chat", "hi bob")
        await b.call("chat", "hi alice")
        for c in (a, b):
            await c.wait_event("chat", count=2)
            assert [(m["sender"], m["message"]) for m in c.events("chat")] == [
                ("alice", "hi bob"),
                ("bobby", "hi alice"),
            ]
        await b.disconnect()
        await a.wait_for(lambda: a.events("userLeft") == ["bobby"])
        assert a.events("userJoined") == ["alice", "bobby"]
        assert await a.call("onlineUsers") == ["alice"]
        await asyncio.sleep(0.2)
        assert lurker.received == []
    finally:
        await a.disconnect()
        await lurker.disconnect()
    await asyncio.sleep(0.2)
    assert await read_log(db_url) == [
        ("UserLoggedIn", "user-alice", 1, "alice"),
        ("UserJoined", "user-alice", 2, "alice"),
        ("UserLoggedIn", "user-bobby", 1, "bobby"),
        ("UserJoined", "user-bobby", 2, "bobby"),
        ("MessagePosted", "user-alice", 3, "hi bob"),
        ("MessagePosted", "user-bobby", 3, "hi alice"),
        ("UserLeft", "user-bobby", 4, "bobby"),
        ("UserLeft", "user-alice", 4, "alice"),
    ]


async def test_online_users_in_join_order(server: InProcessServer) -> None:
    clients = [await Client(server.url).connect() for _ in range(4)]
    try:
        for c, name in zip(clients, ["dave", "carol", "bob", "alice"], strict=True):
            await c.login(name)
        assert await clients[0].call("onlineUsers") == ["dave", "carol", "bob", "alice"]
        await clients[1].disconnect()
        await clients[0].wait_for(lambda: "carol" in clients[0].events("userLeft"))
        assert await clients[0].call("onlineUsers") == ["dave", "bob", "alice"]
    finally:
        for c in clients:
            await c.disconnect()


async def test_same_name_at_the_same_moment_exactly_one_wins(server: InProcessServer, db_url: str) -> None:
    clients = [await Client(server.url).connect() for _ in range(20)]
    try:
        acks = await asyncio.gather(*(c.call("login", "racer") for c in clients))
        winners = [c for c, ack in zip(clients, acks, strict=True) if ack["ok"]]
        assert len(winners) == 1
        assert sorted(ack.get("error", "") for ack in acks).count("name_taken") == 19
        await asyncio.sleep(0.3)
        assert sum(len(c.events("welcome")) for c in clients) == 1
        assert sum(len(c.events("loginNameExists")) for c in clients) == 19
    finally:
        for c in clients:
            await c.disconnect()
    await asyncio.sleep(0.2)
    log = await read_log(db_url)
    assert [t for t, *_ in log] == ["UserLoggedIn", "UserJoined", "UserLeft"]


async def test_quick_reconnect_under_same_name_is_not_refused(server: InProcessServer) -> None:
    for _ in range(5):
        c = await Client(server.url).connect()
        await c.login("again")
        await c.disconnect()  # the next login may arrive while this leave commits


async def test_chats_of_one_sender_keep_their_order_everywhere(server: InProcessServer, db_url: str) -> None:
    senders = [await Client(server.url).connect() for _ in range(3)]
    watcher = await Client(server.url).connect()
    try:
        await watcher.login("watch")
        for i, s in enumerate(senders):
            await s.login(f"send{i}")
        n = 60

        async def blast(i: int, s: Client) -> None:
            # Fire without waiting: each event runs in its own server task.
            for k in range(n):
                await s.emit("chat", f"{i}:{k}")

        await asyncio.gather(*(blast(i, s) for i, s in enumerate(senders)))
        await watcher.wait_event("chat", count=3 * n, timeout=20)
        for c in (watcher, *senders):
            await c.wait_event("chat", count=3 * n, timeout=20)
            for i in range(3):
                got = [m["message"] for m in c.events("chat") if m["sender"] == f"send{i}"]
                assert got == [f"{i}:{k}" for k in range(n)]
            positions = [m["position"] for m in c.events("chat")]
            assert positions == sorted(positions)
    finally:
        for c in (*senders, watcher):
            await c.disconnect()
    log = await read_log(db_url)
    for i in range(3):
        stored = [m for t, s, _v, m in log if t == "MessagePosted" and s == f"user-send{i}"]
        assert stored == [f"{i}:{k}" for k in range(n)]


async def test_a_stale_view_of_a_name_is_corrected_by_the_log(db_url: str) -> None:
    # Two servers on one database: each knows only its own appends, so its
    # idea of a name's stream goes stale. The unique (stream, version) makes
    # the append fail, and the server reads the log and decides again.
    async with (
        running_server(settings_for(db_url, node_id="one")) as one,
        running_server(settings_for(db_url, node_id="two")) as two,
    ):
        a = await Client(one.url).connect()
        await a.login("alice")
        b = await Client(two.url).connect()
        try:
            assert (await b.call("login", "alice"))["error"] == "name_taken"  # online on the other server
            await a.disconnect()
            await asyncio.sleep(0.2)
            c = await Client(two.url).connect()
            await c.login("alice")  # the other server's leave is in the log
            await c.disconnect()
            d = await Client(one.url).connect()
            await d.login("alice")  # server one thinks alice is still at version 3
            await d.disconnect()
        finally:
            await b.disconnect()
    log = [(t, s, v) for t, s, v, _ in await read_log(db_url) if s == "user-alice"]
    assert [v for _, _, v in log] == list(range(1, 10))
