"""The seed protocol, case by case, against a real server and real clients."""

from __future__ import annotations

import asyncio

from chatserver.events import MessagePosted
from tests.support import Client, InProcessServer, log_of


async def connected(server: InProcessServer) -> Client:
    return await Client(server.url).connect()


async def test_login_welcome_then_joined_then_online_users(server: InProcessServer) -> None:
    a = await connected(server)
    try:
        ack = await a.call("login", "alice")
        assert ack["ok"] is True and ack["name"] == "alice"
        await a.wait_event("userJoined")
        await a.emit("onlineUsers")
        await a.wait_event("onlineUsers")
        await a.wait_event("conversations")
        names = [e for e, _ in a.received]
        # history and conversations are extensions a seed client ignores;
        # conversations comes when it has been read, after the history.
        assert [n for n in names if n != "conversations"] == ["welcome", "history", "userJoined", "onlineUsers"]
        assert names.index("conversations") > names.index("history")
        assert a.events("userJoined") == ["alice"]
        assert a.events("onlineUsers") == [["alice"]]
        welcome = a.events("welcome")[0]
        assert welcome["name"] == "alice" and isinstance(welcome["position"], int)
        assert welcome["resumed"] is False and len(welcome["resumeToken"]) >= 40
        assert a.events("history") == [{"items": [], "reachedStart": True}]
        # userJoined keeps the bare name first; {position, time} comes second.
        [(_, meta)] = [x for x in a.extra if x[0] == "userJoined"]
        assert meta[0]["position"] == welcome["position"] + 1 and meta[0]["time"].endswith("Z")
    finally:
        await a.disconnect()


async def test_seed_client_without_acks_works(server: InProcessServer) -> None:
    # The tutorial's client never asks for acknowledgements.
    a = await connected(server)
    try:
        await a.emit("login", "alice")
        await a.wait_event("welcome")
        await a.emit("onlineUsers")
        await a.emit("chat", "hi all")
        await a.wait_event("chat")
        assert a.events("chat")[0]["sender"] == "alice"
        assert a.events("chat")[0]["message"] == "hi all"
        assert a.events("onlineUsers") == [["alice"]]
    finally:
        await a.disconnect()


async def test_bad_names(server: InProcessServer) -> None:
    a = await connected(server)
    try:
        bad = ["ab", "abcdefghijk", "", 123, None, ["abc"], {"name": "abc"}, "a\x00bc", "   "]
        for value in bad:
            ack = await a.call("login", value)
            assert ack == {"ok": False, "error": "name_bad", "message": ack["message"]}, value
        await a.wait_event("loginNameBad", count=len(bad))
        assert a.events("loginNameBad") == bad
        assert not a.events("welcome")
        # Boundaries that are good: 3 and 10 characters.
        assert (await a.call("login", "abc"))["ok"]
    finally:
        await a.disconnect()


async def test_name_exists_exact_comparison(server: InProcessServer) -> None:
    a, b = await connected(server), await connected(server)
    try:
        await a.login("alice")
        ack = await b.call("login", "alice")
        assert ack["ok"] is False and ack["error"] == "name_taken"
        await b.wait_event("loginNameExists")
        assert b.events("loginNameExists") == ["alice"]
        # Exact comparison, as in the seed: another case is another name.
        await b.login("Alice")
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_name_free_again_after_leave(server: InProcessServer) -> None:
    a = await connected(server)
    await a.login("alice")
    await a.disconnect()
    b = await connected(server)
    try:
        await b.login("alice")
    finally:
        await b.disconnect()


async def test_second_login_on_same_socket_is_refused(server: InProcessServer) -> None:
    a = await connected(server)
    try:
        await a.login("alice")
        ack = await a.call("login", "bobby")
        assert ack["ok"] is False and ack["error"] == "already_logged_in"
        await a.wait_event("protocolError")
        assert a.events("protocolError")[0]["code"] == "already_logged_in"
        assert a.events("protocolError")[0]["event"] == "login"
        assert await a.call("onlineUsers") == ["alice"]
    finally:
        await a.disconnect()


async def test_events_before_login_get_errors(server: InProcessServer) -> None:
    a, watcher = await connected(server), await connected(server)
    try:
        await watcher.login("watch")
        assert await a.call("chat", "hello") == {
            "ok": False,
            "error": "not_logged_in",
            "message": "log in first",
        }
        assert (await a.call("onlineUsers"))["error"] == "not_logged_in"
        await a.wait_event("protocolError", count=2)
        assert [e["event"] for e in a.events("protocolError")] == ["chat", "onlineUsers"]
        assert not watcher.events("chat")
    finally:
        await a.disconnect()
        await watcher.disconnect()


