"""The dispatcher on its own: committed events in, publishes out, in order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from chatserver.config import Settings
from chatserver.database import create_engine
from chatserver.delivery import Delivery
from chatserver.events import MessagePosted, StoredEvent, UserJoined
from chatserver.lifecycle import Sessions
from chatserver.rooms import RoomsView
from chatserver.projections import OnlineUsers
from chatserver.store import EventStore


class RecordingPublisher:
    """The socket layer's side of delivery, recording what it is asked to
    emit; it fails on the messages it is told to."""

    def __init__(self, fail_on: set[str]) -> None:
        self.fail_on = fail_on
        self.broadcasts: list[Any] = []
        self.flushes = 0

    async def send(self, sid: str, event: str, data: Any = None) -> None:
        pass

    async def broadcast(self, event: str, data: Any = None, *, to: list[str] | None = None, last: bool = False) -> None:
        if isinstance(data, dict) and data.get("message") in self.fail_on:
            raise RuntimeError("the transport broke")
        self.broadcasts.append((event, data))

    def enter(self, sid: str, rooms: list[str]) -> None:
        pass

    def leave(self, sid: str, room: str) -> None:
        pass

    def sids_in(self, room: str) -> list[str]:
        return []

    async def disconnect(self, sid: str) -> None:
        pass

    async def drained(self, sid: str) -> bool:
        return True

    def flush(self) -> None:
        self.flushes += 1


def chat(position: int, message: str) -> StoredEvent:
    return StoredEvent(position, "user-bob", position, MessagePosted(sender="bob", message=message), datetime.now(UTC))


@pytest.fixture
async def store() -> Any:
    engine = create_engine("sqlite+aiosqlite:///:memory:")
    yield EventStore(engine)
    await engine.dispose()


async def test_one_failing_publish_does_not_drop_the_rest_of_the_batch(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = RecordingPublisher(fail_on={"two"})
    delivery = Delivery(Settings(), store, publisher, Sessions())
    delivery.start(OnlineUsers(), RoomsView(), [], None)
    delivery.committed([chat(1, "one"), chat(2, "two"), chat(3, "three")])
    delivery.committed([chat(4, "four")])
    await asyncio.sleep(0.05)
    await delivery.stop()
    assert [d["message"] for _e, d in publisher.broadcasts] == ["one", "three", "four"]
    # Applied all the same: history and positions include the failed one.
    assert delivery.applied == 4
    assert [e.position for e in delivery.recent.last(10)] == [1, 2, 3, 4]
    failures = [r for r in caplog.records if "could not publish event 2" in r.getMessage()]
    assert len(failures) == 1


async def test_a_batch_after_a_gap_waits_for_the_other_process_events(store: EventStore) -> None:
    publisher = RecordingPublisher(fail_on=set())
    delivery = Delivery(Settings(), store, publisher, Sessions())
    asked: list[int] = []
    delivery.want_follow = lambda: asked.append(delivery.applied)
    delivery.start(OnlineUsers(), RoomsView(), [], None)
    delivery.committed([chat(1, "one")])
    # Position 2 was appended by another process: ours at 3 waits for it.
    delivery.committed([chat(3, "three")])
    await asyncio.sleep(0.05)
    assert [d["message"] for _e, d in publisher.broadcasts] == ["one"] and asked == [1]
    joined = StoredEvent(2, "user-carl", 1, UserJoined(name="carl"), datetime.now(UTC))
    delivery.followed([joined])
    await asyncio.sleep(0.05)
    await delivery.stop()
    # The other process's event is delivered here too, in its place.
    assert [e for e, _d in publisher.broadcasts] == ["chat", "userJoined", "chat"]
    assert publisher.broadcasts[1][1][0] == "carl"
    assert delivery.online.names() == ["carl"] and delivery.applied == 3


async def test_events_read_from_the_log_are_delivered_once_whichever_way_they_come(store: EventStore) -> None:
    publisher = RecordingPublisher(fail_on=set())
    delivery = Delivery(Settings(), store, publisher, Sessions())
    delivery.start(OnlineUsers(), RoomsView(), [], None)
    # The follower read our own batch before the commit callback handed it over.
    delivery.followed([chat(1, "one"), chat(2, "two")])
    delivery.committed([chat(1, "one"), chat(2, "two")])
    delivery.committed([chat(3, "three")])
    delivery.followed([chat(2, "two"), chat(3, "three"), chat(4, "four")])
    await asyncio.sleep(0.05)
    await delivery.stop()
    assert [d["message"] for _e, d in publisher.broadcasts] == ["one", "two", "three", "four"]
