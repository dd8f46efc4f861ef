"""Pure decisions: given state and a command, which events happen (no I/O).

Errors are domain errors with a stable ``code``; the socket layer translates
them into the protocol's events and acknowledgements.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TypeGuard

from .events import (
    LEFT_DISCONNECTED,
    LEFT_TAKEN_OVER,
    LOBBY,
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
    room_key,
    room_stream,
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


class RoomNameBad(DomainError):
    code = "room_name_bad"


class RoomExists(DomainError):
    code = "room_exists"


class NoSuchRoom(DomainError):
    code = "no_such_room"


class NotAMember(DomainError):
    code = "not_a_member"


class RoomFull(DomainError):
    code = "room_full"


class TooManyRooms(DomainError):
    code = "too_many_rooms"


class NoSuchUser(DomainError):
    code = "no_such_user"


class NotAllowed(DomainError):
    """Moderation by someone who is not an admin (or in open mode)."""

    code = "not_allowed"


class CannotLeaveLobby(DomainError):
    code = "cannot_leave_lobby"


class BadAttachment(DomainError):
    code = "bad_attachment"


class TooManyAttachments(DomainError):
    code = "too_many_attachments"


class ResumeRefused(DomainError):
    """A resume token that is unknown, superseded, expired or malformed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- text rules -----------------------------------------------------------------
# A name is an identity: two names that look the same must be one name. So a
# name is NFC-normalized before any check and holds only visible characters,
# single spaces between them. A message is content: it is stored as typed (NFC
# would rewrite some characters, such as CJK compatibility ideographs), and
# refuses only what is invisible or can reorder or hide the text around it.
#
# str.isprintable() is False exactly for the categories Cc, Cf, Cs, Co, Cn, Zl,
# Zp and Zs (but U+0020): one C-speed pass clears almost every text, and only
# the rest is looked at character by character.

# Default-ignorable code points (Unicode's DerivedCoreProperties) that are not
# in a C or Z category, plus U+2800 (braille blank): each renders as nothing
# or as blank, so a name holding one looks like a name without it.
_INVISIBLE_MARKS_AND_LETTERS: tuple[tuple[int, int], ...] = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors
    (0x2800, 0x2800),  # braille pattern blank
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0100, 0xE01EF),  # variation selectors supplement
)

# Format characters a message keeps: the joiners of emoji sequences and of
# scripts that need them (ZWNJ is ordinary spelling in Persian and Indic
# scripts), and the tag characters of subdivision flags (England's flag is
# U+1F3F4 followed by tags and U+E007F CANCEL TAG).
_MESSAGE_FORMAT_KEPT = frozenset({0x200C, 0x200D, *range(0xE0020, 0xE0080)})

# Phones get new emoji before servers get new Unicode tables: a code point this
# Python does not know yet (category Cn) is kept in a message when it lies in
# the blocks Unicode reserves for pictographs.
_EMOJI_BLOCKS = (0x1F000, 0x1FAFF)

# Whatever a message may hold that still draws no glyph: a message made of
# these (and whitespace) alone is empty.
_MESSAGE_INVISIBLE_KEPT = _MESSAGE_FORMAT_KEPT | frozenset(range(0xFE00, 0xFE10)) | frozenset(range(0xE0100, 0xE01F0))


def _invisible_in_name(ch: str) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in _INVISIBLE_MARKS_AND_LETTERS)


def _refused_in_name(ch: str) -> bool:
    if ch == " ":
        return False
    # Not printable: C* (controls, format and bidi characters, surrogates,
    # private use, unassigned), line and paragraph separators, and every space
    # other than U+0020 (NBSP and U+3000 look like a space or like nothing).
    return not ch.isprintable() or _invisible_in_name(ch)


