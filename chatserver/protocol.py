"""The wire protocol: event names and the payloads built from stored events.

The seed's events keep their meaning; extensions only add fields to object
payloads and add new events (a seed client ignores what it does not know).
"""

from __future__ import annotations

from typing import Any

from .domain import DomainError
from .events import (
    LOBBY,
    MessagePosted,
    PrivateMessageSent,
    RoomCreated,
    RoomJoined,
    RoomLeft,
    StoredEvent,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    room_scope,
)
from .metrics import STATS

# client -> server
LOGIN = "login"
CHAT = "chat"
ONLINE_USERS = "onlineUsers"

# server -> client (seed)
WELCOME = "welcome"
LOGIN_NAME_BAD = "loginNameBad"
LOGIN_NAME_EXISTS = "loginNameExists"
USER_JOINED = "userJoined"
USER_LEFT = "userLeft"
# ONLINE_USERS and CHAT are also sent by the server.

# client -> server (extensions)
RESUME = "resume"
# HISTORY is also a client request (a page of older items, answered by ack).
CREATE_ROOM = "createRoom"
JOIN_ROOM = "joinRoom"
LEAVE_ROOM = "leaveRoom"
LIST_ROOMS = "listRooms"
ROOM_MEMBERS = "roomMembers"
MARK_READ = "markRead"
UPLOAD_TOKEN = "uploadToken"
# Moderation (accounts mode, admins only).
KICK = "kick"
BAN = "ban"
# Accounts mode: hand a live socket a newer token of the same account.
REAUTH = "reauth"
# CONVERSATIONS is also a client request (answered by ack).

# server -> client (extensions)
PROTOCOL_ERROR = "protocolError"
HISTORY = "history"
RESUME_FAILED = "resumeFailed"
CONVERSATIONS = "conversations"
ROOM_CREATED = "roomCreated"
ROOM_JOINED = "roomJoined"
ROOM_LEFT = "roomLeft"
ROOM_CHAT = "roomChat"
PRIVATE_MESSAGE = "privateMessage"

# Socket.IO rooms (this process's routing, not the chat's rooms): every
# logged-in socket is in the lobby's and its user's; a member's socket is in
# each of its chat rooms' (named by the room's scope).
LOBBY_ROOM = "lobby"


def user_room(name: str) -> str:
    return f"user:{name}"


def iso_time(stored: StoredEvent) -> str:
    return stored.recorded_at.isoformat().replace("+00:00", "Z")


# What a client is told of a file: the content hash stays in the log (the
# blob store's key), not on the wire.
_WIRE_ATTACHMENT = ("id", "name", "size", "type", "width", "height", "thumb")


