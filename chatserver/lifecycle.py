"""Session lifecycle: every state a socket's login can be in, and every
transition, decided here and nowhere else (pure: no I/O, no awaits).

Two things are tracked:

- a **socket** (``Socket``): connected, holding at most one session, until it
  disconnects (``gone``);
- a **session** (``Session``): one login (or resume) of one socket under one
  name, from its claim to its leave::

      PENDING --login committed--> ACTIVE --disconnect/leave--> LEAVING --stored--> CLOSED
         |                           |  ^                          |  ^
         | login failed              |  | takeover failed          |  | retry
         v                           v  |                          v  |
       CLOSED                      YIELDING --takeover committed--> CLOSED
                                                         LEAVE_FAILED

A name is held by at most one session of this process (``holder``) from its
claim until that session is CLOSED, so a name can never be claimed twice here;
across processes the log's ``UNIQUE(stream, version)`` decides.

The callers (``commands``, the writer's commit callback) do their awaits
first, then call one transition, which checks the state it expects, changes
it, and returns the effects to carry out (``Leave``, ``Drop``). The joint
rules that used to be scattered live here:

- a login that commits for a socket that has gone leaves at once;
- a leave that fails is kept (``LEAVE_FAILED``) and retried until stored; the
  name stays held meanwhile, so nobody else can log in under a name the log
  still shows online;
- a resume takes over only the very session its token was issued to, and the
  old session is retired when the resume commits (restored if it fails).
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from .domain import AlreadyLoggedIn, NameTaken, NotLoggedIn, ResumeRefused
from .events import LEFT_DISCONNECTED, NewEvent


class State(enum.Enum):
    PENDING = "pending"  # login or resume submitted, not yet committed
    ACTIVE = "active"  # committed: the socket may chat
    YIELDING = "yielding"  # a resume elsewhere is taking this session over
    LEAVING = "leaving"  # its leave is being stored
    LEAVE_FAILED = "leave failed"  # its leave failed; retried until stored
    CLOSED = "closed"  # its leave is stored, or its login never was


# What each transition accepts. A transition from any other state is a bug:
# it raises instead of silently doing something else.
_ALLOWED: dict[str, frozenset[State]] = {
    "login_committed": frozenset({State.PENDING}),
    "login_failed": frozenset({State.PENDING}),
    "leave": frozenset({State.ACTIVE}),
    "leave_committed": frozenset({State.LEAVING}),
    "leave_failed": frozenset({State.LEAVING}),
    "retry_leave": frozenset({State.LEAVE_FAILED}),
    "superseded": frozenset({State.ACTIVE, State.YIELDING, State.LEAVING, State.LEAVE_FAILED}),
}


class LifecycleError(RuntimeError):
    """A transition was asked of a session in a state that does not allow it."""


@dataclass(eq=False)
class Session:
    """One login of one socket, from its claim to its leave."""

    sid: str
    name: str
    id: str
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    state: State = State.PENDING
    version: int = 0  # last version appended (or submitted) to the user's stream
    socket_gone: bool = False
    # Replay from this position instead of sending history (a resume).
    resume_after: int | None = None
    # Where its login (or resume) landed in the log, once committed.
    login_position: int | None = None
    # The session this one takes over (a resume while the old one is online).
    ghost: Session | None = None
    leave_reason: str = LEFT_DISCONNECTED
    # The leave, decided once: a retry submits the very same event, so one
    # whose first commit outcome was unknown cannot be stored twice.
    leave_event: NewEvent | None = None
    leave_attempts: int = 0
    # Resolved when the session is CLOSED (a login of the same name waits on it).
    closed: asyncio.Future[None] | None = None
    # The keys of the rooms it is a member of: taken from the live view when
    # its login is delivered (the view is at the login's position then), and
    # kept by its own joins and leaves as they are submitted (a user's
    # membership changes only through its session). None until delivered.
    rooms: set[str] | None = None
    delivered: asyncio.Event = field(default_factory=asyncio.Event)
    # Its read markers (scope -> position), read once when first needed.
    markers: dict[str, int] | None = None
    # Its last conversations summary: (when, the summary's future).
    summary: tuple[float, asyncio.Future[dict[str, Any]]] | None = None

    def next_version(self) -> int:
        """The stream version of this session's next event (the only place
        versions are counted up)."""
        self.version += 1
        return self.version

    @property
    def holds_name(self) -> bool:
        return self.state is not State.CLOSED


@dataclass(frozen=True, slots=True)
class Leave:
    """Append the session's leave (it is LEAVING)."""

    session: Session
    reason: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Disconnect a socket (its session was taken over or superseded)."""

    sid: str


Effect = Leave | Drop


@dataclass(eq=False)
class Socket:
    sid: str
    session: Session | None = None
    gone: bool = False


class Sessions:
    """The registry of this process's sockets and sessions, and their transitions."""

    def __init__(self, instance: str | None = None) -> None:
        # Prefix of every session id this process issues: unique per process
        # run without configuration, so a session in the log can be told to
        # be ours (the reconciler relies on it).
        self.instance = instance or uuid.uuid4().hex[:12]
        self._sockets: dict[str, Socket] = {}
        self._holders: dict[str, Session] = {}  # name -> the session holding it
        self._by_id: dict[str, Session] = {}

    # -- queries -------------------------------------------------------------
    def socket(self, sid: str) -> Socket | None:
        return self._sockets.get(sid)

    def holder(self, name: str) -> Session | None:
        return self._holders.get(name)

    def by_id(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def active(self, sid: str) -> Session:
        """The socket's session if it may act (chat, list, page history)."""
        sock = self._sockets.get(sid)
        session = sock.session if sock is not None else None
        if session is None or session.state is not State.ACTIVE:
            raise NotLoggedIn("log in first")
        return session

    def live(self) -> list[Session]:
        """Sessions holding a name (every state but CLOSED)."""
        return list(self._holders.values())

    def is_ours(self, session_id: str) -> bool:
        return session_id.startswith(self.instance + "-")

    def __len__(self) -> int:
        return len(self._sockets)

    @staticmethod
    def closed(session: Session) -> asyncio.Future[None]:
        """Resolved once ``session`` is CLOSED."""
        if session.closed is None:
            session.closed = asyncio.get_running_loop().create_future()
            if session.state is State.CLOSED:
                session.closed.set_result(None)
        return session.closed

    # -- sockets -------------------------------------------------------------
    def connect(self, sid: str) -> None:
        self._sockets[sid] = Socket(sid)

    def disconnect(self, sid: str) -> list[Effect]:
        """The socket went away: whatever its session is doing, it ends."""
        sock = self._sockets.pop(sid, None)
        if sock is None:
            return []
        sock.gone = True
        session = sock.session
        if session is None:
            return []
        session.socket_gone = True
        if session.state is State.ACTIVE:
            return [self._begin_leave(session, LEFT_DISCONNECTED)]
        # PENDING: its commit leaves at once; YIELDING: the takeover closes it
        # (or, if that fails, it leaves then); LEAVING/LEAVE_FAILED: under way.
        return []

    def check_can_claim(self, sid: str) -> Socket:
        """The socket, if it is still here and holds no session (re-checked
        after every await of a login or resume)."""
        sock = self._sockets.get(sid)
        if sock is None or sock.gone:
            raise NotLoggedIn("this socket is not connected")
        if sock.session is not None:
            raise AlreadyLoggedIn("this socket is already logged in")
        return sock

    # -- claims --------------------------------------------------------------
    def claim(self, sid: str, name: str, *, takeover: Session | None = None) -> Session:
        """A new PENDING session of ``sid`` holding ``name``.

        With ``takeover``, the name's current holder (ACTIVE) yields to it:
        it takes no more chats, and is retired when this one commits.
        """
        sock = self.check_can_claim(sid)
        holder = self._holders.get(name)
        if takeover is None:
            if holder is not None:
                raise NameTaken(f"{name} is already online")
        else:
            if holder is not takeover or takeover.state is not State.ACTIVE:
                raise ResumeRefused("name_busy", f"{name} is logging in elsewhere right now")
            takeover.state = State.YIELDING
        session = Session(sid=sid, name=name, id=f"{self.instance}-{uuid.uuid4().hex}", ghost=takeover)
        self._holders[name] = session
        self._by_id[session.id] = session
        sock.session = session
        return session

    def login_committed(self, session: Session) -> list[Effect]:
        self._expect(session, "login_committed")
        session.state = State.ACTIVE
        effects: list[Effect] = []
        ghost = session.ghost
        session.ghost = None
        if ghost is not None and ghost.state is State.YIELDING:
            # The resume's own events recorded the ghost's leave.
            self._close(ghost)
            old = self._sockets.get(ghost.sid)
            if old is not None and old.session is ghost:
                old.session = None
            if not ghost.socket_gone:
                effects.append(Drop(ghost.sid))
        if session.socket_gone:
            effects.append(self._begin_leave(session, LEFT_DISCONNECTED))
        return effects

    def login_failed(self, session: Session) -> list[Effect]:
        """The login (or resume) was not stored: the name goes back to whoever
        held it before (a ghost that was yielding) or becomes free."""
        self._expect(session, "login_failed")
        ghost = session.ghost
        session.ghost = None
        self._close(session)
        sock = self._sockets.get(session.sid)
        if sock is not None and sock.session is session:
            sock.session = None
        if ghost is not None and ghost.state is State.YIELDING:
            ghost.state = State.ACTIVE
            self._holders[ghost.name] = ghost
            if ghost.socket_gone:
                return [self._begin_leave(ghost, LEFT_DISCONNECTED)]
        return []

    # -- leaves --------------------------------------------------------------
    def leave(self, session: Session, reason: str) -> Leave:
        """End an ACTIVE session (server shutdown, reconciliation)."""
        self._expect(session, "leave")
        return self._begin_leave(session, reason)

    def leave_committed(self, session: Session) -> None:
        self._expect(session, "leave_committed")
        self._close(session)

    def leave_failed(self, session: Session) -> None:
        """Keep the name held: the log still shows it online."""
        self._expect(session, "leave_failed")
        session.state = State.LEAVE_FAILED
        session.leave_attempts += 1

    def retry_leave(self, session: Session) -> Leave:
        self._expect(session, "retry_leave")
        session.state = State.LEAVING
        return Leave(session, session.leave_reason)

    def superseded(self, session: Session) -> list[Effect]:
        """The user's stream moved under this session (another process took
        it over, or closed it): it is over, with no leave of its own."""
        if session.state is State.CLOSED:
            return []
        self._expect(session, "superseded")
        self._close(session)
        sock = self._sockets.get(session.sid)
        if sock is not None and sock.session is session:
            sock.session = None
            return [Drop(session.sid)]
        return []

    # -- internals -----------------------------------------------------------
    def _begin_leave(self, session: Session, reason: str) -> Leave:
        session.state = State.LEAVING
        session.leave_reason = reason
        return Leave(session, reason)

    def _close(self, session: Session) -> None:
        session.state = State.CLOSED
        self._by_id.pop(session.id, None)
        # A retired ghost no longer holds its name (its successor does).
        if self._holders.get(session.name) is session:
            del self._holders[session.name]
        if session.closed is not None and not session.closed.done():
            session.closed.set_result(None)

    @staticmethod
    def _expect(session: Session, transition: str) -> None:
        if session.state not in _ALLOWED[transition]:
            raise LifecycleError(f"{transition} of a {session.state.value} session ({session.name})")
