"""``chat-replay``: print the chat's history from the event log.

Reads the log of the database the server uses (CHAT_DATABASE_URL or
--database-url) in position order, filtered, as a transcript, jsonl or csv;
``--follow`` keeps printing what the server appends. Reads only: a SQLite file
is opened read-only (and never created), PostgreSQL in read-only transactions.

Speed: on SQLite the database renders whole chunks of output (see the bulk
reads at the end of store.py), so Python moves chunks of bytes, not rows; on
PostgreSQL rows come through an asyncpg server-side cursor and are rendered
here. Memory stays constant whatever the size of the log.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import sys
import time
import unicodedata
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TextIO
from urllib.parse import quote

import orjson

from .config import database_url_from_env
from .events import (
    EVENT_TYPES,
    TYPE_ALIASES,
    ConversationRead,
    RoomJoined,
    RoomLeft,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    private_scope,
    room_scope,
    user_stream,
)
from .replay_format import FORMATS, Renderer, renderer_for

if TYPE_CHECKING:
    from .store import ReplayFilter

# store.py (the SQL) imports SQLAlchemy, which takes a good part of a second:
# it is imported once the arguments are known good, so that --help and usage
# errors answer at once.

PROG = "chat-replay"

# Exit statuses (documented in --help).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_MIGRATED = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130

REQUIRED_TABLES = {"events"}
MIGRATE_HINT = "run `alembic upgrade head` (with the same CHAT_DATABASE_URL) first"

DESCRIPTION = """\
Print the chat's history from the event log, in order of position.

