"""Rooms and private messages (issue 12), end to end, written from the
shared protocol spec independently of the server: real servers on loopback,
real Socket.IO clients, and the event log read back so that what every
client saw is compared with what the spec entitles it to see."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import socketio
import sqlalchemy as sa

from chatserver.config import Settings
from chatserver.database import create_engine
from tests.support import Client, InProcessServer, Postgres, ServerProcess, free_port, running_server

ROOM_EVENTS = ("conversations", "roomCreated", "roomJoined", "roomLeft", "roomChat", "privateMessage")
# Events that carry a log position: every one a client may be entitled to.
POSITIONED = ("chat", "roomChat", "roomJoined", "roomLeft", "roomCreated", "privateMessage")
SEED_EVENTS = {"welcome", "history", "userJoined", "userLeft", "chat", "onlineUsers"}


class RoomClient(Client):
    """The support Client, also recording the new events and, through a
    catch-all, any event nobody expected (so a leak cannot go unseen)."""

    EVENTS = Client.EVENTS + tuple(e for e in ROOM_EVENTS if e not in Client.EVENTS)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sio.on("*", self._unexpected)

    async def _unexpected(self, event: str, *args: Any) -> None:
        await self._recorder(event)(*args)

    async def ok(self, event: str, *args: Any) -> dict[str, Any]:
        ack = await self.call(event, *args)
        assert isinstance(ack, dict) and ack.get("ok") is True, (event, args, ack)
        return ack

    async def refused(self, event: str, *args: Any, code: str | set[str]) -> dict[str, Any]:
        """A refusal: ``{ok: false, error, message}`` and a ``protocolError`` for it."""
        codes = {code} if isinstance(code, str) else code
        before = len(self.events("protocolError"))
        ack = await self.call(event, *args)
        assert isinstance(ack, dict) and ack.get("ok") is False and ack.get("error") in codes, (event, args, ack)
        assert set(ack) == {"ok", "error", "message"} and isinstance(ack["message"], str), ack
        await self.wait_for(lambda: len(self.events("protocolError")) > before)
        notice = self.events("protocolError")[before]
        assert notice["event"] == event and notice["code"] == ack["error"], notice
        return ack

    def last(self, name: str) -> Any:
        return self.events(name)[-1]


def room_settings(database_url: str, **env: str) -> Settings:
    """Settings read the way the server reads them, so the limits are set by
    their documented environment names (CHAT_ROOMS_PER_USER, ...)."""
    return Settings.from_env(
        {"HOST": "127.0.0.1", "PORT": str(free_port()), "CHAT_DATABASE_URL": database_url, **env}
    )


@pytest.fixture
async def srv(db_url: str) -> AsyncIterator[InProcessServer]:
    async with running_server(room_settings(db_url)) as server:
        yield server


@contextlib.asynccontextmanager
async def users(url: str, *names: str) -> AsyncIterator[list[RoomClient]]:
    """Logged-in clients, in the order given; all disconnected at the end."""
    clients: list[RoomClient] = []
    try:
        for name in names:
            c = await RoomClient(url).connect()
            clients.append(c)
            await c.login(name)
        yield clients
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.disconnect()


async def login(url: str, name: str) -> RoomClient:
    c = await RoomClient(url).connect()
    await c.login(name)
    return c


# --- the log, read back without the server's own classes ----------------------


async def raw_log(database_url: str) -> list[dict[str, Any]]:
    """Every stored event as {position, stream, type, payload, scope}."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text("SELECT position, stream, type, payload, scope FROM events ORDER BY position")
                )
            ).all()
    finally:
        await engine.dispose()
    return [
        {
            "position": r[0],
            "stream": r[1],
            "type": r[2],
            "payload": r[3] if isinstance(r[3], dict) else json.loads(r[3]),
            "scope": r[4],
        }
        for r in rows
    ]


def entitled(name: str, log: list[dict[str, Any]], after: int) -> list[int]:
    """Positions after ``after`` of the events the spec lets ``name`` see,
    in log order: lobby seed events, every RoomCreated, the room events of
    rooms it is a member of at that point of the log (its own join and
    leave included) and its own private messages."""
    rooms: set[str] = set()
    out = []
    for e in log:
        p, kind = e["payload"], e["type"]
        visible = False
        if kind in ("UserJoined", "UserLeft"):
            visible = p.get("room", "lobby") == "lobby"
        elif kind == "MessagePosted":
            room = p.get("room", "lobby").casefold()
            visible = room == "lobby" or room in rooms
        elif kind == "RoomCreated":
            visible = True
            if p["creator"] == name:
                rooms.add(p["room"].casefold())
        elif kind == "RoomJoined":
            if p["name"] == name:
                rooms.add(p["room"].casefold())
            visible = p["room"].casefold() in rooms
        elif kind == "RoomLeft":
            visible = p["room"].casefold() in rooms
            if p["name"] == name:
                rooms.discard(p["room"].casefold())
        elif kind == "PrivateMessageSent":
            visible = name in (p["sender"], p["recipient"])
        if visible and e["position"] > after:
            out.append(e["position"])
    return out


def seen_positions(c: Client) -> list[int]:
    """Positions of every positioned event the client received, in arrival order."""
    out = []
    for (event, data), (_e, extra) in zip(c.received, c.extra, strict=True):
        if event in ("userJoined", "userLeft"):
            out.append(extra[0]["position"])
        elif event in POSITIONED:
            out.append(data["position"])
    return out


def assert_saw_its_view(c: Client, name: str, log: list[dict[str, Any]], after: int, upto: int) -> None:
    got = [p for p in seen_positions(c) if p <= upto]
    want = [p for p in entitled(name, log, after) if p <= upto]
    by_pos = {e["position"]: (e["type"], e["payload"]) for e in log}
    assert got == want, (
        name,
        [by_pos.get(p) for p in sorted(set(got) - set(want))],  # leaked
        [by_pos.get(p) for p in sorted(set(want) - set(got))],  # missed
    )


async def barrier(poster: RoomClient, clients: list[RoomClient], text: str = "sync") -> int:
    """A lobby chat every client waits for. Each socket gets events in log
    order, so once it has this chat it has had everything before it: a later
    'never received' check is then a fact, not a guess after a sleep."""
    ack = await poster.ok("chat", text)
    for c in clients:
        await c.wait_for(lambda c=c: any(m["position"] == ack["position"] for m in c.events("chat")))
    return ack["position"]


def check_scopes_and_streams(log: list[dict[str, Any]]) -> None:
    """The spec's `scope` column and streams of the new events."""
    for e in log:
        p, kind = e["payload"], e["type"]
        if kind in ("MessagePosted", "UserJoined", "UserLeft"):
            assert e["scope"] == "room:" + p.get("room", "lobby").casefold(), e
        elif kind == "RoomCreated":
            assert e["scope"] == "room:" + p["room"].casefold(), e
            assert e["stream"] == "room-" + p["room"].casefold(), e
        elif kind in ("RoomJoined", "RoomLeft"):
            assert e["scope"] == "room:" + p["room"].casefold(), e
            assert e["stream"] == "user-" + p["name"], e
        elif kind == "PrivateMessageSent":
            assert e["scope"] == "dm:" + "\t".join(sorted((p["sender"], p["recipient"]))), e
            assert e["stream"] == "user-" + p["sender"], e
        elif kind == "UserLoggedIn":
            assert e["scope"] is None, e


