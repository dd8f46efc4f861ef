"""History on join, paging back, and resuming a session without losing a
message (issue: reconnect without losing a message)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support import Client, InProcessServer, log_of, running_server, settings_for


def chats(c: Client) -> list[str]:
    return [m["message"] for m in c.events("chat")]


async def test_late_joiner_gets_recent_history_and_pages_to_the_start(db_url: str) -> None:
    async with running_server(settings_for(db_url, history_size=10)) as srv:
        a = await Client(srv.url).connect()
        await a.login("alice")
        for i in range(25):
            await a.call("chat", f"m{i}")
        b = await Client(srv.url).connect()
        try:
            await b.login("bobby")
            [history] = b.events("history")
            assert [e for e, _ in b.received][:3] == ["welcome", "history", "userJoined"]
            items = history["items"]
            assert history["reachedStart"] is False
            assert [i["message"] for i in items] == [f"m{i}" for i in range(15, 25)]
            assert all(i["kind"] == "chat" and i["sender"] == "alice" for i in items)
            assert [i["position"] for i in items] == sorted(i["position"] for i in items)
            # Page back to the very first item.
            pages = []
            before = items[0]["position"]
            while True:
                page = await b.call("history", {"before": before, "limit": 7})
                assert page["ok"] is True
                pages.append(page)
                if page["reachedStart"]:
                    break
                before = page["items"][0]["position"]
            older = [i for p in reversed(pages) for i in p["items"]]
            assert [i["kind"] for i in older[:1]] == ["join"] and older[0]["name"] == "alice"
            assert [i["message"] for i in older[1:]] == [f"m{i}" for i in range(15)]
            # Requests are checked; limits are capped.
            assert (await b.call("history", {"before": "x"}))["error"] == "bad_payload"
            assert (await b.call("history", {"limit": 10_000}))["ok"] is True
        finally:
            await a.disconnect()
            await b.disconnect()


async def test_history_before_login_is_refused(server: InProcessServer) -> None:
    c = await Client(server.url).connect()
    try:
        assert (await c.call("history", {"limit": 5}))["error"] == "not_logged_in"
    finally:
        await c.disconnect()


async def test_history_contains_joins_and_leaves(server: InProcessServer) -> None:
    a = await Client(server.url).connect()
    await a.login("alice")
    await a.call("chat", "<b>hi</b>")
    await a.disconnect()
    b = await Client(server.url).connect()
    try:
        await b.login("bobby")
        items = b.events("history")[0]["items"]
        assert [(i["kind"], i.get("name") or i.get("sender")) for i in items] == [
            ("join", "alice"),
            ("chat", "alice"),
            ("leave", "alice"),
        ]
        assert items[1]["message"] == "<b>hi</b>" and items[2]["reason"] == "disconnected"
        assert b.events("history")[0]["reachedStart"] is True
    finally:
        await b.disconnect()


async def alice_and_bobby(url: str) -> tuple[Client, Client]:
    """Two logged-in clients: alice first, then bobby."""
    a = await Client(url).connect()
    b = await Client(url).connect()
    await a.login("alice")
    await b.login("bobby")
    return a, b


async def resume(url: str, token: str, last: int, *, via_auth: bool = False) -> Client:
    c = Client(url)
    if via_auth:
        await c.connect(auth={"resumeToken": token, "lastPosition": last})
        await c.wait_event("welcome")
    else:
        await c.connect()
        ack = await c.call("resume", {"token": token, "lastPosition": last})
        assert ack["ok"] is True, ack
    return c


async def test_resume_replays_exactly_what_was_missed(server: InProcessServer, db_url: str) -> None:
    a, b = await alice_and_bobby(server.url)
    await b.call("chat", "before")
    await a.wait_for(lambda: chats(a) == ["before"])
    token = a.events("welcome")[0]["resumeToken"]
    last = a.events("chat")[-1]["position"]
    await a.disconnect()
    await b.wait_for(lambda: b.events("userLeft") == ["alice"])
    for i in range(20):
        await b.call("chat", f"missed {i}")
    a2 = await resume(server.url, token, last, via_auth=True)
    try:
        await a2.wait_for(lambda: len(chats(a2)) == 20)
        welcome = a2.events("welcome")[0]
        assert welcome["name"] == "alice" and welcome["resumed"] is True
        assert welcome["resumeToken"] != token  # rotated
        assert chats(a2) == [f"missed {i}" for i in range(20)]
        await a2.wait_for(lambda: a2.events("userJoined") == ["alice"])
        # Exactly: the leave and the rejoin, in log order, and no history push.
        kinds = [e for e, _ in a2.received]
        assert kinds == ["welcome", "userLeft"] + ["chat"] * 20 + ["userJoined"]
        await b.call("chat", "live")
        await a2.wait_for(lambda: chats(a2)[-1:] == ["live"])
        assert (await a2.call("chat", "back"))["ok"] is True
        assert await a2.call("onlineUsers") == ["bobby", "alice"]
        # Others saw the truth: alice left, then joined again.
        assert b.events("userLeft") == ["alice"] and b.events("userJoined")[-1] == "alice"
    finally:
        await a2.disconnect()
        await b.disconnect()


async def test_resume_hand_off_is_exact_while_others_keep_chatting(db_url: str) -> None:
    async with running_server(settings_for(db_url, rate_per_second=0)) as srv:
        a = await Client(srv.url).connect()
        senders = [await Client(srv.url).connect() for _ in range(3)]
        await a.login("alice")
        for i, s in enumerate(senders):
            await s.login(f"snd{i}")
        token = a.events("welcome")[0]["resumeToken"]
        await senders[0].call("chat", "seen")
        await a.wait_for(lambda: "seen" in chats(a))
        last = a.events("chat")[-1]["position"]
        await a.disconnect()
        stop = asyncio.Event()

        async def chatter(i: int, s: Client) -> None:
            k = 0
            while not stop.is_set():
                await s.call("chat", f"{i}:{k}")
                k += 1
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(chatter(i, s)) for i, s in enumerate(senders)]
        await asyncio.sleep(0.3)
        a2 = await resume(srv.url, token, last)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        await senders[0].call("chat", "final")
        await a2.wait_for(lambda: "final" in chats(a2), timeout=20)
        for c in (a2, *senders):
            await c.disconnect()
    log = await log_of(db_url)
    expected = [e.position for e in log if e.type == "MessagePosted" and e.position > last]
    got = [m["position"] for m in a2.events("chat")]
    assert got == expected  # every chat after the last seen, once, in order
    assert len(got) > 30


async def test_resume_survives_a_server_restart(tmp_path: Path, db_url: str) -> None:
    async with running_server(settings_for(db_url)) as srv:
        a, b = await alice_and_bobby(srv.url)
        token = a.events("welcome")[0]["resumeToken"]
        last = a.events("welcome")[0]["position"]
        await a.disconnect()
        await b.call("chat", "while you were away")
        await b.disconnect()
    async with running_server(settings_for(db_url)) as srv2:
        a2 = await resume(srv2.url, token, last)
        try:
            await a2.wait_for(lambda: "while you were away" in chats(a2))
            assert a2.events("welcome")[0]["name"] == "alice"
            assert await a2.call("onlineUsers") == ["alice"]
        finally:
            await a2.disconnect()


async def test_resume_takes_over_a_half_open_session(server: InProcessServer, db_url: str) -> None:
    a, b = await alice_and_bobby(server.url)
    token = a.events("welcome")[0]["resumeToken"]
    last = a.events("welcome")[0]["position"]
    # ``a`` stays connected: to the server it is still online.
    a2 = await resume(server.url, token, last)
    try:
        await a.wait_for(lambda: not a.sio.connected)
        await b.wait_for(lambda: b.events("userLeft") == ["alice"] and b.events("userJoined") == ["bobby", "alice"])
        assert await b.call("onlineUsers") == ["bobby", "alice"]
        assert (await a2.call("chat", "I am back"))["ok"]
        await b.wait_for(lambda: chats(b) == ["I am back"])
        assert b.events("chat")[0]["sender"] == "alice"
    finally:
        await a2.disconnect()
        await b.disconnect()
    log = await log_of(db_url)
    alice = [(e.type, getattr(e.event, "reason", None)) for e in log if e.stream == "user-alice"]
    assert alice[:5] == [
        ("UserLoggedIn", None),
        ("UserJoined", None),
        ("UserLeft", "taken over"),
        ("UserLoggedIn", None),
        ("UserJoined", None),
    ]


async def expect_refusal(url: str, request: object, code: str) -> Client:
    c = await Client(url).connect()
    ack = await c.call("resume", request)
    assert ack["ok"] is False and ack["error"] == code, ack
    await c.wait_event("resumeFailed")
    assert c.events("resumeFailed")[0]["code"] == code
    assert not c.events("welcome")
    return c


async def token_of_a_departed_login(url: str, name: str) -> str:
    """Log ``name`` in, keep its resume token, and leave."""
    a = await Client(url).connect()
    await a.login(name)
    token: str = a.events("welcome")[0]["resumeToken"]
    await a.disconnect()
    return token


async def test_bad_tokens_are_refused_and_login_still_works(server: InProcessServer) -> None:
    for request, code in [
        ({"token": "not-a-real-token-at-all", "lastPosition": 0}, "invalid_token"),
        ({"token": 12345, "lastPosition": 0}, "invalid_token"),
        ("just a string", "bad_payload"),
    ]:
        c = await expect_refusal(server.url, request, code)
        try:
            await c.login("fallbk")  # the client falls back to a normal login
        finally:
            await c.disconnect()
    # Via auth on connect: the refusal arrives as an event.
    c = Client(server.url)
    await c.connect(auth={"resumeToken": "x" * 43, "lastPosition": 0})
    try:
        await c.wait_event("resumeFailed")
        assert c.events("resumeFailed")[0]["code"] == "invalid_token"
    finally:
        await c.disconnect()


async def test_bad_last_position_is_refused(server: InProcessServer) -> None:
    token = await token_of_a_departed_login(server.url, "alice")
    c = await expect_refusal(server.url, {"token": token, "lastPosition": 10**9}, "bad_payload")
    await c.disconnect()


async def test_expired_token_is_refused(db_url: str) -> None:
    async with running_server(settings_for(db_url, resume_ttl_seconds=1)) as srv:
        token = await token_of_a_departed_login(srv.url, "alice")
        await asyncio.sleep(1.3)
        c = await expect_refusal(srv.url, {"token": token, "lastPosition": 0}, "expired_token")
        await c.disconnect()


async def test_foreign_token_never_yields_the_name(server: InProcessServer) -> None:
    # alice leaves; someone else logs in as alice; the first alice's token
    # must not take the name from the new holder.
    old_token = await token_of_a_departed_login(server.url, "alice")
    other = await Client(server.url).connect()
    await other.login("alice")
    c = await expect_refusal(server.url, {"token": old_token, "lastPosition": 0}, "invalid_token")
    try:
        assert other.sio.connected
        assert await other.call("onlineUsers") == ["alice"]
        assert (await other.call("chat", "still me"))["ok"]
    finally:
        await c.disconnect()
        await other.disconnect()
    # Even after the new holder left, the superseded token stays dead.
    c = await expect_refusal(server.url, {"token": old_token, "lastPosition": 0}, "invalid_token")
    await c.disconnect()


async def test_resume_on_a_logged_in_socket_is_refused(server: InProcessServer) -> None:
    a = await Client(server.url).connect()
    try:
        await a.login("alice")
        token = a.events("welcome")[0]["resumeToken"]
        ack = await a.call("resume", {"token": token, "lastPosition": 0})
        assert ack["error"] == "already_logged_in"
    finally:
        await a.disconnect()


def test_history_items_are_built_once_and_match_the_plain_payload() -> None:
    from datetime import UTC, datetime

    from chatserver import protocol
    from chatserver.events import MessagePosted, StoredEvent, UserJoined

    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    log = [
        StoredEvent(p, "user-a", p, MessagePosted(sender="a", message=f"m{p}") if p % 2 else UserJoined(name="a"), now)
        for p in range(1, 40)
    ]
    items = protocol.HistoryItems(keep=5)
    first = items.payload(log[:5], reached_start=True)
    assert first == protocol.history_payload(log[:5], reached_start=True)
    again = items.payload(log[:5], reached_start=False)
    assert again["reachedStart"] is False
    assert all(a is b for a, b in zip(first["items"], again["items"], strict=True))
    # The window moves on: old items are dropped, new ones still right.
    for start in range(35):
        assert items.payload(log[start : start + 5], True) == protocol.history_payload(log[start : start + 5], True)
    assert len(items._items) <= 10