Reads the database the server uses: --database-url, else CHAT_DATABASE_URL,
else sqlite+aiosqlite:///chat.db (PostgreSQL: postgresql+asyncpg://user@host:port/db).
It only reads: a SQLite file is opened read-only and never created.
Filters combine: an event is printed when it matches every one given."""

EPILOG = """\
formats:
  text   (default) a transcript; times are UTC, to the second:
           2026-11-25 21:55:13Z <alice> hello
           2026-11-25 21:55:14Z * bob joined
           2026-11-25 21:55:20Z * bob left (disconnected)
           2026-11-25 21:56:02Z [Dev] * alice created the room (topic: Python)
           2026-11-25 21:56:03Z [Dev] * bob joined
           2026-11-25 21:56:05Z [Dev] <alice> hi
           2026-11-25 21:56:09Z <alice -> bob> a private message
         The lobby's lines carry no room (as before rooms); another room's
         carry [Room], its name as created. A message's further lines are
         indented under its first; control characters print escaped (\\x1b).
         Logins (each is followed by a join in the same commit) and read
         markers are left out unless --type login or --type read asks:
           2026-11-25 21:55:14Z * bob logged in (node local, session 5e0c...)
           2026-11-25 21:56:10Z [Dev] * bob read up to 812
         Colour when stdout is a terminal (--color, NO_COLOR).
  jsonl  one JSON object per line, a stable schema for tools:
           {"position":7,"stream":"user-alice","type":"MessagePosted",
            "time":"2026-11-25T21:55:13.204518Z",
            "payload":{"sender":"alice","message":"hello","room":"lobby"},
            "scope":"room:lobby"}
         position  integer, the event's place in the log (gap-free, from 1)
         stream    "user-<name>" (the user the event is about) or
                   "room-<room, case folded>" (a room's creation)
         type      UserLoggedIn | UserJoined | MessagePosted | UserLeft |
                   RoomCreated | RoomJoined | RoomLeft | PrivateMessageSent |
                   ConversationRead
         time      when it was recorded: ISO 8601, UTC, microseconds, "Z"
         payload   the event as stored (README, "Event log"); keys in the
                   order the server writes them, more keys may come later.
                   A room's canonical name is payload.room; a private
                   message's parties are payload.sender and .recipient
         scope     what --room and --conversation match: "room:<room, case
                   folded>" (the lobby's events: "room:lobby"),
                   "dm:<A>\\t<B>" for the private messages between A and B
                   (sorted by code point, a tab between), or null
  csv    a header, then position,stream,type,time,payload,scope (payload is
         the jsonl payload as JSON text, scope empty when null); lines end
         in \\n.

rooms and conversations: --room NAME matches any case ("DEV" is dev) and
  selects the room's creation, joins, leaves and chats; --room lobby selects
  the lobby's joins, leaves and chats. --conversation A,B selects the private
  messages between A and B, either order, names in exact case. A name may
  hold a comma: then give the pair as a JSON array, --conversation '["a,b","c"]'
  (any value starting with "[" is read as JSON; spaces around the comma of
  A,B are dropped, as no name starts or ends with one). --room and
  --conversation, each repeatable, select events in any of those given.

times (--since, --until): ISO 8601, UTC unless an offset is given
  (2026-11-25, 2026-11-25T21:55, "2026-11-25 21:55:13+01:00"), or a time
  ago: 30s, 15m, 2h, 7d, 1w. --since is inclusive, --until exclusive.
  Times must fall in the years 1000 to 9999 (UTC).

numbers (--after, --limit, --tail): whole numbers from 0 to 9223372036854775807
  (2**63-1, the log's largest position). --user, --room, --conversation:
  valid UTF-8, at most 1000 different values each; names match in NFC, as
  the server stores them. --user selects the user's stream: a private
  message is in its sender's. Any value that cannot be used exits 2 with one
  line on stderr.

examples:
  chat-replay                                   the whole transcript
  chat-replay --tail 20 -f                      the last 20 lines, then follow
  chat-replay --user alice --type chat --since 2h
  chat-replay --room dev --room ops --type chat,join,leave
  chat-replay --conversation alice,bob --tail 50
  chat-replay --format jsonl --after 41000 > new.jsonl     incremental dump
  chat-replay --format jsonl | jq -r 'select(.type == "MessagePosted") | .payload.message'
  CHAT_DATABASE_URL=postgresql+asyncpg://chat@db:5432/chat chat-replay -f

--follow polls the log by position every --interval seconds and prints each
new event once, in order, until Ctrl-C (or SIGTERM); with --limit it stops
after that many events. On PostgreSQL it outlives a dropped connection or a
database restart: it says so on stderr, reconnects (retrying until Ctrl-C)
and goes on after the last event it printed. Progress goes to stderr during
long dumps when stderr is a terminal and stdout is not.

exit status:
  0    done; also Ctrl-C during --follow, and a reader closing the pipe (| head)
  2    bad usage or filter value
  3    database missing or not migrated: run `alembic upgrade head`
  4    database unreachable or unreadable (PostgreSQL down, not a database file)
  130  interrupted (Ctrl-C) before a dump finished"""


class ReplayError(Exception):
    """An error for the operator: one line on stderr, and an exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class OutputClosed(Exception):
    """The reader of stdout went away (EPIPE): stop quietly."""


# -- options ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# Positions and counts go to SQL as BIGINTs: beyond this, the database driver
# fails (SQLite: OverflowError), so such a value is a usage error.
INT64_MAX = 2**63 - 1

# Times go to SQLite as text compared as text, with a four-digit year: a year
# before 1000 would print with fewer digits and compare wrongly.
TIME_MIN = datetime(1000, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

# A --user, --room or --type list longer than this is refused: each value is
# one SQL parameter, and SQLite and asyncpg stop at about 32,000.
MAX_VALUES = 1000


def _shown(value: str, width: int = 40) -> str:
    """A value quoted for a one-line error, cut short when it is long."""
    return repr(value if len(value) <= width else value[:width] + "...")


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """ISO 8601 (UTC when no offset is given) or a time ago (15m, 2h, 7d)."""
    text = value.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        try:
            seconds = float(ago.group(1)) * _UNIT_SECONDS[ago.group(2).lower()]
            moment = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:  # more than timedelta or datetime can hold
            moment = None
        if moment is None or moment < TIME_MIN:
            raise argparse.ArgumentTypeError(f"{_shown(value)} is too long ago: the earliest time is year 1000")
        return moment
    try:
        parsed = datetime.fromisoformat(text)  # also takes a trailing Z
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{_shown(value)} is not a time: use ISO 8601 (2026-11-25T21:55:13Z) or a time ago (15m, 2h, 7d)"
        ) from None
    try:
        moment = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:  # the offset moves it out of years 1 to 9999
        moment = None
    if moment is None or not TIME_MIN <= moment <= TIME_MAX:
        raise argparse.ArgumentTypeError(f"{_shown(value)} is out of range: use a time in the years 1000 to 9999 UTC")
    return moment


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:  # also a number of more than 4,300 digits
        number = -1
    if not 0 <= number <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {INT64_MAX}, got {_shown(value)}")
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    # NaN fails every comparison, so it is refused here too.
    if not 0.01 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0.01 to 3600, got {_shown(value)}")
    return seconds


# The short names --type takes (events.TYPE_ALIASES: login, join, chat,
# leave, room-created, room-join, room-leave, private, read), but join and
# leave mean a join or a leave of any room, the lobby's or another's, so that
# --room dev --type join shows dev's joins (room-join: only rooms' joins; the
# full name UserJoined: only the lobby's).
TYPE_GROUPS: dict[str, tuple[str, ...]] = {
    **{alias: (name,) for alias, name in TYPE_ALIASES.items()},
    "join": (UserJoined.type, RoomJoined.type),
    "leave": (UserLeft.type, RoomLeft.type),
}
# The short names and the full type names (each alone), any case.
_TYPE_NAMES = {**TYPE_GROUPS, **{t.lower(): (t,) for t in EVENT_TYPES}}

# What the transcript leaves out unless --type asks for it: a login is
# followed by a join in the same commit, and read markers are bookkeeping.
TEXT_HIDDEN = (UserLoggedIn.type, ConversationRead.type)


def _types(value: str) -> list[str]:
    names: list[str] = []
    for part in value.split(","):
        group = _TYPE_NAMES.get(part.strip().lower())
        if group is None:
            raise argparse.ArgumentTypeError(
                f"unknown event type {part.strip()!r}: use " + ", ".join(TYPE_GROUPS) + " (or the full type names)"
            )
        names.extend(group)
    return names


def _text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty value")
    if not _is_utf8(value):
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not valid UTF-8 text")
    return value


def _user(value: str) -> str:
    # The server stores names in NFC: a name typed in NFD (as some keyboards
    # and file systems produce it) is the same name.
    return unicodedata.normalize("NFC", _text(value))


def _room(value: str) -> str:
    # The scope column holds the server's key of the room (events.room_scope:
    # case folded, NFC), computed from the NFC name as the server has it.
    return room_scope(unicodedata.normalize("NFC", _text(value)))


_PAIR_HELP = 'give two names, A,B; when a name holds a comma, give the pair as JSON: \'["a,b","c"]\''


def _conversation(value: str) -> str:
    text = _text(value)
    if text.startswith("["):
        # The JSON form: for names holding commas (a name may hold any
        # visible character). Any value starting with "[" is read as JSON.
        try:
            pair = orjson.loads(text)
        except orjson.JSONDecodeError:
            pair = None
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) and n for n in pair)):
            raise argparse.ArgumentTypeError(f"{_shown(value)} is not a JSON array of two names: {_PAIR_HELP}")
        names = [_text(n) for n in pair]
    else:
        names = text.split(",")
        if len(names) != 2:
            raise argparse.ArgumentTypeError(f"{_shown(value)} is not a pair of names: {_PAIR_HELP}")
        # No name starts or ends with a space: "alice, bob" means bob.
        names = [n.strip() for n in names]
        if not all(names):
            raise argparse.ArgumentTypeError(f"{_shown(value)} is not a pair of names: {_PAIR_HELP}")
    # Names are matched in NFC, as the server stores them; private_scope sorts the pair.
    return private_scope(*(unicodedata.normalize("NFC", n) for n in names))