def room_chats(log: list[dict[str, Any]], room: str) -> list[tuple[int, str]]:
    """(position, sender) of a room's chats in the log."""
    return [
        (e["position"], e["payload"]["sender"])
        for e in log
        if e["type"] == "MessagePosted" and e["payload"]["room"].casefold() == room.casefold()
    ]


def room_of(rows: list[dict[str, Any]], room: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["room"].casefold() == room.casefold()]
    return row


# --- creating, joining, leaving ------------------------------------------------


async def test_room_names_case_and_the_lobby(srv: InProcessServer, db_url: str) -> None:
    lurker = await RoomClient(srv.url).connect()  # on the login screen: gets nothing
    async with users(srv.url, "alice", "bobby") as (a, b):
        ack = await a.ok("createRoom", {"room": "Dev", "topic": "Python"})
        assert set(ack) == {"ok", "room", "topic", "position"}
        assert (ack["room"], ack["topic"]) == ("Dev", "Python") and isinstance(ack["position"], int)
        # Every logged-in socket hears of it, member or not.
        for c in (a, b):
            await c.wait_event("roomCreated")
            created = c.last("roomCreated")
            assert set(created) == {"room", "topic", "creator", "position", "time"}
            assert (created["room"], created["topic"], created["creator"]) == ("Dev", "Python", "alice")
            assert created["position"] == ack["position"] and created["time"].endswith("Z")
        # One room whatever the case; it keeps the case it was created with.
        for name in ("dev", "DEV", "dEv"):
            await b.refused("createRoom", {"room": name}, code="room_exists")
        join = await b.ok("joinRoom", {"room": "dEV"})
        assert join["room"] == "Dev" and isinstance(join["position"], int)
        members = await b.ok("roomMembers", {"room": "DEV"})
        assert members["room"] == "Dev"
        assert sorted(members["members"], key=lambda m: m["name"]) == [
            {"name": "alice", "online": True},
            {"name": "bobby", "online": True},
        ]
        # Name rules: 2..20 characters, NFC, visible, single inner spaces.
        for bad in ("x", "y" * 21, " lead", "trail ", "two  spaces", "tab\there", "zero\u200bwidth", "\u202eevil", ""):
            await a.refused("createRoom", {"room": bad}, code="room_name_bad")
        assert (await a.ok("createRoom", {"room": "ab"}))["room"] == "ab"
        assert (await a.ok("createRoom", {"room": "z" * 20}))["room"] == "z" * 20
        assert (await a.ok("createRoom", {"room": "my room"}))["topic"] == ""
        # NFC first: a decomposed é is the composed one.
        assert (await a.ok("createRoom", {"room": "Cafe\u0301"}))["room"] == "Caf\u00e9"
        await b.refused("createRoom", {"room": "CAF\u00c9"}, code="room_exists")
        # Topic: 0..200 characters.
        assert (await a.ok("createRoom", {"room": "topics", "topic": "t" * 200}))["topic"] == "t" * 200
        await a.refused("createRoom", {"room": "topic2", "topic": "t" * 201}, code={"bad_payload", "message_too_long"})
        # The lobby: cannot be created (any case), joining it answers ok, leaving it is refused.
        for lobby in ("lobby", "Lobby", "LOBBY"):
            await a.refused("createRoom", {"room": lobby}, code={"room_exists", "room_name_bad"})
        assert (await a.ok("joinRoom", {"room": "Lobby"}))["ok"] is True
        await a.refused("leaveRoom", {"room": "lobby"}, code="cannot_leave_lobby")
        await a.refused("joinRoom", {"room": "nowhere"}, code="no_such_room")
        await a.refused("roomMembers", {"room": "nowhere"}, code="no_such_room")
        await barrier(a, [a, b])
    await asyncio.sleep(0.1)
    assert lurker.received == []
    await lurker.disconnect()
    log = await raw_log(db_url)
    created = [e["payload"] for e in log if e["type"] == "RoomCreated"]
    assert [c["room"] for c in created] == ["Dev", "ab", "z" * 20, "my room", "Caf\u00e9", "topics"]
    assert created[0] == {"room": "Dev", "creator": "alice", "topic": "Python"}
    check_scopes_and_streams(log)


async def test_join_leave_members_and_list(srv: InProcessServer, db_url: str) -> None:
    async with users(srv.url, "alice", "bobby", "carol") as (a, b, c):
        start = c.events("welcome")[0]["position"]
        await a.ok("createRoom", {"room": "Dev"})
        join = await b.ok("joinRoom", {"room": "dev"})
        # The members (the joiner included) hear of a join; others do not.
        for member in (a, b):
            await member.wait_for(lambda m=member: any(j["name"] == "bobby" for j in m.events("roomJoined")))
            j = [j for j in member.events("roomJoined") if j["name"] == "bobby"][0]
            assert set(j) == {"room", "name", "position", "time"}
            assert (j["room"], j["position"]) == ("Dev", join["position"])
        again = await b.ok("joinRoom", {"room": "DEV"})
        assert again == {"ok": True, "room": "Dev", "position": None}
        listed = await c.ok("listRooms", {})
        dev = room_of(listed["rooms"], "Dev")
        assert dev == {"room": "Dev", "topic": "", "members": 2, "online": 2, "member": False}
        assert room_of((await b.ok("listRooms", {}))["rooms"], "dev")["member"] is True
        # Online in a room = its members who are online.
        await a.disconnect()
        await b.wait_for(lambda: "alice" in b.events("userLeft"))
        assert room_of((await c.ok("listRooms", {}))["rooms"], "Dev")["online"] == 1
        members = await c.ok("roomMembers", {"room": "Dev"})
        assert sorted((m["name"], m["online"]) for m in members["members"]) == [("alice", False), ("bobby", True)]
        # Leaving: the leaver and the remaining members are told.
        await c.ok("joinRoom", {"room": "Dev"})
        left = await b.ok("leaveRoom", {"room": "DEV"})
        assert left["room"] == "Dev" and isinstance(left["position"], int)
        for member in (b, c):
            await member.wait_event("roomLeft")
            assert member.last("roomLeft") == {
                "room": "Dev",
                "name": "bobby",
                "position": left["position"],
                "time": member.last("roomLeft")["time"],
            }
        await b.refused("leaveRoom", {"room": "Dev"}, code="not_a_member")
        await b.refused("leaveRoom", {"room": "nowhere"}, code={"no_such_room", "not_a_member"})
        # Once gone, bobby no longer hears the room.
        await c.ok("chat", "bobby is gone", {"room": "Dev"})
        a2 = await login(srv.url, "alice")
        try:
            upto = await barrier(c, [b, c, a2])
            log = await raw_log(db_url)
            assert_saw_its_view(b, "bobby", log, b.events("welcome")[0]["position"], upto)
            assert_saw_its_view(c, "carol", log, start, upto)
            assert not [m for m in b.events("roomChat")]
        finally:
            await a2.disconnect()


