"""How chat-replay prints events: a text transcript, jsonl or csv.

Renderers take chunks of ReplayRows ([position, stream, type, time, payload,
scope], see store.py) and return UTF-8 bytes, every line ending in a newline.

jsonl is the stable, documented schema: one object per line,
``{"position", "stream", "type", "time", "payload", "scope"}``, payload keys in
the order the server writes them (the event's fields), whatever the backend:
on SQLite the database renders these lines itself (store.replay_sqlite_jsonl),
and JsonlRenderer produces the same bytes from rows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .events import (
    EVENT_TYPES,
    AccountCreated,
    UserBanned,
    UserKicked,
    LOBBY,
    ConversationRead,
    MessagePosted,
    PrivateMessageSent,
    RoomCreated,
    RoomJoined,
    RoomLeft,
    UserJoined,
    UserLeft,
    UserLoggedIn,
)

if TYPE_CHECKING:  # store.py imports SQLAlchemy: too slow for a CLI that only prints --help
    from .store import ReplayRow

FORMATS = ("text", "jsonl", "csv")
# scope came with rooms: last, so that a reader of the first five columns by
# index reads what it always did.
CSV_COLUMNS = ("position", "stream", "type", "time", "payload", "scope")

# The payload fields of each event type, in the order the server writes them.
_FIELDS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in EVENT_TYPES.items()
}


def written_order(type_: str, payload: Any) -> Any:
    """The payload with its keys in the order the server writes them.

    PostgreSQL's jsonb keeps keys shortest first; this puts them back so that
    jsonl is the same bytes from either backend. Unknown keys keep their place
    after the known ones.
    """
    fields = _FIELDS.get(type_)
    if not fields or not isinstance(payload, dict) or tuple(payload) == fields:
        return payload
    ordered = {key: payload[key] for key in fields if key in payload}
    if len(ordered) != len(payload):
        ordered.update(payload)
    return ordered


class Renderer(Protocol):
    def header(self) -> bytes: ...

    def render(self, rows: list[ReplayRow]) -> bytes: ...


class JsonlRenderer:
    def header(self) -> bytes:
        return b""

    def render(self, rows: list[ReplayRow]) -> bytes:
        dumps = orjson.dumps
        return b"".join(
            [
                dumps(
                    {
                        "position": position,
                        "stream": stream,
                        "type": type_,
                        "time": time,
                        "payload": written_order(type_, payload),
                        "scope": scope,
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
                for position, stream, type_, time, payload, scope in rows
            ]
        )


class CsvRenderer:
    """Columns position,stream,type,time,payload,scope (payload as compact JSON,
    scope empty when the event has none); lines end in \\n."""

    def __init__(self, *, header: bool = True) -> None:
        self._header = header

    def header(self) -> bytes:
        return (",".join(CSV_COLUMNS) + "\n").encode() if self._header else b""

    def render(self, rows: list[ReplayRow]) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(
            (position, stream, type_, time, orjson.dumps(written_order(type_, payload)).decode(), scope)
            for position, stream, type_, time, payload, scope in rows
        )
        return buffer.getvalue().encode()


# Control characters would let a logged message drive the reader's terminal:
# the transcript shows them escaped (\x1b). Bidi controls would reorder the
# rest of the line on a terminal that applies them (a message could seem to
# come from someone else), and line and paragraph separators break lines on
# some: they show escaped too (\u202e). The server refuses all of these in
# names and messages; a log written by other means may still hold them.
# Messages keep tabs and newlines; a message's further lines are indented
# under its first.
_BIDI_AND_SEPARATORS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{code: f"\\u{code:04x}" for code in _BIDI_AND_SEPARATORS},
}
_NAME_TABLE = str.maketrans(_ESCAPES)
_MESSAGE_TABLE = str.maketrans({k: v for k, v in _ESCAPES.items() if chr(k) not in "\t\n"})
_BIDI_CLASS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
_NAME_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_CLASS}]")
_MESSAGE_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI_CLASS}]")

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_JOINED = "\x1b[32m"
_LEFT = "\x1b[33m"
_OTHER = "\x1b[36m"


class TextRenderer:
    """A transcript for people:

    2026-11-25 21:55:13Z <alice> hello
    2026-11-25 21:55:14Z * bob joined
    2026-11-25 21:55:20Z * bob left (disconnected)
    2026-11-25 21:56:02Z [Dev] * alice created the room (topic: Python)
    2026-11-25 21:56:05Z [Dev] <alice> hi
    2026-11-25 21:56:09Z <alice -> bob> psst

    The lobby's lines carry no room, exactly as before rooms (a log from then
    prints as it did); every other room's carry ``[Room]`` (its canonical
    name) first: brackets, since a room's name may hold spaces. A private
    message shows both parties, sender first. Logins print as ``* alice
    logged in (node local, session 3f2a...)`` (or ``resumed``) and read
    markers as ``* alice read up to 812`` when asked for.
    """

    def __init__(self, *, color: bool = False) -> None:
        self.color = color

    def header(self) -> bytes:
        return b""

    def render(self, rows: list[ReplayRow]) -> bytes:
        return "".join([self.line(row) for row in rows]).encode()

    def _paint(self, style: str, text: str) -> str:
        return f"{style}{text}{_RESET}" if self.color else text

    def _said(self, head: str, stamp: str, where: str, who: str, message: Any) -> str:
        # A message's further lines are indented under its first.
        indent = "\n" + " " * (len(stamp) + 1 + len(where) + len(who) + 1)
        text = str(message)
        if _MESSAGE_CONTROL.search(text):
            text = text.translate(_MESSAGE_TABLE)
        if "\n" in text:
            text = text.replace("\n", indent)
        return f"{head}{where}{self._paint(_BOLD, who)} {text}\n"

    def _files(self, head: str, where: str, payload: Any) -> str:
        """A line per attached file: its name and size (the bytes are in the
        blob store, not the log)."""
        return "".join(
            head + self._paint(_OTHER, f"{where}  [file] {_name(f['name'])} ({_size(f['size'])})") + "\n"
            for f in payload.get("attachments", ())
        )

    def line(self, row: ReplayRow) -> str:
        type_, time, payload = row[2], row[3], row[4]
        stamp = f"{time[:10]} {time[11:19]}Z"
        head = self._paint(_DIM, stamp) + " "
        try:
            room = payload.get("room")
            where = "" if room in (None, "", LOBBY) else f"[{_name(room)}] "
            if type_ == MessagePosted.type:
                who = f"<{_name(payload['sender'])}>"
                return self._said(head, stamp, where, who, payload["message"]) + self._files(head, where, payload)
            if type_ == PrivateMessageSent.type:
                who = f"<{_name(payload['sender'])} -> {_name(payload['recipient'])}>"
                return self._said(head, stamp, "", who, payload["message"]) + self._files(head, "", payload)
            if type_ in (UserJoined.type, RoomJoined.type):
                return head + self._paint(_JOINED, f"{where}* {_name(payload['name'])} joined") + "\n"
            if type_ in (UserLeft.type, RoomLeft.type):
                reason = payload.get("reason")
                because = f" ({_name(reason)})" if reason else ""
                return head + self._paint(_LEFT, f"{where}* {_name(payload['name'])} left{because}") + "\n"
            if type_ == RoomCreated.type:
                topic = payload.get("topic")
                about = f" (topic: {_name(topic)})" if topic else ""
                return head + self._paint(_JOINED, f"{where}* {_name(payload['creator'])} created the room{about}") + "\n"
            if type_ == ConversationRead.type:
                peer = payload.get("peer")
                what = f" the conversation with {_name(peer)}" if peer else ""
                reader = _name(payload["name"])
                return head + self._paint(_OTHER, f"{where}* {reader} read{what} up to {_name(payload['position'])}") + "\n"
            if type_ == AccountCreated.type:
                return head + self._paint(_OTHER, f"* account {_name(payload['name'])} created") + "\n"
            if type_ == UserKicked.type:
                line = f"* {_name(payload['name'])} was kicked by {_name(payload['by'])}"
                return head + self._paint(_LEFT, line) + "\n"
            if type_ == UserBanned.type:
                line = (
                    f"* {_name(payload['name'])} was banned by {_name(payload['by'])} "
                    f"for {_name(payload['seconds'])} s (until {_name(payload['until'])})"
                )
                return head + self._paint(_LEFT, line) + "\n"
            if type_ == UserLoggedIn.type:
                verb = "resumed" if payload.get("resumed") else "logged in"
                details = f"node {_name(payload.get('node'))}, session {_name(payload.get('session'))}"
                return head + self._paint(_OTHER, f"* {_name(payload['name'])} {verb} ({details})") + "\n"
        except (AttributeError, KeyError, TypeError):
            pass  # not the shape this version knows: print it as it is
        raw = orjson.dumps(payload).decode().translate(_NAME_TABLE)
        return head + self._paint(_OTHER, f"* {_name(type_)} {raw}") + "\n"


def _size(value: Any) -> str:
    size = int(value)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _name(value: Any) -> str:
    text = str(value)
    return text.translate(_NAME_TABLE) if _NAME_CONTROL.search(text) else text


def renderer_for(format_: str, *, color: bool = False, header: bool = True) -> Renderer:
    if format_ == "text":
        return TextRenderer(color=color)
    if format_ == "csv":
        return CsvRenderer(header=header)
    return JsonlRenderer()