def _is_utf8(value: str) -> bool:
    # Bytes of an argument that are not UTF-8 arrive as lone surrogates
    # (surrogateescape), which no database driver can send.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--database-url", metavar="URL",
        help="the event store (default: CHAT_DATABASE_URL, else sqlite+aiosqlite:///chat.db)",
    )
    parser.add_argument("--format", choices=FORMATS, default="text", help="text (default), jsonl or csv")
    what = parser.add_argument_group("filters (they combine)")
    what.add_argument("--since", type=parse_time, metavar="TIME", help="events recorded at or after TIME")
    what.add_argument("--until", type=parse_time, metavar="TIME", help="events recorded before TIME")
    what.add_argument(
        "--after", type=_count, default=0, metavar="POSITION",
        help="events after this position (exclusive): for incremental dumps",
    )
    what.add_argument(
        "--user", action="append", type=_user, metavar="NAME",
        help="events about this user (stream user-NAME: logins, joins, leaves, chats, private messages sent); repeatable",
    )
    what.add_argument(
        "--type", action="append", type=_types, metavar="TYPE",
        help="login, join, leave, chat, private, room-created, room-join, room-leave or read "
        "(or a full type name); repeatable or comma-separated",
    )
    what.add_argument(
        "--room", action="append", type=_room, metavar="ROOM",
        help="events in this room, any case ('lobby': the lobby's joins, leaves and chats); repeatable",
    )
    what.add_argument(
        "--conversation", action="append", type=_conversation, metavar="A,B",
        help="the private messages between users A and B (either order; exact case); repeatable. "
        "With --room, events in any of them. A name holding a comma: '[\"a,b\",\"c\"]'",
    )
    what.add_argument("--limit", type=_count, metavar="N", help="stop after the first N events")
    what.add_argument("--tail", type=_count, metavar="N", help="only the last N events (then new ones with --follow)")
    live = parser.add_argument_group("following")
    live.add_argument(
        "-f", "--follow", action="store_true",
        help="after the dump, print new events as they are appended, until Ctrl-C",
    )
    live.add_argument(
        "--interval", type=_seconds, default=0.25, metavar="SECONDS",
        help="how often --follow polls the log (default 0.25)",
    )
    look = parser.add_argument_group("output")
    look.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto",
        help="colour the text format; auto (default): when stdout is a terminal and NO_COLOR is unset",
    )
    look.add_argument("--no-header", dest="header", action="store_false", help="csv without its header line")
    return parser