async def test_list_rooms_pages_in_case_insensitive_order(srv: InProcessServer) -> None:
    async with users(srv.url, "alice") as (a,):
        for name in ["echo", "Bravo", "alpha", "Delta", "charlie"]:
            await a.ok("createRoom", {"room": name})
        pages, after = [await a.ok("listRooms", {"limit": 2})], None
        while pages[-1]["more"]:
            after = pages[-1]["rooms"][-1]["room"].upper()  # `after` is a room name, in any case
            pages.append(await a.ok("listRooms", {"after": after, "limit": 2}))
        listed = [r["room"] for p in pages for r in p["rooms"] if r["room"] != "lobby"]
        assert listed == ["alpha", "Bravo", "charlie", "Delta", "echo"]
        everything = await a.ok("listRooms", {})
        assert [r["room"] for r in everything["rooms"] if r["room"] != "lobby"] == listed
        assert everything["more"] is False
        # Whether the lobby is listed or not, it takes its place in name order.
        every = [r["room"] for p in pages for r in p["rooms"]]
        assert every == sorted(every, key=str.casefold)
        assert [r["room"] for r in (await a.ok("listRooms", {"after": "ECHO"}))["rooms"] if r["room"] != "lobby"] == []


async def test_a_list_rooms_page_holds_at_most_limit_rooms_in_name_order(srv: InProcessServer) -> None:
    async with users(srv.url, "alice") as (a,):
        for name in ["Bravo", "alpha"]:
            await a.ok("createRoom", {"room": name})
        first = await a.ok("listRooms", {"limit": 2})
        assert len(first["rooms"]) <= 2, first
        names = [r["room"] for r in first["rooms"]]
        assert names == sorted(names, key=str.casefold), names


# --- chatting in rooms: who receives what ------------------------------------


async def test_chat_in_several_rooms_reaches_exactly_their_members(db_url: str) -> None:
    async with (
        running_server(room_settings(db_url, CHAT_RATE_PER_SECOND="10000", CHAT_RATE_BURST="10000")) as server,
        users(server.url, "user0", "user1", "user2", "user3", "outsider") as clients,
    ):
        names = ["user0", "user1", "user2", "user3", "outsider"]
        rooms = {"Alpha": [0, 1, 2], "Beta": [1, 2, 3], "Gamma": [0, 3]}
        for room, idx in rooms.items():
            await clients[idx[0]].ok("createRoom", {"room": room})
            for i in idx[1:]:
                await clients[i].ok("joinRoom", {"room": room.lower()})
        n = 15

        async def talk(i: int) -> None:
            mine = [r for r, idx in rooms.items() if i in idx]
            acks = await asyncio.gather(
                *(clients[i].call("chat", f"{i}:{r}:{k}", {"room": r.upper()}) for r in mine for k in range(n)),
                clients[i].call("chat", f"{i}:lobby"),
            )
            assert all(a["ok"] for a in acks), acks

        await asyncio.gather(*(talk(i) for i in range(4)))
        # Refusals: not a member, no such room, room and to together.
        await clients[4].refused("chat", "let me in", {"room": "Alpha"}, code="not_a_member")
        await clients[0].refused("chat", "hello?", {"room": "Nowhere"}, code="no_such_room")
        await clients[0].refused("chat", "both", {"room": "Alpha", "to": "user1"}, code="bad_payload")
        upto = await barrier(clients[4], clients)
        log = await raw_log(db_url)
        for c, name in zip(clients, names, strict=True):
            assert_saw_its_view(c, name, log, c.events("welcome")[0]["position"], upto)
            # Room chats arrive as roomChat, never as the lobby's chat.
            assert all(m["message"].endswith(":lobby") or m["message"] == "sync" for m in c.events("chat"))
            got = c.events("roomChat")
            assert all(set(m) == {"room", "sender", "message", "position", "time"} for m in got)
            member_of = [r for r, idx in rooms.items() if names.index(name) in idx]
            assert {m["room"] for m in got} == set(member_of)  # canonical case in every payload
            for r in member_of:
                for i in rooms[r]:
                    # One sender's chats keep their order.
                    in_room = [m["message"] for m in got if m["room"] == r and m["sender"] == names[i]]
                    assert sorted(in_room, key=lambda s: int(s.rsplit(":", 1)[1])) == in_room
                    assert len(in_room) == n
        stored = [e["payload"] for e in log if e["type"] == "MessagePosted"]
        assert sum(1 for p in stored if p["room"] != "lobby") == n * sum(len(i) for i in rooms.values())
        assert {p["room"] for p in stored} == {"lobby", "Alpha", "Beta", "Gamma"}
        check_scopes_and_streams(log)


async def test_room_history_is_for_members_back_to_creation(srv: InProcessServer) -> None:
    async with users(srv.url, "alice", "bobby", "carol") as (a, b, c):
        created = await a.ok("createRoom", {"room": "Dev", "topic": "t"})
        for k in range(12):
            await a.ok("chat", f"dev {k}", {"room": "Dev"})
        await a.ok("chat", "lobby line")
        # Not a member, or no such room: no page at all.
        await c.refused("history", {"room": "Dev"}, code="not_a_member")
        await c.refused("history", {"room": "dev", "limit": 5}, code="not_a_member")
        await c.refused("history", {"room": "Nowhere"}, code="no_such_room")
        await a.refused("history", {"room": "Dev", "before": "x"}, code="bad_payload")
        await a.refused("history", {"room": "Dev", "limit": 0}, code="bad_payload")
        # A room chat retried with its id is stored and sent once.
        first = await a.ok("chat", "once in the room", {"room": "Dev", "id": "room-1"})
        assert await a.call("chat", "once in the room", {"room": "dev", "id": "room-1"}) == first
        await a.wait_for(lambda: any(m["position"] == first["position"] for m in a.events("roomChat")))
        # A late joiner pages back to the room's creation.
        join = await b.ok("joinRoom", {"room": "Dev"})
        page = await b.ok("history", {"room": "dev", "limit": 5})
        items = page["items"]
        assert [i["kind"] for i in items] == ["chat"] * 4 + ["join"]
        assert items[-1] == {
            "kind": "join",
            "position": join["position"],
            "time": items[-1]["time"],
            "name": "bobby",
            "room": "Dev",
        }
        pages = [page]
        while not pages[-1]["reachedStart"]:
            before = pages[-1]["items"][0]["position"]
            pages.append(await b.ok("history", {"room": "Dev", "before": before, "limit": 5}))
        older = [i for p in reversed(pages) for i in p["items"]]
        assert older[0] == {
            "kind": "created",
            "position": created["position"],
            "time": older[0]["time"],
            "name": "alice",
            "room": "Dev",
            "topic": "t",
        }
        chats = [i["message"] for i in older if i["kind"] == "chat"]
        assert chats == [f"dev {k}" for k in range(12)] + ["once in the room"]  # the retry stored once
        assert all(i["room"] == "Dev" for i in older)
        assert [i["position"] for i in older] == sorted({i["position"] for i in older})
        # The lobby's history holds none of it.
        lobby = await c.ok("history", {"limit": 200})
        assert [i.get("message") for i in lobby["items"] if i["kind"] == "chat"] == ["lobby line"]
        assert all("room" not in i or i["room"] == "lobby" for i in lobby["items"])
        # After leaving, the room's pages are closed again.
        await b.ok("leaveRoom", {"room": "Dev"})
        await b.refused("history", {"room": "Dev"}, code="not_a_member")
        assert (await a.ok("history", {"room": "Dev", "limit": 1}))["items"][0]["kind"] == "leave"