def _refused_in_message(ch: str) -> bool:
    if ch.isprintable() or ch in "\n\t":
        return False
    category = unicodedata.category(ch)
    if category == "Zs":
        return False  # NBSP and friends are ordinary typography in a message
    code = ord(ch)
    if category == "Cf":
        return code not in _MESSAGE_FORMAT_KEPT
    if category == "Cn":
        return not _EMOJI_BLOCKS[0] <= code <= _EMOJI_BLOCKS[1]
    return True  # Cc, Cs (a lone surrogate), Co, Zl, Zp


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_name(value: object) -> str:
    """A login name, as the log will hold it: its NFC form, 3 to 10 characters.

    Refused (``name_bad``): anything but a string; lone surrogates; control,
    format and bidi characters, private-use and unassigned code points, line
    and paragraph separators, spaces other than U+0020 and other invisible
    characters (variation selectors, fillers); a space at either end or two in
    a row. Case is kept and compared exactly, as in the seed. HTML in a name is
    allowed: names are text, and clients must show them as text.
    """
    return _check_visible_name(value, NAME_MIN, NAME_MAX, NameBad, "a name")


ROOM_NAME_MIN = 2


def check_room_name(value: object, *, max_chars: int) -> str:
    """A room's name: the rules of user names (NFC, visible characters,
    single inner spaces), 2 to ``max_chars`` characters (``room_name_bad``).
    Rooms are one room whatever the case (``events.room_key``)."""
    return _check_visible_name(value, ROOM_NAME_MIN, max_chars, RoomNameBad, "a room name")


def _check_visible_name(value: object, low: int, high: int, error: type[DomainError], what: str) -> str:
    if not isinstance(value, str) or not value:
        raise error(f"{what} must be a non-empty string")
    # NFC composes a character from at most a handful of code points (a base
    # and its marks): nothing longer than this comes out at ``high``.
    if len(value) > high * 8:
        raise error(f"{what} must be {low} to {high} characters long")
    if _has_lone_surrogate(value):
        raise error(f"{what} must be valid Unicode text (no lone surrogates)")
    name = unicodedata.normalize("NFC", value)
    if not low <= len(name) <= high:
        raise error(f"{what} must be {low} to {high} characters long")
    if not name.isprintable() or not name.isascii():
        if any(_refused_in_name(ch) for ch in set(name)):
            raise error(f"{what} must be visible text: no control, format, invisible or special space characters")
    if name != name.strip(" ") or "  " in name:
        raise error(f"{what} must not start or end with a space, nor hold two spaces in a row")
    return name


def check_message(value: object, *, max_chars: int) -> str:
    """A chat message, stored as typed (not normalized).

    Keeps newlines, tabs, every space character, emoji joiners (ZWJ, ZWNJ),
    variation selectors and tag characters; refuses (``bad_payload``) lone
    surrogates, other control and format characters (bidi controls included),
    private-use code points, line and paragraph separators, and code points
    unassigned in this server's Unicode version outside the emoji blocks.
    """
    if not isinstance(value, str):
        raise BadPayload("a chat message must be a string")
    if len(value) > max_chars:
        raise MessageTooLong(f"a chat message may have at most {max_chars} characters")
    if not value.isprintable():
        if _has_lone_surrogate(value):
            raise BadPayload("a chat message must be valid Unicode text (no lone surrogates)")
        # Each distinct character once: set() runs at C speed.
        if any(_refused_in_message(ch) for ch in set(value)):
            raise BadPayload(
                "a chat message must not contain control, format or bidi characters (newlines and tabs are fine)"
            )
    if all(ch.isspace() or ord(ch) in _MESSAGE_INVISIBLE_KEPT for ch in value):
        raise MessageEmpty("a chat message must not be empty")
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


# Resume tokens are secrets.token_urlsafe(32): URL-safe base64. Anything else
# is refused before it is hashed (a lone surrogate cannot even be encoded).
_RESUME_TOKEN = re.compile(r"[A-Za-z0-9_-]{10,200}")