@dataclass(frozen=True)
class Options:
    url: str
    format: str
    filter: dict[str, Any]  # ReplayFilter's fields
    limit: int | None
    tail: int | None
    follow: bool
    interval: float
    color: bool
    header: bool


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    if args.limit is not None and args.tail is not None:
        parser.error("--limit and --tail do not combine: use one")
    if args.follow and args.until is not None:
        parser.error("--follow does not combine with --until")
    if args.since is not None and args.until is not None and args.since >= args.until:
        parser.error("--since must be earlier than --until")
    for option, values in (("--user", args.user), ("--room", args.room), ("--conversation", args.conversation)):
        if values and len(set(values)) > MAX_VALUES:
            parser.error(f"at most {MAX_VALUES} different values of {option}")
    types = tuple(dict.fromkeys(t for group in args.type for t in group)) if args.type else None
    exclude = TEXT_HIDDEN if args.format == "text" and types is None else ()
    # Rooms and conversations are one filter, on the scope column: an event
    # in any of those given.
    scopes = [*(args.room or ()), *(args.conversation or ())]
    flt = dict(
        after=args.after,
        since=args.since,
        until=args.until,
        types=types,
        exclude_types=exclude,
        streams=tuple(dict.fromkeys(user_stream(u) for u in args.user)) if args.user else None,
        scopes=tuple(dict.fromkeys(scopes)) if scopes else None,
    )
    if args.color == "auto":
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    else:
        color = args.color == "always"
    return Options(
        url=args.database_url or database_url_from_env(),
        format=args.format,
        filter=flt,
        limit=args.limit,
        tail=args.tail,
        follow=args.follow,
        interval=args.interval,
        color=color,
        header=args.header,
    )