# --- private messages ---------------------------------------------------------


async def test_private_messages_online_and_offline(srv: InProcessServer, db_url: str) -> None:
    gone = await login(srv.url, "dave")  # seen once, then offline
    await gone.disconnect()
    async with users(srv.url, "alice", "bobby", "carol") as (a, b, c):
        ack = await a.ok("chat", "<b>psst</b>", {"to": "bobby"})
        assert set(ack) == {"ok", "position", "time"}
        for peer in (a, b):
            await peer.wait_event("privateMessage")
            assert peer.last("privateMessage") == {
                "sender": "alice",
                "recipient": "bobby",
                "message": "<b>psst</b>",
                "position": ack["position"],
                "time": ack["time"],
            }
        # Names are exact: another case is another (never seen) name.
        await a.refused("chat", "hi", {"to": "Bobby"}, code="no_such_user")
        await a.refused("chat", "hi", {"to": "nobody"}, code="no_such_user")
        await a.refused("history", {"with": "nobody"}, code="no_such_user")
        # Offline recipient: stored, and waiting for them.
        off = [await a.ok("chat", f"for dave {k}", {"to": "dave", "id": f"pm-{k}"}) for k in range(2)]
        assert await a.call("chat", "for dave 1", {"to": "dave", "id": "pm-1"}) == off[1]  # a retry: once
        upto = await barrier(c, [a, b, c])
        log = await raw_log(db_url)
        for client, name in ((a, "alice"), (b, "bobby"), (c, "carol")):
            assert_saw_its_view(client, name, log, client.events("welcome")[0]["position"], upto)
        assert c.events("privateMessage") == []
        d = await login(srv.url, "dave")
        try:
            await d.wait_event("conversations")
            kinds = [e for e, _ in d.received]
            assert kinds.index("welcome") < kinds.index("history") < kinds.index("conversations")
            summary = d.events("conversations")[0]
            page = await d.ok("history", {"with": "alice"})
            assert summary["private"] == [
                {
                    "with": "alice",
                    "online": True,
                    "unread": 2,
                    "lastPosition": off[1]["position"],
                    "readPosition": 0,
                    "last": page["items"][-1],  # the newest item, as history has it
                }
            ]
            assert summary["position"] >= off[1]["position"]
            assert [(i["kind"], i["sender"], i["recipient"], i["message"]) for i in page["items"]] == [
                ("private", "alice", "dave", "for dave 0"),
                ("private", "alice", "dave", "for dave 1"),
            ]
            assert page["reachedStart"] is True
            # A conversation is a pair: carol sees nothing of alice's.
            assert (await c.ok("history", {"with": "alice"}))["items"] == []
            assert (await d.ok("history", {"with": "bobby"}))["items"] == []
            # Paging is by position within the pair.
            older = await d.ok("history", {"with": "alice", "before": off[1]["position"]})
            assert [i["message"] for i in older["items"]] == ["for dave 0"]
            # The recipient answers: both sockets of the pair, no one else.
            reply = await d.ok("chat", "thanks", {"to": "alice"})
            await a.wait_for(lambda: any(m["position"] == reply["position"] for m in a.events("privateMessage")))
        finally:
            await d.disconnect()
        upto = await barrier(a, [a, b, c])
        log = await raw_log(db_url)
        assert_saw_its_view(b, "bobby", log, b.events("welcome")[0]["position"], upto)
        assert_saw_its_view(c, "carol", log, c.events("welcome")[0]["position"], upto)
    pms = [e["payload"] for e in log if e["type"] == "PrivateMessageSent"]
    assert pms == [
        {"sender": "alice", "recipient": "bobby", "message": "<b>psst</b>"},
        {"sender": "alice", "recipient": "dave", "message": "for dave 0"},
        {"sender": "alice", "recipient": "dave", "message": "for dave 1"},
        {"sender": "dave", "recipient": "alice", "message": "thanks"},
    ]
    check_scopes_and_streams(log)


async def test_conversations_lists_the_100_most_recent(db_url: str) -> None:
    async with running_server(room_settings(db_url)) as server:

        hub = await login(server.url, "hub")
        await hub.disconnect()
        senders = [f"p{i:03}" for i in range(101)]
        clients = []
        for batch in range(0, 101, 20):  # logins at once, a batch at a time
            clients += await asyncio.gather(*(login(server.url, name) for name in senders[batch : batch + 20]))
        try:
            # One after another: the conversations' order is known.
            positions = [
                (await c.ok("chat", f"hello from {name}", {"to": "hub"}))["position"]
                for c, name in zip(clients, senders, strict=True)
            ]
        finally:
            await asyncio.gather(*(c.disconnect() for c in clients))
        hub = await login(server.url, "hub")
        try:
            await hub.wait_event("conversations")
            private = hub.events("conversations")[0]["private"]
            assert [p["with"] for p in private] == senders[:0:-1]  # most recent first; p000 dropped
            assert [p["lastPosition"] for p in private] == positions[:0:-1]
            assert all(p["unread"] == 1 and p["online"] is False for p in private)
            # Left out of the list is not lost.
            page = await hub.ok("history", {"with": "p000"})
            assert [i["message"] for i in page["items"]] == ["hello from p000"]
        finally:
            await hub.disconnect()


# --- unread counts, markRead, persistence --------------------------------------