def check_resume_token(value: object) -> str:
    """A resume token as sent; refused with ``invalid_token`` when it cannot be one."""
    if not isinstance(value, str) or not _RESUME_TOKEN.fullmatch(value):
        raise ResumeRefused("invalid_token", "the resume token is malformed")
    return value


# Positions and counts are SQL BIGINTs: a number outside that range would fail
# in the database driver, after the request has been accepted.
INT64_MAX = 2**63 - 1


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false decode to bool, a subclass of int: they are not numbers here.
    return isinstance(value, int) and not isinstance(value, bool)


def check_position(value: object, head: int) -> int:
    """A position the client has seen: an integer from 0 to the log's head."""
    if not _is_int(value) or not 0 <= value <= min(head, INT64_MAX):
        raise BadPayload(f"a position must be an integer from 0 to {head}")
    return value


def check_page(value: object, *, cap: int) -> tuple[int | None, int]:
    """``{before, limit}`` of a history page request: ``before`` a position
    from 1 to 2**63-1 (or absent: the latest), ``limit`` an integer from 1 to
    2**63-1, served as at most ``cap``."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadPayload("history takes an object {before, limit}")
    before = value.get("before")
    limit = value.get("limit", cap)
    if before is not None and (not _is_int(before) or not 1 <= before <= INT64_MAX):
        raise BadPayload(f"before must be an integer position from 1 to {INT64_MAX}")
    if not _is_int(limit) or not 1 <= limit <= INT64_MAX:
        raise BadPayload(f"limit must be an integer from 1 to {INT64_MAX}")
    return before, min(limit, cap)


def check_client_id(value: object) -> str | None:
    """A chat's own id, chosen by the client so that a retry is stored once."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= CLIENT_ID_MAX or not _CLIENT_ID.fullmatch(value):
        raise BadPayload(f"a chat id must be 1 to {CLIENT_ID_MAX} characters of A-Z a-z 0-9 _ - . :")
    return value


# Upload ids are secrets.token_urlsafe(18): 24 URL-safe base64 characters.
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def check_attachment_ids(value: object, *, max_files: int) -> tuple[str, ...]:
    """The ``attachments`` of a chat: a list of distinct upload ids, at most
    ``max_files``. Whether each may be posted is the uploads' business."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadPayload("attachments must be a list of upload ids")
    if len(value) > max_files:
        raise TooManyAttachments(f"a message may carry at most {max_files} files")
    for item in value:
        if not isinstance(item, str) or not _UPLOAD_ID.fullmatch(item):
            raise BadAttachment("an attachment must be the id of an upload")
    if len(set(value)) != len(value):
        raise BadAttachment("an upload can be attached once")
    return tuple(value)


def check_chat_text(value: object, *, max_chars: int, with_files: bool) -> str:
    """A chat's text; with files it may be empty (a bare file is a message)."""
    try:
        return check_message(value, max_chars=max_chars)
    except MessageEmpty:
        if with_files:
            return ""
        raise


def decide_chat(
    sender: str,
    version: int,
    message: str,
    *,
    command_id: str | None = None,
    attachments: tuple[dict[str, object], ...] = (),
) -> NewEvent:
    return NewEvent(
        user_stream(sender),
        version,
        MessagePosted(sender=sender, message=message, attachments=attachments),
        command_id,
    )


def decide_leave(name: str, version: int, reason: str = LEFT_DISCONNECTED, *, command_id: str | None = None) -> NewEvent:
    return NewEvent(user_stream(name), version, UserLeft(name=name, reason=reason), command_id)


# -- rooms and private messages --------------------------------------------------