async def test_bad_chat_payloads(server: InProcessServer) -> None:
    a = await connected(server)
    try:
        await a.login("alice")
        cases = {
            "": "empty_message",
            "   ": "empty_message",
            "x" * 2001: "message_too_long",
            "bell\x07": "bad_payload",
        }
        for value, code in cases.items():
            assert (await a.call("chat", value))["error"] == code
        for value in (None, 5, ["a"], {"message": "a"}, True):
            assert (await a.call("chat", value))["error"] == "bad_payload", value
        ok = await a.call("chat", "x" * 2000)
        assert ok["ok"] is True
        await a.wait_event("chat")
        assert len(a.events("chat")) == 1
        assert len(a.events("protocolError")) == 9
    finally:
        await a.disconnect()


async def test_oversized_packet_is_dropped_and_others_keep_going(server: InProcessServer) -> None:
    a, b = await connected(server), await connected(server)
    try:
        await a.login("alice")
        await b.login("bobby")
        # Beyond the engine.io packet limit the connection is closed.
        await a.emit("chat", "y" * (server.settings.max_packet_bytes + 10))
        await b.wait_for(lambda: "alice" in b.events("userLeft"))
        assert (await b.call("chat", "still here"))["ok"]
    finally:
        await b.disconnect()
        await a.disconnect()


async def test_chat_ack_and_extra_fields(server: InProcessServer) -> None:
    a = await connected(server)
    try:
        await a.login("alice")
        ack = await a.call("chat", "<img src=x onerror=alert(1)>")
        assert ack["ok"] is True and isinstance(ack["position"], int)
        await a.wait_event("chat")
        chat = a.events("chat")[0]
        assert chat["message"] == "<img src=x onerror=alert(1)>"
        assert chat["position"] == ack["position"]
        assert chat["time"].endswith("Z")
    finally:
        await a.disconnect()


async def test_flood_is_rate_limited(db_url: str) -> None:
    from tests.support import running_server, settings_for

    async with running_server(settings_for(db_url, rate_per_second=5, rate_burst=10)) as srv:
        a = await Client(srv.url).connect()
        try:
            await a.login("alice")
            acks = await asyncio.gather(*(a.call("chat", f"m{i}") for i in range(30)))
            refused = [x for x in acks if not x["ok"]]
            assert refused and all(x["error"] == "rate_limited" for x in refused)
            assert len(a.events("protocolError")) <= 2  # one notice a second
        finally:
            await a.disconnect()


async def test_store_failure_is_refused_clearly_and_others_keep_going(server: InProcessServer, db_url: str) -> None:
    import sqlalchemy as sa

    from chatserver.database import create_engine

    a = await connected(server)
    b = await connected(server)
    try:
        await a.login("alice")
        engine = create_engine(db_url, writer=True)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text("ALTER TABLE events RENAME TO events_away"))
            ack = await a.call("chat", "lost?")
            assert ack["ok"] is False and ack["error"] == "not_stored"
            ack = await b.call("login", "bobby")
            assert ack["ok"] is False and ack["error"] == "server_error"
            await b.wait_event("protocolError")
            assert await a.call("onlineUsers") == ["alice"]
            assert not a.events("chat")  # nothing unstored was broadcast
            async with engine.begin() as conn:
                await conn.execute(sa.text("ALTER TABLE events_away RENAME TO events"))
        finally:
            await engine.dispose()
        assert (await a.call("chat", "back"))["ok"]
        await b.login("bobby")
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_a_chat_retried_with_its_id_is_stored_and_broadcast_once(server: InProcessServer) -> None:
    a, b = await connected(server), await connected(server)
    try:
        await a.login("alice")
        await b.login("bobby")
        first = await a.call("chat", "only once", {"id": "c-1"})
        again = await a.call("chat", "only once", {"id": "c-1"})
        assert first["ok"] and again == first  # the original answer
        other = await a.call("chat", "next", {"id": "c-2"})
        assert other["position"] > first["position"]
        await b.wait_for(lambda: [m["message"] for m in b.events("chat")] == ["only once", "next"])
        bad = await a.call("chat", "x", {"id": "has space"})
        assert bad["error"] == "bad_payload"
        # Ids are the sender's own: another user's "c-1" is another chat.
        assert (await b.call("chat", "mine", {"id": "c-1"}))["position"] > other["position"]
    finally:
        await a.disconnect()
        await b.disconnect()
    log = [e.event.message for e in await log_of(server.settings.database_url) if isinstance(e.event, MessagePosted)]
    assert log == ["only once", "next", "mine"]