async def test_unread_counts_and_mark_read(db_url: str) -> None:
    async with (
        running_server(room_settings(db_url, CHAT_RATE_PER_SECOND="10000", CHAT_RATE_BURST="10000")) as server,
        users(server.url, "alice", "carol") as (a, c),
    ):
        b = await login(server.url, "bobby")
        await a.ok("createRoom", {"room": "Dev", "topic": "py"})
        await b.ok("joinRoom", {"room": "Dev"})
        await c.ok("joinRoom", {"room": "Dev"})
        await b.ok("chat", "mine do not count", {"room": "Dev"})
        await b.disconnect()
        dev = [await a.ok("chat", f"a{k}", {"room": "Dev"}) for k in range(3)]
        dev.append(await c.ok("chat", "c0", {"room": "Dev"}))
        pms = [await a.ok("chat", f"pm{k}", {"to": "bobby"}) for k in range(2)]
        await c.ok("chat", "pm from carol", {"to": "bobby"})
        b = await login(server.url, "bobby")
        try:
            await b.wait_event("conversations")
            summary = b.events("conversations")[0]
            assert set(summary) == {"position", "rooms", "private"}
            assert summary["rooms"][0]["room"] == "lobby"
            row = room_of(summary["rooms"], "Dev")
            assert set(row) == {"room", "topic", "members", "online", "unread", "lastPosition", "readPosition", "last"}
            assert (row["room"], row["topic"], row["members"], row["online"], row["unread"]) == ("Dev", "py", 3, 3, 4)
            assert row["lastPosition"] >= dev[-1]["position"]
            # `last`: the conversation's newest item, as history has it.
            assert row["last"] == (await b.ok("history", {"room": "Dev", "limit": 1}))["items"][0]
            assert row["last"]["message"] == "c0"
            # Most recent conversation first.
            assert [(p["with"], p["unread"], p["online"]) for p in summary["private"]] == [
                ("carol", 1, True),
                ("alice", 2, True),
            ]
            assert summary["private"][1]["lastPosition"] == pms[-1]["position"]
            for p in summary["private"]:
                assert p["last"] == (await b.ok("history", {"with": p["with"], "limit": 1}))["items"][0]
            assert [p["last"]["message"] for p in summary["private"]] == ["pm from carol", "pm1"]
            # markRead moves the read mark; the answer is the same summary shape.
            assert await b.call("markRead", {"room": "dev", "position": dev[1]["position"]}) == {
                "ok": True,
                "position": dev[1]["position"],
            }
            await b.ok("markRead", {"with": "alice", "position": pms[-1]["position"]})
            await b.ok("chat", "still mine", {"room": "Dev"})
            now = await b.ok("conversations")
            row = room_of(now["rooms"], "Dev")
            assert (row["unread"], row["readPosition"]) == (2, dev[1]["position"])
            alice = [p for p in now["private"] if p["with"] == "alice"][0]
            assert (alice["unread"], alice["readPosition"]) == (0, pms[-1]["position"])
            await b.refused("markRead", {"room": "Nowhere", "position": 1}, code="no_such_room")
            await b.refused("markRead", {"with": "nobody", "position": 1}, code="no_such_user")
            await a.ok("createRoom", {"room": "Private"})
            await b.refused("markRead", {"room": "Private", "position": 1}, code="not_a_member")
            acks = await asyncio.gather(*(c.call("chat", f"flood {k}", {"room": "Dev"}) for k in range(105)))
            assert all(x["ok"] for x in acks)
            # A summary is a snapshot at its `position` (the server may answer
            # a recent one again): its count matches the log up to there.
            snapshot = await b.ok("conversations")
            row = room_of(snapshot["rooms"], "Dev")
            others = [p for p, who in room_chats(await raw_log(db_url), "Dev") if who != "bobby"]
            assert row["unread"] == min(100, sum(row["readPosition"] < p <= snapshot["position"] for p in others))
        finally:
            await b.disconnect()
        # The read marks are stored: they survive logging out and in.
        b = await login(server.url, "bobby")
        try:
            await b.wait_event("conversations")
            again = b.events("conversations")[0]
            assert again["position"] >= acks[-1]["position"]  # a login's summary is taken after it
            assert room_of(again["rooms"], "Dev")["readPosition"] == dev[1]["position"]
            assert room_of(again["rooms"], "Dev")["unread"] == 100  # "100 means 100 or more"
            assert [p["readPosition"] for p in again["private"] if p["with"] == "alice"] == [pms[-1]["position"]]
        finally:
            await b.disconnect()
    assert any(e["type"] == "ConversationRead" for e in await raw_log(db_url))


async def test_membership_survives_logout_login_and_restart(db_url: str) -> None:
    settings = room_settings(db_url)
    async with running_server(settings) as server, users(server.url, "alice") as (a,):
        await a.ok("createRoom", {"room": "Dev"})
        await a.ok("createRoom", {"room": "Gone"})
        b = await login(server.url, "bobby")
        await b.ok("joinRoom", {"room": "Dev"})
        await b.ok("joinRoom", {"room": "Gone"})
        await b.ok("leaveRoom", {"room": "Gone"})
        await b.disconnect()
        b = await login(server.url, "bobby")
        try:
            await b.wait_event("conversations")
            assert [r["room"] for r in b.events("conversations")[0]["rooms"]] == ["lobby", "Dev"]
            sent = await a.ok("chat", "welcome back", {"room": "Dev"})
            await b.wait_for(lambda: [m["position"] for m in b.events("roomChat")] == [sent["position"]])
            listed = {r["room"]: r["member"] for r in (await b.ok("listRooms", {}))["rooms"]}
            assert (listed["Dev"], listed["Gone"]) == (True, False)
        finally:
            await b.disconnect()
    # A new server process folds memberships from the log.
    async with running_server(room_settings(db_url)) as server, users(server.url, "bobby") as (b,):
        await b.wait_event("conversations")
        assert [r["room"] for r in b.events("conversations")[0]["rooms"]] == ["lobby", "Dev"]
        members = await b.ok("roomMembers", {"room": "dev"})
        assert sorted((m["name"], m["online"]) for m in members["members"]) == [("alice", False), ("bobby", True)]
        assert (await b.ok("chat", "still here", {"room": "Dev"}))["ok"]


# --- resume -------------------------------------------------------------------


async def resume(url: str, token: str, last: int, *, via_auth: bool = False) -> RoomClient:
    c = RoomClient(url)
    if via_auth:  # the browser client's way: the token comes with the connection
        await c.connect(auth={"resumeToken": token, "lastPosition": last})
        await c.wait_event("welcome")
    else:
        await c.connect()
        ack = await c.call("resume", {"token": token, "lastPosition": last})
        assert ack["ok"] is True, ack
    return c


