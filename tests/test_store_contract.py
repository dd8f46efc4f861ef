"""The event store's contract, run against every backend: SQLite and a real
PostgreSQL 15."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from chatserver.database import create_engine
from chatserver.events import (
    ConversationRead,
    MessagePosted,
    NewEvent,
    PrivateMessageSent,
    RoomCreated,
    RoomJoined,
    RoomLeft,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    private_scope,
    room_stream,
    user_stream,
)
from chatserver.events import to_payload
from chatserver.store import ConcurrencyError, EventStore, UnencodableEvent, encode, events_table
from chatserver.writer import EventWriter
from tests.support import Backend


def chat(name: str, version: int, text: str) -> NewEvent:
    return NewEvent(user_stream(name), version, MessagePosted(sender=name, message=text))


async def append(b: Backend, events: list[NewEvent]) -> list:
    async with b.writer_engine.begin() as conn:
        return await b.store.append(conn, events)


async def test_append_assigns_gap_free_positions_and_reads_back(backend: Backend) -> None:
    stored = await append(
        backend,
        [
            NewEvent("user-ann", 1, UserLoggedIn(name="ann", session="s1", node="n")),
            NewEvent("user-ann", 2, UserJoined(name="ann")),
        ],
    )
    assert [s.position for s in stored] == [1, 2]
    more = await append(backend, [chat("ann", 3, "hi"), chat("ann", 4, "there")])
    assert [s.position for s in more] == [3, 4]
    read = await backend.store.read_all()
    assert [(e.position, e.stream, e.version, e.type) for e in read] == [
        (1, "user-ann", 1, "UserLoggedIn"),
        (2, "user-ann", 2, "UserJoined"),
        (3, "user-ann", 3, "MessagePosted"),
        (4, "user-ann", 4, "MessagePosted"),
    ]
    assert read[2].event == MessagePosted(sender="ann", message="hi")
    assert read[0].recorded_at.tzinfo is not None
    assert await backend.store.head() == 4
    assert [e.position for e in await backend.store.read_all(after=2)] == [3, 4]
    assert [e.position for e in await backend.store.read_all(types=["UserJoined"])] == [2]
    assert [e.position for e in await backend.store.latest(limit=2)] == [3, 4]
    assert [e.position for e in await backend.store.latest(limit=5, before=3)] == [1, 2]


async def test_stream_head_tells_online(backend: Backend) -> None:
    head = await backend.store.stream_head("user-bob")
    assert (head.version, head.online) == (0, False)
    await append(backend, [NewEvent("user-bob", 1, UserLoggedIn(name="bob", session="s", node="n")), NewEvent("user-bob", 2, UserJoined(name="bob"))])
    head = await backend.store.stream_head("user-bob")
    assert (head.version, head.online) == (2, True)
    await append(backend, [NewEvent("user-bob", 3, UserLeft(name="bob", reason="disconnected"))])
    head = await backend.store.stream_head("user-bob")
    assert (head.version, head.online) == (3, False)


async def test_version_conflict_raises_and_stores_nothing(backend: Backend) -> None:
    await append(backend, [chat("cat", 1, "one")])
    with pytest.raises(ConcurrencyError):
        await append(backend, [chat("dan", 1, "fine"), chat("cat", 1, "dup")])
    assert [e.event.message for e in await backend.store.read_all()] == ["one"]  # type: ignore[union-attr]
    # The positions the failed transaction would have used are not lost.
    assert [s.position for s in await append(backend, [chat("dan", 1, "ok")])] == [2]


async def test_group_commit_fails_only_the_loser(backend: Backend) -> None:
    commits: list[list[int]] = []
    writer = EventWriter(backend.store, backend.writer_engine, on_commit=lambda s: commits.append([e.position for e in s]))
    writer.start()
    try:
        futures = [
            writer.submit([chat("eve", 1, "a")]),
            writer.submit([chat("eve", 1, "conflict")]),
            writer.submit([chat("fay", 1, "b")]),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await writer.close()
    assert isinstance(results[1], ConcurrencyError)
    assert [s.position for s in results[0]] == [1]
    assert [s.position for s in results[2]] == [2]
    assert [e.event.message for e in await backend.store.read_all()] == ["a", "b"]  # type: ignore[union-attr]


async def test_writer_stores_what_a_plain_append_stores(backend: Backend) -> None:
    # On a SQLite file the writer runs its transaction on the driver's
    # connection, not through SQLAlchemy: it must store the same columns.
    events = [
        NewEvent("user-gus", 1, UserLoggedIn(name="gus", session="s1", node="n", resume_hash="ab" * 32)),
        NewEvent("user-gus", 2, UserJoined(name="gus")),
        chat("gus", 3, 'quote " backslash \\ <b>é</b> \u2603'),
        NewEvent("user-gus", 4, UserLeft(name="gus", reason="quit")),
    ]
    writer = EventWriter(backend.store, backend.writer_engine)
    writer.start()
    try:
        by_writer = await writer.append(events[:2])
        by_writer += await writer.append(events[2:])
    finally:
        await writer.close()
    plain = [NewEvent("user-hal", e.version, e.event) for e in events]
    by_store = await append(backend, plain)
    read = await backend.store.read_all()
    assert [e.event for e in read] == [e.event for e in events + plain]
    assert [e.position for e in read] == [s.position for s in by_writer + by_store] == list(range(1, 9))
    for stored, back in zip(by_writer + by_store, read, strict=True):
        assert back.recorded_at == stored.recorded_at
        assert back.recorded_at.tzinfo is not None
    async with backend.store.engine.connect() as conn:
        raw = (await conn.execute(sa.text("select stream, payload, recorded_at from events order by position"))).all()
    # Same column encodings, whoever wrote the row.
    assert [type(r.payload) for r in raw[:4]] == [type(r.payload) for r in raw[4:]]
    assert [r.payload for r in raw[:4]] == [r.payload for r in raw[4:]]
    assert [type(r.recorded_at) for r in raw[:4]] == [type(r.recorded_at) for r in raw[4:]]


async def test_pre_encoded_payloads_are_the_bytes_the_json_column_writes(backend: Backend) -> None:
    # The store inserts the JSON text ``encode`` made at submit time: the row
    # must hold what the column's own JSON type wrote before that change.
    events = [
        NewEvent("user-ivy", 1, UserLoggedIn(name="ivy", session="s", node="n", resume_hash="cd" * 32), "c1"),
        NewEvent("user-ivy", 2, UserJoined(name="ivy"), "c1"),
        NewEvent("user-ivy", 3, MessagePosted(sender="ivy", message='q " \\ <i>\u00e9</i> \u2603 \U0001f600 \t\n'), "ivy/7"),
        NewEvent("user-ivy", 4, UserLeft(name="ivy", reason="disconnected")),
    ]
    stored = await append(backend, events)
    async with backend.writer_engine.begin() as conn:
        await conn.execute(
            events_table.insert(),
            [
                {"position": 100 + s.position, "stream": "user-old", "version": s.version, "type": s.type,
                 "payload": to_payload(s.event), "recorded_at": s.recorded_at}
                for s in stored
            ],
        )
    async with backend.store.engine.connect() as conn:
        text = (await conn.execute(sa.text("select position, CAST(payload AS TEXT) from events order by position"))).all()
    assert [t for _, t in text[:4]] == [t for _, t in text[4:]]
    assert [s.command_id for s in stored] == ["c1", "c1", "ivy/7", None]
    assert [e.command_id for e in await backend.store.read_all()] == ["c1", "c1", "ivy/7", None, None, None, None, None]
    async with backend.writer_engine.begin() as conn:
        found = await backend.store.commands(conn, ["ivy/7", "c1", "absent"])
    assert {k: [(e.position, e.event) for e in v] for k, v in found.items()} == {
        "c1": [(1, events[0].event), (2, events[1].event)],
        "ivy/7": [(3, events[2].event)],
    }


@pytest.mark.parametrize(
    "new",
    [
        chat("eve", 1, "ab\ud800"),
        NewEvent("user-ab\udfff", 1, UserJoined(name="x")),
        chat("eve", 1, "nul \x00 inside"),
        NewEvent("u" * 201, 1, UserJoined(name="x")),
        chat("eve", 2**31, "version too large"),
        chat("eve", 0, "version too small"),
        NewEvent("user-eve", 1, UserJoined(name="eve"), "x" * 201),
        NewEvent("user-eve", 1, UserJoined(name="eve"), "eve/\ud800"),
    ],
)
def test_encode_refuses_what_a_database_would(new: NewEvent) -> None:
    with pytest.raises(UnencodableEvent):
        encode(new)


async def test_group_commit_batches_one_turn_into_one_transaction(backend: Backend) -> None:
    writer = EventWriter(backend.store, backend.writer_engine)
    writer.start()
    try:
        futures = [writer.submit([chat(f"u{i}", 1, "x")]) for i in range(50)]
        await asyncio.gather(*futures)
    finally:
        await writer.close()
    assert writer.batches == 1
    assert [e.position for e in await backend.store.read_all()] == list(range(1, 51))


async def test_concurrent_writers_keep_positions_gap_free_and_ordered(backend: Backend) -> None:
    # Two independent writers (as two server processes would have) append at
    # once while a reader tails by position: the reader sees every position,
    # in order, exactly once.
    engines = [create_engine(backend.url, writer=True) for _ in range(2)]
    writers = [EventWriter(backend.store, e) for e in engines]
    for w in writers:
        w.start()
    seen: list[int] = []
    done = asyncio.Event()

    async def tail() -> None:
        after = 0
        while True:
            batch = await backend.store.read_all(after=after)
            for e in batch:
                seen.append(e.position)
                after = e.position
            if done.is_set() and not batch:
                return
            await asyncio.sleep(0.001)

    tailer = asyncio.create_task(tail())

    async def produce(w: EventWriter, who: str) -> None:
        for i in range(1, 41):
            await w.append([chat(who, i, str(i))])

    try:
        await asyncio.gather(produce(writers[0], "p1"), produce(writers[1], "p2"))
    finally:
        for w in writers:
            await w.close()
        for e in engines:
            await e.dispose()
    done.set()
    await asyncio.wait_for(tailer, 30)
    assert seen == list(range(1, 81))
    async with backend.store.engine.connect() as conn:
        dupes = (
            await conn.execute(sa.text("select stream, version, count(*) from events group by stream, version having count(*) > 1"))
        ).all()
    assert dupes == []


@pytest.mark.postgres
async def test_postgres_late_commit_is_not_skipped_by_a_tail(pg_url: str) -> None:
    # A transaction that takes its position first and commits late must not
    # let a later position become visible before it.
    engine = create_engine(pg_url)
    writer_a = create_engine(pg_url, writer=True)
    writer_b = create_engine(pg_url, writer=True)
    store = EventStore(engine)
    try:
        async with writer_a.begin() as slow:
            await store.append(slow, [chat("slow", 1, "first")])
            fast = asyncio.create_task(append(Backend(pg_url, store, writer_b), [chat("fast", 1, "second")]))
            await asyncio.sleep(0.3)
            # The second append waits on the lock; nothing is visible yet.
            assert not fast.done()
            assert await store.read_all() == []
        await asyncio.wait_for(fast, 10)
        assert [(e.position, e.stream) for e in await store.read_all()] == [(1, "user-slow"), (2, "user-fast")]
    finally:
        for e in (engine, writer_a, writer_b):
            await e.dispose()


def test_encode_keeps_text_that_only_looks_like_a_nul() -> None:
    text = r"the escape \u0000 written out, tab	and newline" + "\n"
    assert '"the escape \\\\u0000 written out' in encode(chat("eve", 1, text)).payload


async def test_stream_versions_skip_through_the_streams(backend: Backend) -> None:
    assert await backend.store.stream_versions("user-") == {}
    await append(backend, [chat("ann", 1, "a"), chat("ann", 2, "b"), chat("bob", 1, "c")])
    await append(backend, [NewEvent("room-x", 1, MessagePosted(sender="ann", message="elsewhere"))])
    await append(backend, [chat("ann", 3, "d"), chat("user_", 1, "e")])
    assert await backend.store.stream_versions("user-") == {"user-ann": 3, "user-bob": 1, "user-user_": 1}
    assert await backend.store.stream_versions("room-") == {"room-x": 1}


@pytest.mark.postgres
async def test_the_followers_raw_read_matches_the_store(pg_url: str) -> None:
    import asyncpg

    from chatserver.logsignal import asyncpg_dsn
    from chatserver.store import pg_read_after

    engine = create_engine(pg_url, writer=True)
    store = EventStore(engine)
    try:
        async with engine.begin() as conn:
            await store.append(
                conn,
                [
                    NewEvent("user-ann", 1, UserLoggedIn(name="ann", session="s1", node="n"), "c1"),
                    NewEvent("user-ann", 2, UserJoined(name="ann"), "c1"),
                    NewEvent("user-ann", 3, MessagePosted(sender="ann", message='hé "x" \\n'), "ann/x"),
                ],
            )
        raw = await asyncpg.connect(asyncpg_dsn(engine.url))
        try:
            assert await pg_read_after(raw, 0, 10) == await store.read_all()
            assert [e.position for e in await pg_read_after(raw, 1, 1)] == [2]
        finally:
            await raw.close()
    finally:
        await engine.dispose()


async def test_room_and_private_events_read_back_with_their_scope(backend: Backend) -> None:
    """Every event type round-trips, and the scope column is what
    ``scope_of`` derives: rooms by casefolded name, one conversation per pair
    whoever writes, nothing for what no client is shown."""
    events = [
        NewEvent(room_stream("Dev"), 1, RoomCreated(room="Dev", creator="ann", topic="<b>x</b>")),
        NewEvent("user-ann", 1, RoomJoined(name="ann", room="Dev")),
        NewEvent("user-ann", 2, MessagePosted(sender="ann", message="hi", room="Dev")),
        NewEvent("user-ann", 3, PrivateMessageSent(sender="ann", recipient="Bob", message="psst")),
        NewEvent("user-Bob", 1, PrivateMessageSent(sender="Bob", recipient="ann", message="yes")),
        NewEvent("user-ann", 4, ConversationRead(name="ann", position=5, peer="Bob")),
        NewEvent("user-ann", 5, RoomLeft(name="ann", room="Dev")),
        NewEvent("user-ann", 6, MessagePosted(sender="ann", message="lobby")),
    ]
    stored = await append(backend, events)
    assert [s.event for s in await backend.store.read_all()] == [e.event for e in events]
    async with backend.store.engine.connect() as conn:
        scopes = [
            row.scope for row in await conn.execute(sa.select(events_table.c.scope).order_by(events_table.c.position))
        ]
    assert scopes == ["room:dev", "room:dev", "room:dev", "dm:Bob\tann", "dm:Bob\tann", None, "room:dev", "room:lobby"]
    assert [s.position for s in await backend.store.latest(limit=10, scope="room:dev")] == [1, 2, 3, 7]
    assert [s.position for s in await backend.store.latest(limit=10, scope=private_scope("ann", "Bob"))] == [4, 5]
    state = await backend.store.conversation_state(
        {"room:dev": 1, "dm:Bob\tann": 0},
        through=stored[-1].position,
        types=["MessagePosted", "PrivateMessageSent"],
        not_stream="user-Bob",
        cap=100,
    )
    # Bob's own message is not unread for Bob; ann's are.
    last = {scope: (count, event.position if event else 0) for scope, (count, event) in state.items()}
    assert last == {"room:dev": (1, 7), "dm:Bob\tann": (1, 5)}
