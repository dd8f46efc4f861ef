"""Pure decisions: given state and a command, which events happen (no I/O).

Errors are domain errors with a stable ``code``; the socket layer translates
them into the protocol's events and acknowledgements.
"""

from __future__ import annotations

import unicodedata

from .events import (
    LEFT_DISCONNECTED,
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


def decide_login(name: str, head: StreamHead, *, session: str, node: str) -> list[NewEvent]:
    if head.online:
        raise NameTaken(f"{name} is already online")
    stream = user_stream(name)
    return [
        NewEvent(stream, head.version + 1, UserLoggedIn(name=name, session=session, node=node)),
        NewEvent(stream, head.version + 2, UserJoined(name=name)),
    ]


def decide_chat(sender: str, version: int, message: str) -> NewEvent:
    return NewEvent(user_stream(sender), version, MessagePosted(sender=sender, message=message))


def decide_leave(name: str, version: int, reason: str = LEFT_DISCONNECTED) -> NewEvent:
    return NewEvent(user_stream(name), version, UserLeft(name=name, reason=reason))
