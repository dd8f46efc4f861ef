"""The wire protocol: event names and the payloads built from stored events.

The seed's events keep their meaning; extensions only add fields to object
payloads and add new events (a seed client ignores what it does not know).
"""

from __future__ import annotations

from typing import Any

from .domain import DomainError
from .events import MessagePosted, StoredEvent, UserLeft

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

# server -> client (extensions)
PROTOCOL_ERROR = "protocolError"

LOBBY_ROOM = "lobby"


def iso_time(stored: StoredEvent) -> str:
    return stored.recorded_at.isoformat().replace("+00:00", "Z")


def chat_payload(stored: StoredEvent) -> dict[str, Any]:
    event = stored.event
    assert isinstance(event, MessagePosted)
    return {
        "sender": event.sender,
        "message": event.message,
        "position": stored.position,
        "time": iso_time(stored),
    }


def welcome_payload(stored: StoredEvent, name: str) -> dict[str, Any]:
    return {"name": name, "position": stored.position}


def left_payload(stored: StoredEvent) -> str:
    event = stored.event
    assert isinstance(event, UserLeft)
    return event.name


def error_payload(event: str, error: DomainError) -> dict[str, Any]:
    return {"event": event, "code": error.code, "message": error.message}


def ack_error(error: DomainError) -> dict[str, Any]:
    return {"ok": False, "error": error.code, "message": error.message}


def ack_stored(stored: StoredEvent) -> dict[str, Any]:
    return {"ok": True, "position": stored.position, "time": iso_time(stored)}