# -- output ---------------------------------------------------------------------


class Output:
    """stdout as bytes; a reader that goes away raises OutputClosed."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        if data:
            try:
                self.stream.write(data)
            except BrokenPipeError:
                raise OutputClosed from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None


class Progress:
    """``123,456 events, position 500,000 of 1,000,000 (50%)`` on a terminal's stderr."""

    DELAY = 0.5  # say nothing for dumps shorter than this
    EVERY = 0.2

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.shown = self.started + self.DELAY - self.EVERY
        self.drawn = False
        self.events = 0
        self.first = 0
        self.last = 0

    def window(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def update(self, events: int, position: int) -> None:
        self.events += events
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self.shown < self.EVERY:
            return
        self.shown = now
        span = max(self.last - self.first, 1)
        done = min(max(position - self.first, 0), span)
        self.stream.write(
            f"\r{PROG}: {self.events:,} events, position {position:,} of {self.last:,} ({100 * done // span}%)\x1b[K"
        )
        self.stream.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn and self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
        self.stream = None  # only the first dump shows progress, not --follow


def _progress_stream() -> TextIO | None:
    try:
        if sys.stderr.isatty() and not sys.stdout.isatty():
            return sys.stderr
    except (AttributeError, ValueError):
        pass
    return None


class Replay:
    """What both backends share: the filter, the count, the output, progress."""

    def __init__(self, options: Options, out: Output, progress: Progress, *, has_scope: bool) -> None:
        from .store import ReplayFilter

        self.options = options
        self.out = out
        self.progress = progress
        # A log never upgraded to the scope column still reads: its scopes are
        # what the migration would backfill (only the lobby's).
        self.filter = ReplayFilter(**options.filter, legacy=not has_scope)
        self.renderer: Renderer = renderer_for(options.format, color=options.color, header=options.header)
        self.remaining = options.limit
        self.last_position = 0  # of the last event written

    @property
    def satisfied(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def wrote(self, data: bytes, events: int, last_position: int) -> None:
        self.out.write(data)
        if self.remaining is not None:
            self.remaining -= events
        self.last_position = last_position
        self.progress.update(events, last_position)

    def begin(self, f: ReplayFilter) -> None:
        """Before the dump of ``f`` (positions ``f.after`` to ``f.through``)."""
        assert f.through is not None
        self.progress.window(f.after, f.through)
        self.out.write(self.renderer.header())

    def dumped(self) -> None:
        self.progress.done()
        self.out.flush()


# -- SQLite ---------------------------------------------------------------------


def sqlite_path(url: str) -> Path:
    import sqlalchemy as sa

    database = sa.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ReplayError(EXIT_USAGE, f"{url} names no SQLite database file")
    return Path(database)


def open_sqlite(url: str) -> sqlite3.Connection:
    """A read-only connection to the log's file: a missing file is not created."""
    path = sqlite_path(url)
    if not path.exists():
        raise ReplayError(
            EXIT_NOT_MIGRATED,
            f"no database at {path.resolve()} (from {url}): point CHAT_DATABASE_URL or --database-url at "
            f"the server's database, or create it: {MIGRATE_HINT}",
        )
    from .store import replay_sqlite_tables

    try:
        conn = sqlite3.connect(
            # As bytes: a file name that is not UTF-8 (from undecodable
            # bytes of the argument) still names its file.
            f"file:{quote(os.fsencode(path.resolve()))}?mode=ro",
            uri=True,
            isolation_level=None,  # autocommit: each read sees the latest commit
            timeout=10,
        )
    except sqlite3.Error as exc:
        raise ReplayError(EXIT_UNREACHABLE, f"cannot open {path}: {exc}") from None
    try:
        tables = replay_sqlite_tables(conn)
        conn.execute("SELECT json_object('ok', json('1'))").fetchone()
    except sqlite3.Error as exc:
        conn.close()
        detail = "this SQLite has no JSON functions" if "json" in str(exc) else str(exc)
        raise ReplayError(EXIT_UNREACHABLE, f"cannot read {path}: {detail}") from None
    if not REQUIRED_TABLES <= tables:
        conn.close()
        raise ReplayError(EXIT_NOT_MIGRATED, f"{path} holds no chat event log (no table events): {MIGRATE_HINT}")
    return conn


def replay_sqlite(options: Options, out: Output, progress: Progress) -> None:
    from .store import (
        replay_sqlite_has_scope,
        replay_sqlite_head,
        replay_sqlite_jsonl,
        replay_sqlite_rows,
        replay_sqlite_tail_after,
    )

    conn = open_sqlite(options.url)
    try:
        has_scope = replay_sqlite_has_scope(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise ReplayError(EXIT_UNREACHABLE, f"cannot read {sqlite_path(options.url)}: {exc}") from None
    job = Replay(options, out, progress, has_scope=has_scope)

    def dump(f: ReplayFilter) -> None:
        if job.satisfied:
            return
        if options.format == "jsonl":
            # SQLite renders the lines: Python only moves chunks of bytes.
            for text, count, last in replay_sqlite_jsonl(conn, f, limit=job.remaining):
                job.wrote(text, count, last)
        else:
            for rows in replay_sqlite_rows(conn, f, limit=job.remaining):
                job.wrote(job.renderer.render(rows), len(rows), rows[-1][0])

    try:
        head = replay_sqlite_head(conn)
        f = replace(job.filter, through=head)
        if options.tail is not None:
            f = replace(f, after=replay_sqlite_tail_after(conn, f, options.tail))
        job.begin(f)
        dump(f)
        job.dumped()
        # Positions commit in order, gap-free: everything up to the head read
        # now is there to read, and the next window starts where this one ended.
        seen = max(head, job.filter.after)
        while options.follow and not job.satisfied:
            time.sleep(options.interval)
            head = replay_sqlite_head(conn)
            if head > seen:
                dump(replace(f, after=seen, through=head))
                out.flush()
                seen = head
    except sqlite3.Error as exc:
        raise ReplayError(EXIT_UNREACHABLE, f"cannot read {sqlite_path(options.url)}: {exc}") from None
    except orjson.JSONDecodeError as exc:
        # SQLite's JSON functions take a lone surrogate escape (\ud800) that
        # no UTF-8 output can hold; our server never writes one, another tool may.
        raise ReplayError(
            EXIT_UNREACHABLE,
            f"cannot read {sqlite_path(options.url)}: an event after position {job.last_position} "
            f"holds a payload that is not valid Unicode ({_one_line(exc)})",
        ) from None
    finally:
        progress.done()
        conn.close()


# -- PostgreSQL -------------------------------------------------------------------


async def connect_pg(url: str) -> Any:
    import asyncpg
    import sqlalchemy as sa

    from .store import replay_pg_tables

    parsed = sa.make_url(url)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        raise ReplayError(
            EXIT_NOT_MIGRATED,
            f"PostgreSQL at {where} has no database {parsed.database!r}: create it, then {MIGRATE_HINT}",
        ) from None
    except ValueError as exc:
        # asyncpg's ClientConfigurationError (a ValueError): a setting in the
        # URL that asyncpg cannot use, such as ?sslmode=bogus.
        raise ReplayError(EXIT_USAGE, f"the database URL cannot be used: {_one_line(exc)}") from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ReplayError(EXIT_UNREACHABLE, f"cannot reach PostgreSQL at {where}: {_one_line(exc)}") from None
    try:
        tables = await replay_pg_tables(conn)
    except BaseException:
        conn.terminate()
        raise
    if not REQUIRED_TABLES <= tables:
        await conn.close(timeout=2)
        raise ReplayError(
            EXIT_NOT_MIGRATED,
            f"PostgreSQL database {parsed.database!r} holds no chat event log (no table events): {MIGRATE_HINT}",
        )
    return conn


async def replay_pg(options: Options, out: Output, progress: Progress) -> None:
    import asyncio

    import asyncpg

    from .store import replay_pg_has_scope, replay_pg_head, replay_pg_rows, replay_pg_tail_after

    conn = await connect_pg(options.url)
    try:
        has_scope = await replay_pg_has_scope(conn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        conn.terminate()
        raise ReplayError(EXIT_UNREACHABLE, f"lost the PostgreSQL database: {_one_line(exc)}") from None
    job = Replay(options, out, progress, has_scope=has_scope)

    async def dump(f: ReplayFilter) -> None:
        if job.satisfied:
            return
        async for rows in replay_pg_rows(conn, f, limit=job.remaining):
            job.wrote(job.renderer.render(rows), len(rows), rows[-1][0])

    try:
        head = await replay_pg_head(conn)
        f = replace(job.filter, through=head)
        if options.tail is not None:
            f = replace(f, after=await replay_pg_tail_after(conn, f, options.tail))
        job.begin(f)
        await dump(f)
        job.dumped()
        seen = max(head, job.filter.after)  # see replay_sqlite
        while options.follow and not job.satisfied:
            await asyncio.sleep(options.interval)
            try:
                head = await replay_pg_head(conn)
                if head > seen:
                    await dump(replace(f, after=seen, through=head))
                    out.flush()
                    seen = head
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # A follow outlives a database restart or a dropped
                # connection: go on after the last event written, so
                # nothing is printed twice or skipped.
                seen = max(seen, job.last_position)
                out.flush()
                conn.terminate()
                conn = await reconnect_pg(options.url, exc)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ReplayError(EXIT_UNREACHABLE, f"lost the PostgreSQL database: {_one_line(exc)}") from None
    finally:
        progress.done()
        try:
            await conn.close(timeout=2)
        except Exception:  # noqa: BLE001 - the connection broke already
            conn.terminate()


RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds; the last repeats


async def reconnect_pg(url: str, lost: BaseException) -> Any:
    """Connect again, for as long as it takes (Ctrl-C stops), saying so on stderr."""
    import asyncio

    print(f"{PROG}: lost the PostgreSQL connection ({_one_line(lost)}); reconnecting", file=sys.stderr, flush=True)
    attempt = 0
    while True:
        await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
        attempt += 1
        try:
            conn = await connect_pg(url)
        except ReplayError as exc:
            if exc.code != EXIT_UNREACHABLE:
                raise  # the database or its schema is gone: nothing to wait for
            continue
        print(f"{PROG}: reconnected to PostgreSQL", file=sys.stderr, flush=True)
        return conn


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- main -----------------------------------------------------------------------


def backend(url: str) -> str:
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ReplayError(
            EXIT_USAGE,
            "the database URL is not a URL "
            "(expected sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST:PORT/DB)",
        ) from None
    name = parsed.get_backend_name()
    if name == "sqlite":
        return name  # a file name may hold any bytes (see open_sqlite)
    # What goes to a server must be text (and rendering the URL needs it too).
    if not _is_utf8(url):
        raise ReplayError(EXIT_USAGE, "the database URL is not valid UTF-8 text")
    shown = parsed.render_as_string(hide_password=True)
    if name != "postgresql":
        raise ReplayError(EXIT_USAGE, f"{shown}: chat-replay reads SQLite or PostgreSQL, not {name}")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ReplayError(EXIT_USAGE, f"{shown}: the port must be from 1 to 65535")
    return name


def _stdout_gone() -> None:
    # The reader closed the pipe: nothing more can be written, and the
    # interpreter's own flush of stdout at exit must not complain either.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = options_from(args, parser)
    out = Output(sys.stdout.buffer)
    progress = Progress(_progress_stream())
    # SIGTERM stops like Ctrl-C (a supervisor ending a --follow).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            if backend(options.url) == "sqlite":
                replay_sqlite(options, out, progress)
            else:
                import asyncio

                asyncio.run(replay_pg(options, out, progress))
            out.flush()
        except KeyboardInterrupt:
            out.flush()
            return EXIT_OK if options.follow else EXIT_INTERRUPTED
    except OutputClosed:
        _stdout_gone()
        return EXIT_OK
    except ReplayError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
