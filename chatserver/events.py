"""Domain events: immutable facts, named in the past tense.

Every event belongs to the stream of the user it is about (``user-<name>``),
so a user's login, join, chats and leave are versioned together and the
``(stream, version)`` uniqueness constraint is the concurrency control: a
second process or socket cannot claim a name that changed under it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

LOBBY = "lobby"


@dataclass(frozen=True, slots=True)
class UserLoggedIn:
    type: ClassVar[str] = "UserLoggedIn"
    name: str
    session: str
    node: str
    # SHA-256 of the resume token issued with this login (never the token).
    resume_hash: str = ""
    # True when a client came back with its resume token instead of a login.
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class UserJoined:
    type: ClassVar[str] = "UserJoined"
    name: str
    room: str = LOBBY


@dataclass(frozen=True, slots=True)
class MessagePosted:
    type: ClassVar[str] = "MessagePosted"
    sender: str
    message: str
    room: str = LOBBY


@dataclass(frozen=True, slots=True)
class UserLeft:
    type: ClassVar[str] = "UserLeft"
    name: str
    reason: str
    room: str = LOBBY


DomainEvent = UserLoggedIn | UserJoined | MessagePosted | UserLeft

EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.type: cls for cls in (UserLoggedIn, UserJoined, MessagePosted, UserLeft)
}

# Short names the CLI and documentation use for the event types.
TYPE_ALIASES: dict[str, str] = {
    "login": UserLoggedIn.type,
    "join": UserJoined.type,
    "chat": MessagePosted.type,
    "leave": UserLeft.type,
}

# Reasons recorded on UserLeft.
LEFT_DISCONNECTED = "disconnected"
LEFT_SERVER_RESTART = "server restart"
LEFT_SERVER_SHUTDOWN = "server shutdown"
LEFT_TAKEN_OVER = "taken over"  # the same user resumed on another socket
# The log showed the user online for this process, but no socket held it.
LEFT_SESSION_LOST = "session lost"
# The process holding the session stopped renewing its lease (it died).
LEFT_NODE_LOST = "node lost"


# What a client in the lobby is entitled to see: history and replays carry these.
VISIBLE_TYPES: tuple[str, ...] = (UserJoined.type, MessagePosted.type, UserLeft.type)


def user_stream(name: str) -> str:
    return f"user-{name}"


# Field names per type, looked up once: dataclasses.asdict deep-copies and
# showed up in the writer's profile.
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in EVENT_TYPES.values()
}


def to_payload(event: DomainEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in _FIELDS[type(event)]}


def from_payload(type_: str, payload: dict[str, Any]) -> DomainEvent:
    return EVENT_TYPES[type_](**payload)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended at an expected stream version."""

    stream: str
    version: int
    event: DomainEvent
    # The command that produced it: every event of one command carries the
    # same id, so a commit whose outcome is unknown can be looked up, and a
    # client's retry of a stored chat is answered with the original.
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the log holds it: what every emit is built from."""

    position: int
    stream: str
    version: int
    event: DomainEvent
    recorded_at: datetime
    # The id of the command that appended it (None for events older than
    # migration 0003).
    command_id: str | None = None

    @property
    def type(self) -> str:
        return self.event.type
