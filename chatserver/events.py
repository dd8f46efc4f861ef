"""Domain events: immutable facts, named in the past tense.

Every event belongs to the stream of the user it is about (``user-<name>``),
so a user's login, join, chats and leave are versioned together and the
``(stream, version)`` uniqueness constraint is the concurrency control: a
second process or socket cannot claim a name that changed under it.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
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
    # Files shared with the message: ``{id, name, size, type, sha256, width?,
    # height?, thumb}`` each (see uploads.py). Left out of the payload when
    # empty, so a text chat is stored exactly as before files existed.
    attachments: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class UserLeft:
    type: ClassVar[str] = "UserLeft"
    name: str
    reason: str
    room: str = LOBBY


@dataclass(frozen=True, slots=True)
class RoomCreated:
    """A room came to be; its stream is ``room-<key>`` and this is its
    version 1, so the log's uniqueness constraint makes the name taken once."""

    type: ClassVar[str] = "RoomCreated"
    room: str
    creator: str
    topic: str = ""


@dataclass(frozen=True, slots=True)
class RoomJoined:
    """A user became a member of a room (not the lobby: every login is)."""

    type: ClassVar[str] = "RoomJoined"
    name: str
    room: str


@dataclass(frozen=True, slots=True)
class RoomLeft:
    type: ClassVar[str] = "RoomLeft"
    name: str
    room: str


@dataclass(frozen=True, slots=True)
class PrivateMessageSent:
    type: ClassVar[str] = "PrivateMessageSent"
    sender: str
    recipient: str
    message: str
    attachments: tuple[dict[str, Any], ...] = ()  # as MessagePosted's


@dataclass(frozen=True, slots=True)
class ConversationRead:
    """``name`` has read a room (``room``) or a private conversation with
    ``peer`` up to ``position``."""

    type: ClassVar[str] = "ConversationRead"
    name: str
    position: int
    room: str = ""
    peer: str = ""


@dataclass(frozen=True, slots=True)
class AccountCreated:
    """An account was registered (accounts mode): the name belongs to
    someone. Its stream is ``account-<name>`` and this is its version 1, so
    the log's uniqueness constraint registers a name once. The password hash
    lives in the accounts table, never here."""

    type: ClassVar[str] = "AccountCreated"
    name: str


@dataclass(frozen=True, slots=True)
class UserKicked:
    """An admin (``by``) ended ``name``'s session."""

    type: ClassVar[str] = "UserKicked"
    name: str
    by: str


@dataclass(frozen=True, slots=True)
class UserBanned:
    """An admin (``by``) banned ``name`` for ``seconds``, until ``until``
    (ISO 8601, UTC); a ban also ends the user's session."""

    type: ClassVar[str] = "UserBanned"
    name: str
    by: str
    seconds: int
    until: str


DomainEvent = (
    UserLoggedIn
    | UserJoined
    | MessagePosted
    | UserLeft
    | RoomCreated
    | RoomJoined
    | RoomLeft
    | PrivateMessageSent
    | ConversationRead
    | AccountCreated
    | UserKicked
    | UserBanned
)

EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.type: cls
    for cls in (
        UserLoggedIn,
        UserJoined,
        MessagePosted,
        UserLeft,
        RoomCreated,
        RoomJoined,
        RoomLeft,
        PrivateMessageSent,
        ConversationRead,
        AccountCreated,
        UserKicked,
        UserBanned,
    )
}

# Short names the CLI and documentation use for the event types.
TYPE_ALIASES: dict[str, str] = {
    "login": UserLoggedIn.type,
    "join": UserJoined.type,
    "chat": MessagePosted.type,
    "leave": UserLeft.type,
    "room-created": RoomCreated.type,
    "room-join": RoomJoined.type,
    "room-leave": RoomLeft.type,
    "private": PrivateMessageSent.type,
    "read": ConversationRead.type,
    "account": AccountCreated.type,
    "kick": UserKicked.type,
    "ban": UserBanned.type,
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
# Everything some client may be shown (who may see which one is the scope's
# business: see ``scope_of``).
SHOWN_TYPES: tuple[str, ...] = (
    *VISIBLE_TYPES,
    RoomCreated.type,
    RoomJoined.type,
    RoomLeft.type,
    PrivateMessageSent.type,
)


def user_stream(name: str) -> str:
    return f"user-{name}"


def account_stream(name: str) -> str:
    return f"account-{name}"


@functools.lru_cache(maxsize=4096)
def room_key(room: str) -> str:
    """Room names are one name whatever their case: the key is the casefolded
    name (casefolding can denormalize, so NFC again). Cached: every room
    event's routing asks it, of a few names."""
    return unicodedata.normalize("NFC", room.casefold())


def room_stream(room: str) -> str:
    return f"room-{room_key(room)}"


def room_scope(room: str) -> str:
    return f"room:{room_key(room)}"


LOBBY_SCOPE = room_scope(LOBBY)


def private_scope(a: str, b: str) -> str:
    """One conversation between two names, whoever wrote: names cannot hold
    a tab, so the pair is unambiguous."""
    first, second = sorted((a, b))
    return f"dm:{first}\t{second}"


def scope_of(event: DomainEvent) -> str | None:
    """The conversation an event belongs to: who may see it, and the indexed
    ``scope`` column that history, unread counts and chat-replay filter on.
    None: no client is shown it."""
    if isinstance(event, MessagePosted | RoomJoined | RoomLeft | RoomCreated):
        return room_scope(event.room)
    if isinstance(event, UserJoined | UserLeft):
        return room_scope(event.room)
    if isinstance(event, PrivateMessageSent):
        return private_scope(event.sender, event.recipient)
    return None


# Field names per type, looked up once: dataclasses.asdict deep-copies and
# showed up in the writer's profile.
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in EVENT_TYPES.values()
}


# Fields stored only when they hold something: events from before they
# existed, and events that do not use them, keep their old payloads.
_OMITTED_WHEN_EMPTY = frozenset({"attachments"})


_OMITTABLE: dict[type, tuple[str, ...]] = {
    cls: tuple(f for f in fields if f in _OMITTED_WHEN_EMPTY) for cls, fields in _FIELDS.items()
}


def to_payload(event: DomainEvent) -> dict[str, Any]:
    cls = type(event)
    payload = {name: getattr(event, name) for name in _FIELDS[cls]}
    for name in _OMITTABLE[cls]:
        if payload[name]:
            payload[name] = list(payload[name])
        else:
            del payload[name]
    return payload


def from_payload(type_: str, payload: dict[str, Any]) -> DomainEvent:
    if "attachments" in payload:
        payload = {**payload, "attachments": tuple(payload["attachments"])}
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