@pytest.mark.parametrize("via_auth", [False, True], ids=["resume-event", "connect-auth"])
async def test_resume_replays_rooms_and_pms_exactly_then_conversations(
    srv: InProcessServer, db_url: str, via_auth: bool
) -> None:
    async with users(srv.url, "alice", "bobby", "carol", "dave") as (a, b, c, d):
        await a.ok("createRoom", {"room": "Dev"})
        await a.ok("createRoom", {"room": "Ops"})
        await b.ok("joinRoom", {"room": "Dev"})
        await c.ok("joinRoom", {"room": "Ops"})
        await b.ok("createRoom", {"room": "Secret"})
        await d.ok("joinRoom", {"room": "Secret"})
        await d.ok("createRoom", {"room": "Old"})
        await a.ok("joinRoom", {"room": "Old"})
        await a.ok("leaveRoom", {"room": "Old"})
        last = await barrier(d, [a])
        token = a.events("welcome")[0]["resumeToken"]
        await a.disconnect()
        await b.wait_for(lambda: "alice" in b.events("userLeft"))
        # While alice is away: traffic she may see and traffic she may not.
        for k in range(3):
            await b.ok("chat", f"dev {k}", {"room": "Dev"})
            await d.ok("chat", f"secret {k}", {"room": "Secret"})
        await c.ok("chat", "ops 0", {"room": "ops"})
        await b.ok("chat", "to alice", {"to": "alice"})
        await b.ok("chat", "to carol", {"to": "carol"})
        await c.ok("chat", "carol to alice", {"to": "alice"})
        await d.ok("chat", "lobby while away")
        await c.ok("createRoom", {"room": "New"})
        await c.ok("joinRoom", {"room": "Dev"})
        await b.ok("leaveRoom", {"room": "Dev"})
        await d.ok("leaveRoom", {"room": "Secret"})
        await b.ok("chat", "secret after", {"room": "Secret"})
        await d.ok("chat", "alice left this room before", {"room": "Old"})
        a2 = await resume(srv.url, token, last, via_auth=via_auth)
        try:
            await a2.wait_event("conversations")
            upto = await barrier(d, [a2])
            log = await raw_log(db_url)
            assert_saw_its_view(a2, "alice", log, last, upto)
            kinds = [e for e, _ in a2.received]
            assert kinds[0] == "welcome" and kinds.count("conversations") == 1 and "history" not in kinds
            # Everything missed comes before the summary; the summary counts it.
            missed = [p for p in entitled("alice", log, last) if p < a2.events("welcome")[0]["position"]]
            before_summary = []
            for (event, data), (_e, extra) in zip(a2.received, a2.extra, strict=True):
                if event == "conversations":
                    break
                if event in ("userJoined", "userLeft"):
                    before_summary.append(extra[0]["position"])
                elif event in POSITIONED:
                    before_summary.append(data["position"])
            assert set(missed) <= set(before_summary), (missed, before_summary)
            summary = a2.events("conversations")[0]
            assert room_of(summary["rooms"], "Dev")["unread"] == 3
            assert room_of(summary["rooms"], "Ops")["unread"] == 1
            assert summary["rooms"][0]["room"] == "lobby"
            assert {r["room"] for r in summary["rooms"]} == {"lobby", "Dev", "Ops"}
            assert [(p["with"], p["unread"]) for p in summary["private"]] == [("carol", 1), ("bobby", 1)]
            # The secret room's chats never reach her, live or replayed.
            assert {m["room"] for m in a2.events("roomChat")} == {"Dev", "Ops"}
            await a2.refused("history", {"room": "Secret"}, code="not_a_member")
        finally:
            await a2.disconnect()
    check_scopes_and_streams(await raw_log(db_url))


async def test_resume_hand_off_is_exact_while_rooms_and_pms_keep_flowing(db_url: str) -> None:
    async with (
        running_server(room_settings(db_url, CHAT_RATE_PER_SECOND="10000", CHAT_RATE_BURST="10000")) as server,
        users(server.url, "alice", "bobby", "carol") as (a, b, c),
    ):
        await a.ok("createRoom", {"room": "Dev"})
        await b.ok("joinRoom", {"room": "Dev"})
        await c.ok("createRoom", {"room": "Hidden"})
        await b.ok("joinRoom", {"room": "Hidden"})
        last = await barrier(b, [a])
        token = a.events("welcome")[0]["resumeToken"]
        await a.disconnect()
        stop = asyncio.Event()

        async def talk(sender: RoomClient, tag: str, options: list[dict[str, str]]) -> int:
            k = 0
            while not stop.is_set():
                for o in options:
                    assert (await sender.call("chat", f"{tag} {k}", o))["ok"]
                k += 1
                await asyncio.sleep(0)
            return k

        load = [
            asyncio.create_task(talk(b, "b", [{"room": "Dev"}, {"to": "alice"}, {"room": "Hidden"}])),
            asyncio.create_task(talk(c, "c", [{"to": "alice"}, {"to": "bobby"}, {"room": "Hidden"}])),
        ]
        await asyncio.sleep(0.3)
        a2 = await resume(server.url, token, last)
        try:
            await asyncio.sleep(0.4)
            stop.set()
            counts = await asyncio.gather(*load)
            upto = await barrier(c, [a2], "final")
            log = await raw_log(db_url)
            assert_saw_its_view(a2, "alice", log, last, upto)
            assert min(counts) > 5
            assert len(a2.events("roomChat")) > 5 and len(a2.events("privateMessage")) > 10
            assert {m["room"] for m in a2.events("roomChat")} == {"Dev"}
            # The summary, taken while chats kept coming, counts exactly the
            # others' chats between its read mark and its own position.
            await a2.wait_event("conversations")
            summary = a2.events("conversations")[0]
            dev = room_of(summary["rooms"], "Dev")
            in_dev = [p for p, who in room_chats(log, "Dev") if who != "alice"]
            assert dev["unread"] == min(100, sum(dev["readPosition"] < p <= summary["position"] for p in in_dev))
            for peer in summary["private"]:
                from_peer = [
                    e for e in log
                    if e["type"] == "PrivateMessageSent"
                    and (e["payload"]["sender"], e["payload"]["recipient"]) == (peer["with"], "alice")
                ]
                assert peer["unread"] == min(
                    100, sum(peer["readPosition"] < e["position"] <= summary["position"] for e in from_peer)
                )
            assert {p["with"] for p in summary["private"]} == {"bobby", "carol"}
        finally:
            await a2.disconnect()


# --- a seed client among rooms and PMs ----------------------------------------


