"""Pure decisions: given state and a command, which events happen (no I/O).

Errors are domain errors with a stable ``code``; the socket layer translates
them into the protocol's events and acknowledgements.
"""

from __future__ import annotations

import re
import unicodedata

from .events import (
    LEFT_DISCONNECTED,
    LEFT_TAKEN_OVER,
    MessagePosted,
    NewEvent,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    user_stream,
)
from .store import StreamHead

NAME_MIN = 3
NAME_MAX = 10
CLIENT_ID_MAX = 64
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]+")


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NameBad(DomainError):
    code = "name_bad"


class NameTaken(DomainError):
    code = "name_taken"


class AlreadyLoggedIn(DomainError):
    code = "already_logged_in"


class NotLoggedIn(DomainError):
    code = "not_logged_in"


class BadPayload(DomainError):
    code = "bad_payload"


class MessageEmpty(DomainError):
    code = "empty_message"


class MessageTooLong(DomainError):
    code = "message_too_long"


class RateLimited(DomainError):
    code = "rate_limited"


class NotStored(DomainError):
    code = "not_stored"


class ServerFailed(DomainError):
    """Something outside the client's control failed (the database, say)."""

    code = "server_error"


class ResumeRefused(DomainError):
    """A resume token that is unknown, superseded, expired or malformed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _has_control_chars(text: str, allowed: str = "") -> bool:
    return any(unicodedata.category(ch) == "Cc" and ch not in allowed for ch in text)


def check_name(value: object) -> str:
    """The seed's rule (a string of 3 to 10 characters), plus: no control characters.

    Names are compared exactly, as the seed does. HTML in a name is allowed:
    names are text, and clients must show them as text.
    """
    if not isinstance(value, str) or not value:
        raise NameBad("a name must be a non-empty string")
    if not NAME_MIN <= len(value) <= NAME_MAX:
        raise NameBad(f"a name must be {NAME_MIN} to {NAME_MAX} characters long")
    if _has_control_chars(value) or not value.strip():
        raise NameBad("a name must be printable text")
    return value


def check_message(value: object, *, max_chars: int) -> str:
    if not isinstance(value, str):
        raise BadPayload("a chat message must be a string")
    if not value.strip():
        raise MessageEmpty("a chat message must not be empty")
    if len(value) > max_chars:
        raise MessageTooLong(f"a chat message may have at most {max_chars} characters")
    if _has_control_chars(value, allowed="\n\t"):
        raise BadPayload("a chat message must not contain control characters")
    return value


def decide_login(
    name: str, head: StreamHead, *, session: str, node: str, resume_hash: str = "", command_id: str | None = None
) -> list[NewEvent]:
    if head.online:
        raise NameTaken(f"{name} is already online")
    stream = user_stream(name)
    return [
        NewEvent(
            stream,
            head.version + 1,
            UserLoggedIn(name=name, session=session, node=node, resume_hash=resume_hash),
            command_id,
        ),
        NewEvent(stream, head.version + 2, UserJoined(name=name), command_id),
    ]


def decide_resume(
    name: str, head: StreamHead, *, session: str, node: str, resume_hash: str, command_id: str | None = None
) -> list[NewEvent]:
    """Come back under ``name``; a session the log still shows online (a
    half-open socket, or one a dead process left) is closed first."""
    stream = user_stream(name)
    events: list[NewEvent] = []
    version = head.version
    if head.online:
        version += 1
        events.append(NewEvent(stream, version, UserLeft(name=name, reason=LEFT_TAKEN_OVER), command_id))
    events.append(
        NewEvent(
            stream,
            version + 1,
            UserLoggedIn(name=name, session=session, node=node, resume_hash=resume_hash, resumed=True),
            command_id,
        )
    )
    events.append(NewEvent(stream, version + 2, UserJoined(name=name), command_id))
    return events


def check_position(value: object, head: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= head:
        raise BadPayload(f"a position must be an integer from 0 to {head}")
    return value


def check_page(value: object, *, cap: int) -> tuple[int | None, int]:
    """``{before, limit}`` of a history page request."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadPayload("history takes an object {before, limit}")
    before = value.get("before")
    limit = value.get("limit", cap)
    if before is not None and (isinstance(before, bool) or not isinstance(before, int) or before < 1):
        raise BadPayload("before must be a positive integer position")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadPayload("limit must be a positive integer")
    return before, min(limit, cap)


def check_client_id(value: object) -> str | None:
    """A chat's own id, chosen by the client so that a retry is stored once."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= CLIENT_ID_MAX or not _CLIENT_ID.fullmatch(value):
        raise BadPayload(f"a chat id must be 1 to {CLIENT_ID_MAX} characters of A-Z a-z 0-9 _ - . :")
    return value


def decide_chat(sender: str, version: int, message: str, *, command_id: str | None = None) -> NewEvent:
    return NewEvent(user_stream(sender), version, MessagePosted(sender=sender, message=message), command_id)


def decide_leave(name: str, version: int, reason: str = LEFT_DISCONNECTED, *, command_id: str | None = None) -> NewEvent:
    return NewEvent(user_stream(name), version, UserLeft(name=name, reason=reason), command_id)