def attachments_payload(attachments: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [{k: a[k] for k in _WIRE_ATTACHMENT if k in a} for a in attachments]


def _with_attachments(payload: dict[str, Any], event: MessagePosted | PrivateMessageSent) -> dict[str, Any]:
    # Only when there are some: a text chat's payload is the seed's.
    if event.attachments:
        payload["attachments"] = attachments_payload(event.attachments)
    return payload


def chat_payload(stored: StoredEvent) -> dict[str, Any]:
    event = stored.event
    assert isinstance(event, MessagePosted)
    return _with_attachments(
        {
            "sender": event.sender,
            "message": event.message,
            "position": stored.position,
            "time": iso_time(stored),
        },
        event,
    )


def welcome_payload(stored: StoredEvent, token: str | None = None) -> dict[str, Any]:
    event = stored.event
    assert isinstance(event, UserLoggedIn)
    payload: dict[str, Any] = {
        "name": event.name,
        "position": stored.position,
        "resumed": event.resumed,
    }
    if token is not None:
        payload["resumeToken"] = token
    return payload


def history_item(stored: StoredEvent) -> dict[str, Any]:
    event = stored.event
    item: dict[str, Any] = {"position": stored.position, "time": iso_time(stored)}
    if isinstance(event, MessagePosted):
        item.update(kind="chat", sender=event.sender, message=event.message)
        if event.room != LOBBY:
            item["room"] = event.room
        _with_attachments(item, event)
    elif isinstance(event, UserJoined):
        item.update(kind="join", name=event.name)
    elif isinstance(event, UserLeft):
        item.update(kind="leave", name=event.name, reason=event.reason)
    elif isinstance(event, RoomJoined):
        item.update(kind="join", name=event.name, room=event.room)
    elif isinstance(event, RoomLeft):
        item.update(kind="leave", name=event.name, room=event.room)
    elif isinstance(event, RoomCreated):
        item.update(kind="created", name=event.creator, room=event.room, topic=event.topic)
    elif isinstance(event, PrivateMessageSent):
        item.update(kind="private", sender=event.sender, recipient=event.recipient, message=event.message)
        _with_attachments(item, event)
    return item


def history_payload(items: list[StoredEvent], reached_start: bool) -> dict[str, Any]:
    return {"items": [history_item(e) for e in items], "reachedStart": reached_start}


class HistoryItems:
    """History items in wire form, each built once: every login is sent the
    last ``keep`` of them, and building those dicts (their timestamps above
    all) was most of a login's protocol work. Keyed by position, so one per
    log; the items are shared between payloads and must not be changed."""

    def __init__(self, keep: int) -> None:
        self._items: dict[int, dict[str, Any]] = {}
        self._keep = max(keep, 1)

    def payload(self, events: list[StoredEvent], reached_start: bool) -> dict[str, Any]:
        items = self._items
        out = []
        for stored in events:
            item = items.get(stored.position)
            if item is None:
                item = items[stored.position] = history_item(stored)
                if len(items) > 2 * self._keep:
                    # Built in log order, so the first ones are the oldest.
                    for position in list(items)[: self._keep]:
                        del items[position]
            out.append(item)
        return {"items": out, "reachedStart": reached_start}


def live_packet(stored: StoredEvent) -> tuple[str, Any] | None:
    """The event a socket entitled to see ``stored`` receives, if any: the
    seed's events for the lobby, the extensions' for rooms and private
    messages (``audience`` says who is entitled)."""
    event = stored.event
    if isinstance(event, MessagePosted):
        if event.room != LOBBY:
            return ROOM_CHAT, {"room": event.room, **chat_payload(stored)}
        return CHAT, chat_payload(stored)
    if isinstance(event, PrivateMessageSent):
        return PRIVATE_MESSAGE, _with_attachments(
            {
                "sender": event.sender,
                "recipient": event.recipient,
                "message": event.message,
                **event_meta(stored),
            },
            event,
        )
    if isinstance(event, RoomJoined):
        return ROOM_JOINED, {"room": event.room, "name": event.name, **event_meta(stored)}
    if isinstance(event, RoomLeft):
        return ROOM_LEFT, {"room": event.room, "name": event.name, **event_meta(stored)}
    if isinstance(event, RoomCreated):
        return ROOM_CREATED, {"room": event.room, "topic": event.topic, "creator": event.creator, **event_meta(stored)}
    # A join or leave keeps the seed's bare name as its first argument; a
    # second argument {position, time} lets a client track its position.
    if isinstance(event, UserJoined):
        return USER_JOINED, (event.name, event_meta(stored))
    if isinstance(event, UserLeft):
        return USER_LEFT, (event.name, event_meta(stored))
    return None


def audience(stored: StoredEvent) -> list[str]:
    """The Socket.IO rooms whose sockets receive ``stored`` live."""
    event = stored.event
    if isinstance(event, MessagePosted):
        return [LOBBY_ROOM] if event.room == LOBBY else [room_scope(event.room)]
    if isinstance(event, RoomJoined | RoomLeft):
        # The member's own sockets too: the leaver is no longer in the room.
        return [room_scope(event.room), user_room(event.name)]
    if isinstance(event, PrivateMessageSent):
        return [user_room(event.sender), user_room(event.recipient)]
    return [LOBBY_ROOM]


def event_meta(stored: StoredEvent) -> dict[str, Any]:
    return {"position": stored.position, "time": iso_time(stored)}


def error_payload(event: str, error: DomainError) -> dict[str, Any]:
    return {"event": event, "code": error.code, "message": error.message}


def ack_error(error: DomainError) -> dict[str, Any]:
    STATS.refused(error.code)  # every refusal's acknowledgement is built here
    return {"ok": False, "error": error.code, "message": error.message}


def ack_stored(stored: StoredEvent) -> dict[str, Any]:
    return {"ok": True, "position": stored.position, "time": iso_time(stored)}