def check_topic(value: object, *, max_chars: int) -> str:
    """A room's topic: optional, message text rules, at most ``max_chars``."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise BadPayload("a topic must be a string")
    if len(value) > max_chars:
        raise MessageTooLong(f"a topic may have at most {max_chars} characters")
    try:
        return check_message(value, max_chars=max_chars)
    except MessageEmpty:
        return ""


def check_request(value: object, event: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BadPayload(f"{event} takes an object")
    return value


@dataclass(frozen=True, slots=True)
class Target:
    """Where a chat goes: the lobby, a room, or one user."""

    room: str | None = None  # a room name as the client wrote it (not the lobby)
    to: str | None = None  # a user name (a private message)


def check_target(options: dict[str, object], *, room_name_max: int) -> Target:
    room, to = options.get("room"), options.get("to")
    if room is not None and to is not None:
        raise BadPayload("a chat goes to a room or to a user, not both")
    if to is not None:
        if not isinstance(to, str):
            raise BadPayload("to must be a user name")
        try:
            return Target(to=check_name(to))
        except NameBad:
            raise NoSuchUser("there is no user of that name") from None
    if room is not None:
        name = check_room_name(room, max_chars=room_name_max)
        return Target() if room_key(name) == LOBBY else Target(room=name)
    return Target()


def decide_create_room(
    creator: str,
    version: int,
    room: str,
    topic: str,
    *,
    exists: bool,
    rooms: int,
    member_of: int,
    rooms_max: int,
    rooms_per_user: int,
    command_id: str | None = None,
) -> list[NewEvent]:
    """A room and its creator's membership, appended together: the room's
    stream starts at version 1, so of two creations of one name one fails."""
    if exists or room_key(room) == LOBBY:
        raise RoomExists(f"a room named {room} exists already")
    if rooms >= rooms_max:
        raise TooManyRooms(f"this server holds its maximum of {rooms_max} rooms")
    if member_of >= rooms_per_user:
        raise TooManyRooms(f"you are a member of {rooms_per_user} rooms, the most one may be")
    return [
        NewEvent(room_stream(room), 1, RoomCreated(room=room, creator=creator, topic=topic), command_id),
        NewEvent(user_stream(creator), version, RoomJoined(name=creator, room=room), command_id),
    ]


def decide_join_room(
    name: str,
    version: int,
    room: str,
    *,
    members: int,
    member_of: int,
    members_max: int,
    rooms_per_user: int,
    command_id: str | None = None,
) -> NewEvent:
    """``room`` as the room is named (its creator's spelling)."""
    if members >= members_max:
        raise RoomFull(f"{room} has its maximum of {members_max} members")
    if member_of >= rooms_per_user:
        raise TooManyRooms(f"you are a member of {rooms_per_user} rooms, the most one may be")
    return NewEvent(user_stream(name), version, RoomJoined(name=name, room=room), command_id)


def decide_leave_room(name: str, version: int, room: str, *, command_id: str | None = None) -> NewEvent:
    return NewEvent(user_stream(name), version, RoomLeft(name=name, room=room), command_id)


def decide_room_chat(
    sender: str,
    version: int,
    room: str,
    message: str,
    *,
    command_id: str | None = None,
    attachments: tuple[dict[str, object], ...] = (),
) -> NewEvent:
    return NewEvent(
        user_stream(sender),
        version,
        MessagePosted(sender=sender, message=message, room=room, attachments=attachments),
        command_id,
    )


def decide_private_message(
    sender: str,
    version: int,
    recipient: str,
    message: str,
    *,
    known: bool,
    command_id: str | None = None,
    attachments: tuple[dict[str, object], ...] = (),
) -> NewEvent:
    if not known:
        raise NoSuchUser(f"no user named {recipient} has ever logged in")
    if recipient == sender:
        raise BadPayload("a private message goes to someone else")
    return NewEvent(
        user_stream(sender),
        version,
        PrivateMessageSent(sender=sender, recipient=recipient, message=message, attachments=attachments),
        command_id,
    )


def decide_read(
    name: str, version: int, position: int, *, marked: int, room: str = "", peer: str = ""
) -> NewEvent | None:
    """Mark read up to ``position``; nothing happens if that is not past the
    marker already stored (``marked``)."""
    if position <= marked:
        return None
    return NewEvent(user_stream(name), version, ConversationRead(name=name, position=position, room=room, peer=peer))