class SeedClient:
    """The tutorial's client: login, chat and onlineUsers, no acks; it
    records every event the server sends it, whatever its name."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sio = socketio.AsyncClient(reconnection=False)
        self.got: list[tuple[str, tuple[Any, ...]]] = []
        self.sio.on("*", self._any)

    async def _any(self, event: str, *args: Any) -> None:
        self.got.append((event, args))

    def of(self, event: str) -> list[tuple[Any, ...]]:
        return [args for e, args in self.got if e == event]

    async def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, self.got
            await asyncio.sleep(0.02)


async def test_a_seed_client_sees_only_the_lobby(srv: InProcessServer) -> None:
    seed = SeedClient(srv.url)
    await seed.sio.connect(srv.url, transports=["websocket"], wait_timeout=10)
    try:
        await seed.sio.emit("login", "seedy")
        await seed.wait(lambda: seed.of("userJoined"))
        async with users(srv.url, "alice", "bobby") as (a, b):
            await seed.sio.emit("chat", "hello from the seed")
            await seed.wait(lambda: seed.of("chat"))
            await a.ok("createRoom", {"room": "Dev"})
            await b.ok("joinRoom", {"room": "Dev"})
            await a.ok("chat", "room talk", {"room": "Dev"})
            await b.ok("chat", "pm talk", {"to": "alice"})
            await a.ok("chat", "lobby talk")
            await b.ok("leaveRoom", {"room": "Dev"})
            await seed.sio.emit("onlineUsers")
            await seed.wait(lambda: seed.of("onlineUsers"))
            await b.disconnect()
            last = await a.ok("chat", "last")
            await seed.wait(lambda: any(args[0]["message"] == "last" for args in seed.of("chat")))
            got = list(seed.got)  # before alice leaves too

        def of(event: str) -> list[tuple[Any, ...]]:
            return [args for e, args in got if e == event]

        # Seed events: lobby only, with the seed's shapes.
        names = {e for e, _ in got}
        assert names <= SEED_EVENTS | {"conversations", "roomCreated"}, names
        chats = of("chat")
        assert [args[0]["message"] for args in chats] == ["hello from the seed", "lobby talk", "last"]
        assert all(len(args) == 1 and set(args[0]) == {"sender", "message", "position", "time"} for args in chats)
        assert chats[-1][0]["position"] == last["position"]
        joined = of("userJoined")
        assert [args[0] for args in joined] == ["seedy", "alice", "bobby"]
        assert all(len(args) == 2 and set(args[1]) == {"position", "time"} for args in joined)
        assert [args[0] for args in of("userLeft")] == ["bobby"]
        assert of("onlineUsers") == [(["seedy", "alice", "bobby"],)]
    finally:
        await seed.sio.disconnect()


# --- limits -------------------------------------------------------------------


async def test_limits_from_the_environment(db_url: str) -> None:
    settings = room_settings(
        db_url, CHAT_ROOMS_PER_USER="2", CHAT_ROOM_MEMBERS_MAX="3", CHAT_ROOM_NAME_MAX="8", CHAT_ROOMS_MAX="4"
    )
    async with running_server(settings) as server, users(server.url, "alice", "bobby", "carol", "dave") as clients:
        a, b, c, d = clients
        assert (await a.ok("createRoom", {"room": "n" * 8}))["room"] == "n" * 8
        await a.refused("createRoom", {"room": "m" * 9}, code="room_name_bad")
        await a.ok("createRoom", {"room": "second"})
        # Rooms per user: creating and joining both count.
        await a.refused("createRoom", {"room": "third"}, code="too_many_rooms")
        await b.ok("createRoom", {"room": "bobs"})
        await a.refused("joinRoom", {"room": "bobs"}, code="too_many_rooms")
        await a.ok("leaveRoom", {"room": "second"})
        await a.ok("joinRoom", {"room": "bobs"})
        # Members per room: the creator and two more.
        await c.ok("joinRoom", {"room": "bobs"})
        await d.refused("joinRoom", {"room": "BOBS"}, code="room_full")
        assert (await c.ok("joinRoom", {"room": "bobs"}))["position"] is None  # already in: not refused
        await c.ok("leaveRoom", {"room": "bobs"})
        await d.ok("joinRoom", {"room": "bobs"})
        members = await d.ok("roomMembers", {"room": "bobs"})
        assert sorted(m["name"] for m in members["members"]) == ["alice", "bobby", "dave"]
        # Rooms in all (CHAT_ROOMS_MAX): leaving does not free a room.
        await c.ok("createRoom", {"room": "fourth"})
        await c.refused("createRoom", {"room": "fifth"}, code="too_many_rooms")
    log = await raw_log(db_url)
    assert [e["payload"]["room"] for e in log if e["type"] == "RoomCreated"] == ["n" * 8, "second", "bobs", "fourth"]


async def test_concurrent_requests_respect_names_and_limits(db_url: str) -> None:
    settings = room_settings(db_url, CHAT_ROOMS_PER_USER="2", CHAT_ROOM_MEMBERS_MAX="3")
    names = [f"racer{i}" for i in range(6)]
    async with running_server(settings) as server, users(server.url, *names) as clients:
        # One name, many cases, at the same moment: exactly one room.
        variants = ["Race", "race", "RACE", "rAce", "raCe", "racE"]
        acks = await asyncio.gather(
            *(c.call("createRoom", {"room": v}) for c, v in zip(clients, variants, strict=True))
        )
        winners = [a for a in acks if a["ok"]]
        assert len(winners) == 1 and sorted(a.get("error") for a in acks if not a["ok"]) == ["room_exists"] * 5
        # Two places left in a room of three: two of five joins get in.
        creator = clients[variants.index(winners[0]["room"])]
        others = [c for c in clients if c is not creator]
        acks = await asyncio.gather(*(c.call("joinRoom", {"room": "race"}) for c in others))
        assert sorted(a.get("error", "ok") for a in acks) == ["ok", "ok", "room_full", "room_full", "room_full"]
        members = await creator.ok("roomMembers", {"room": "race"})
        assert len(members["members"]) == 3
        # Two rooms a user: of three joins at once, two succeed.
        free = [c for c, a in zip(others, acks, strict=True) if not a["ok"]]
        for k, c in enumerate(free):
            await c.ok("createRoom", {"room": f"spare{k}"})
        joiner = creator  # a member of one room: one more place
        acks = await asyncio.gather(*(joiner.call("joinRoom", {"room": f"spare{k}"}) for k in range(3)))
        assert sorted(a.get("error", "ok") for a in acks) == ["ok", "too_many_rooms", "too_many_rooms"]
    log = await raw_log(db_url)
    assert [e["payload"]["room"] for e in log if e["type"] == "RoomCreated"][0] == winners[0]["room"]
    room = winners[0]["room"]
    joined = {e["payload"]["name"] for e in log if e["type"] == "RoomJoined" and e["payload"]["room"] == room}
    assert len(joined - {names[clients.index(creator)]}) == 2  # never a third joiner


# --- hostile inputs -----------------------------------------------------------

BAD_VALUES: list[Any] = [None, 5, 1.5, True, "text", [], ["a"], {"nested": {"x": 1}}]


async def test_wrong_types_for_every_new_request_are_refused(srv: InProcessServer, db_url: str) -> None:
    fresh = await RoomClient(srv.url).connect()
    try:
        for event, args in [
            ("createRoom", ({"room": "Dev"},)),
            ("joinRoom", ({"room": "Dev"},)),
            ("leaveRoom", ({"room": "Dev"},)),
            ("listRooms", ({},)),
            ("roomMembers", ({"room": "Dev"},)),
            ("conversations", ()),
            ("markRead", ({"room": "Dev", "position": 1},)),
        ]:
            await fresh.refused(event, *args, code="not_logged_in")
    finally:
        await fresh.disconnect()
    async with users(srv.url, "alice", "bobby") as (a, b):
        await a.ok("createRoom", {"room": "Dev"})
        await b.ok("chat", "a pm", {"to": "alice"})
        upto = await barrier(a, [a, b])
        before = await raw_log(db_url)
        for event in ("createRoom", "joinRoom", "leaveRoom", "roomMembers"):
            for value in BAD_VALUES[:-1]:
                await a.refused(event, value, code="bad_payload")
            # A missing or non-string name: refused as a bad name, the way
            # the seed refuses a non-string login name (name_bad).
            for value in (None, 5, 1.5, True, [], {"x": 1}):
                await a.refused(event, {"room": value}, code={"bad_payload", "room_name_bad"})
            await a.refused(event, {}, code={"bad_payload", "room_name_bad"})
            await a.refused(event, BAD_VALUES[-1], code={"bad_payload", "room_name_bad"})
        for value in (5, True, [], {"a": 1}):
            await a.refused("createRoom", {"room": "Fine", "topic": value}, code="bad_payload")
        await a.refused("createRoom", {"room": "Fine", "topic": "bell\x07"}, code="bad_payload")
        for value in BAD_VALUES:
            if not isinstance(value, dict) and value is not None:
                await a.refused("listRooms", value, code="bad_payload")
        for request in (
            {"limit": 0},
            {"limit": -1},
            {"limit": "5"},
            {"limit": True},
            {"limit": 1.5},
            {"after": 5},
            {"after": []},
        ):
            await a.refused("listRooms", request, code="bad_payload")
        for request in (
            {"room": "Dev", "with": "bobby", "position": 1},
            {"room": "Dev"},
            {"room": "Dev", "position": "1"},
            {"room": "Dev", "position": True},
            {"room": "Dev", "position": 1.5},
            {"room": "Dev", "position": -1},
            {"room": "Dev", "position": 2**63},
        ):
            await a.refused("markRead", request, code="bad_payload")
        await a.refused("history", {"room": "Dev", "with": "bobby"}, code="bad_payload")
        for options in ({"to": 5}, {"room": "Dev", "to": "bobby"}, {"to": []}):
            await a.refused("chat", "typed wrong", options, code="bad_payload")
        # A non-string room is a bad room name, as for createRoom (a
        # non-string `with` is test_a_non_string_peer_is_a_bad_payload's).
        for value in (5, [], True):
            await a.refused("markRead", {"room": value, "position": 1}, code={"bad_payload", "room_name_bad"})
            await a.refused("history", {"room": value}, code={"bad_payload", "room_name_bad"})
            await a.refused("chat", "typed wrong", {"room": value}, code={"bad_payload", "room_name_bad"})
        # Huge names: under the packet limit, so refused as names, not dropped.
        huge = "x" * 50_000
        await a.refused("createRoom", {"room": huge}, code="room_name_bad")
        for event in ("joinRoom", "leaveRoom", "roomMembers", "history"):
            await a.refused(event, {"room": huge}, code={"room_name_bad", "no_such_room", "bad_payload"})
        await a.refused("chat", "to a huge name", {"to": huge}, code={"no_such_user", "bad_payload"})
        await a.refused("chat", "to a huge room", {"room": huge}, code={"room_name_bad", "no_such_room", "bad_payload"})
        # Still connected and working; nothing refused was stored or sent.
        assert a.sio.connected and (await a.ok("joinRoom", {"room": "dev"}))["position"] is None
        assert len(await raw_log(db_url)) == len(before)
        last = await barrier(b, [a, b])
        assert [p for p in seen_positions(b) if p > upto] == [last]


async def test_a_non_string_peer_is_a_bad_payload(srv: InProcessServer) -> None:
    async with users(srv.url, "alice", "bobby") as (a, _b):
        for value in (5, []):
            await a.refused("chat", "typed wrong", {"to": value}, code="bad_payload")
            await a.refused("history", {"with": value}, code="bad_payload")
            await a.refused("markRead", {"with": value, "position": 1}, code="bad_payload")


async def test_html_in_names_topics_and_messages_is_kept_as_text(srv: InProcessServer, db_url: str) -> None:
    room, topic = "<b>x</b>", "<script>alert('t')</script> & \"q\""
    async with users(srv.url, "alice", "bobby") as (a, b):
        ack = await a.ok("createRoom", {"room": room, "topic": topic})
        assert (ack["room"], ack["topic"]) == (room, topic)
        await b.wait_event("roomCreated")
        assert (b.last("roomCreated")["room"], b.last("roomCreated")["topic"]) == (room, topic)
        assert room_of((await b.ok("listRooms", {}))["rooms"], room)["topic"] == topic
        await b.ok("joinRoom", {"room": "<B>X</B>"})
        sent = await a.ok("chat", "<img src=x onerror=alert(1)>", {"room": room})
        await b.wait_for(lambda: [m["position"] for m in b.events("roomChat")] == [sent["position"]])
        assert b.last("roomChat")["message"] == "<img src=x onerror=alert(1)>"
        assert b.last("roomChat")["room"] == room
        await b.wait_event("conversations")
        summary = await b.ok("conversations")
        assert room_of(summary["rooms"], room)["topic"] == topic
    log = await raw_log(db_url)
    [created] = [e["payload"] for e in log if e["type"] == "RoomCreated"]
    assert created == {"room": room, "creator": "alice", "topic": topic}


# --- several processes on PostgreSQL ------------------------------------------


@pytest.mark.postgres
async def test_room_chat_crosses_processes_in_order(postgres: Postgres) -> None:
    from tests.test_multiprocess import cluster

    async with cluster(postgres, n=2) as (url, (one, two)):
        await room_chat_across(url, one, two)


async def room_chat_across(url: str, one: ServerProcess, two: ServerProcess) -> None:
    a = await login(one.url, "alice")
    b, c, d = [await login(two.url, name) for name in ("bobby", "carol", "dave")]
    clients = [a, b, c, d]
    try:
        # Joined on process two the moment process one acknowledged it,
        # before process two has necessarily followed the log that far.
        await a.ok("createRoom", {"room": "Dev"})
        await b.ok("joinRoom", {"room": "dev"})
        await c.ok("joinRoom", {"room": "DEV"})
        for k in range(20):
            await a.ok("createRoom", {"room": f"room{k}"})
            await d.ok("joinRoom", {"room": f"room{k}"})

        async def talk(cl: RoomClient, tag: str) -> None:
            acks = await asyncio.gather(*(cl.call("chat", f"{tag} {k}", {"room": "Dev"}) for k in range(20)))
            assert all(x["ok"] for x in acks), acks

        await asyncio.gather(talk(a, "a"), talk(b, "b"))
        await a.ok("chat", "across", {"to": "carol"})
        # One name created on both processes at once: one room.
        acks = await asyncio.gather(a.call("createRoom", {"room": "Race"}), d.call("createRoom", {"room": "rACE"}))
        assert sorted(x.get("error", "ok") for x in acks) == ["ok", "room_exists"], acks
        upto = await barrier(d, clients)
        log = await raw_log(url)
        room_chats = [e["position"] for e in log if e["type"] == "MessagePosted" and e["payload"]["room"] == "Dev"]
        assert len(room_chats) == 40
        for cl, name in zip(clients, ("alice", "bobby", "carol", "dave"), strict=True):
            assert_saw_its_view(cl, name, log, cl.events("welcome")[0]["position"], upto)
            got = [m["position"] for m in cl.events("roomChat")]
            assert got == ([] if name == "dave" else room_chats)
        assert [m["message"] for m in c.events("privateMessage")] == ["across"]
        check_scopes_and_streams(log)
    finally:
        for cl in clients:
            await cl.disconnect()
