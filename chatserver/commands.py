"""Commands: what a socket asks for, decided and appended.

Each command validates its input (``domain``), does its awaits (reads of the
store), re-checks the socket after every one of them (``lifecycle``), then
submits the events ``domain`` decided to the single writer. Nothing is
emitted here: replies and broadcasts go out from ``delivery`` once committed.

Leaves are not awaited by anyone: a leave is submitted and its outcome fed
back to the lifecycle by a callback; one that fails is submitted again (the
same event, so a leave whose commit outcome was unknown cannot be stored
twice) with a growing delay until it is stored.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from . import domain, projections, protocol
from .config import Settings
from .delivery import Delivery
from .events import (
    LEFT_SESSION_LOST,
    LOBBY,
    LOBBY_SCOPE,
    MessagePosted,
    NewEvent,
    PrivateMessageSent,
    StoredEvent,
    UserJoined,
    UserLeft,
    UserLoggedIn,
    private_scope,
    room_key,
    room_scope,
    room_stream,
    user_stream,
)
from .rooms import Room, conversations_table, read_markers_table
from .lifecycle import Drop, Effect, Leave, Session, Sessions, State
from .store import ConcurrencyError, EventStore, StreamHead, UnencodableEvent
from .uploads import Uploads
from .writer import EventWriter, WriterClosed

log = logging.getLogger(__name__)

RESUME_ATTEMPTS = 3
EMPTY_STREAM = StreamHead(0, None)
LEAVE_WAIT = 5.0  # seconds a login waits for the previous session of its name to close
LEAVE_RETRY_FIRST = 0.2  # seconds before retrying a failed leave; doubles up to
LEAVE_RETRY_MAX = 10.0


_PRESENCE_TYPES = frozenset({UserLoggedIn.type, UserJoined.type, UserLeft.type})
# What counts as unread: what others wrote.
_UNREAD_TYPES = (MessagePosted.type, PrivateMessageSent.type)
ROOM_LIST_MAX = 100
SUMMARY_REUSE = 1.0  # seconds
DELIVERY_WAIT = 10.0  # seconds a room request waits for its session's welcome
ROOM_FOLLOW_WAIT = 5.0  # seconds a request waits to see a room the log holds


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_command_id() -> str:
    # Server-issued ids never contain "/": a client's chat id always does.
    return uuid.uuid4().hex


class Commands:
    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        writer: EventWriter,
        sessions: Sessions,
        delivery: Delivery,
    ) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.sessions = sessions
        self.delivery = delivery
        # User stream heads as this process knows them (see _store_login).
        self.heads: dict[str, StreamHead] = {}
        # Reconciliation: (name, session) pairs seen orphaned once.
        self._suspects: set[tuple[str, str]] = set()
        self._leave_failures = 0
        # Rooms being created and joins being stored here, not yet delivered:
        # counted against the limits as if they were.
        self._creating: set[str] = set()
        self._joining: dict[str, int] = {}
        # Summaries being read (shared by the requests that wait for them).
        self._summaries: set[asyncio.Future[dict[str, Any]]] = set()
        # Set while this process may not serve (its node lease lapsed).
        self.fenced = False
        # Reaps the process holding a session if its lease expired (several
        # processes on one log); True if it did.
        self.reap_owner: Callable[[str], Awaitable[bool]] | None = None
        # Images and files (set by the app when it has a data folder).
        self.uploads: Uploads | None = None

    # -- the log as this process knows it ----------------------------------------
    def note_heads(self, stored: list[StoredEvent]) -> None:
        for s in stored:
            # Only a name that is offline skips the read at login, and its
            # head is its leave; what a user does while online (chats, rooms,
            # private messages) needs no note.
            if s.type not in _PRESENCE_TYPES:
                continue
            known = self.heads.get(s.stream)
            if known is None or s.version > known.version:
                self.heads[s.stream] = StreamHead(s.version, s.type)

    # -- effects of lifecycle transitions ------------------------------------------
    def carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Leave(session, reason):
                    self._submit_leave(session, reason)
                case Drop(sid):
                    self.delivery.drop(sid)

    def _submit_leave(self, session: Session, reason: str) -> None:
        if session.leave_event is None:
            session.leave_event = domain.decide_leave(
                session.name, session.next_version(), reason, command_id=new_command_id()
            )
        try:
            future = self.writer.submit([session.leave_event])
        except WriterClosed:
            # Shutting down: the next start closes it ("server restart").
            self.sessions.leave_failed(session)
            return
        future.add_done_callback(partial(self._leave_done, session))

    def _leave_done(self, session: Session, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is None:
            self.sessions.leave_committed(session)
            if self._leave_failures:
                log.info("stored the leave of %s after %d failed attempt(s)", session.name, session.leave_attempts)
                self._leave_failures = 0
            return
        if isinstance(exc, ConcurrencyError):
            # Its stream moved on: another process took it over or closed it,
            # or an earlier attempt of this very leave was stored after all.
            self.carry_out(self.sessions.superseded(session))
            return
        self.sessions.leave_failed(session)
        self._leave_failures += 1
        if self._leave_failures == 1:
            log.warning("could not store the leave of %s (%s); retrying until it is stored", session.name, exc)
        delay = min(LEAVE_RETRY_MAX, LEAVE_RETRY_FIRST * 2 ** (session.leave_attempts - 1))
        asyncio.get_running_loop().call_later(delay, self._retry_leave, session)

    def _retry_leave(self, session: Session) -> None:
        if session.state is State.LEAVE_FAILED:
            self.carry_out([self.sessions.retry_leave(session)])

    # -- commands ------------------------------------------------------------------
    def connect(self, sid: str) -> None:
        self.sessions.connect(sid)

    def disconnect(self, sid: str) -> None:
        self.delivery.forget(sid)
        self.carry_out(self.sessions.disconnect(sid))

    def _check_serving(self) -> None:
        if self.fenced:
            raise domain.ServerFailed("this server is not serving right now; connect again")

    async def login(self, sid: str, raw_name: object) -> StoredEvent:
        name = domain.check_name(raw_name)
        self._check_serving()
        await self._wait_name_free(sid, name)
        session = self.sessions.claim(sid, name)
        try:
            return await self._store_login(session)
        except BaseException:
            self.carry_out(self.sessions.login_failed(session))
            raise

    async def _store_login(self, session: Session) -> StoredEvent:
        stream = user_stream(session.name)
        # A name this process knows to be offline needs no read; anything
        # else (online, or the log moved under us) is read from the store.
        known = self.heads.get(stream, EMPTY_STREAM)
        head = known if not known.online else await self._read_online_head(session)
        try:
            return await self._submit_login(session, self._decide_login(session, head))
        except ConcurrencyError:
            if head is not known:
                raise domain.NameTaken(f"{session.name} is already online") from None
        head = await self._read_online_head(session)
        try:
            return await self._submit_login(session, self._decide_login(session, head))
        except ConcurrencyError:
            raise domain.NameTaken(f"{session.name} is already online") from None

    async def _read_online_head(self, session: Session) -> StreamHead:
        head = await self._read_head(session)
        if head.online and await self._owner_was_lost(session):
            head = await self._read_head(session)
        return head

    async def _owner_was_lost(self, session: Session) -> bool:
        """The name is online in the log: if the process holding it died
        (its lease expired), close its sessions now rather than refuse."""
        if self.reap_owner is None:
            return False
        user = self.delivery.online.get(session.name)
        if user is None or not await self.reap_owner(user.session):
            return False
        self._still_claiming(session)
        return True

    async def _read_head(self, session: Session) -> StreamHead:
        head = await self.store.stream_head(user_stream(session.name))
        self._still_claiming(session)
        return head

    @staticmethod
    def _still_claiming(session: Session) -> None:
        """After an await: the socket may have gone in the meantime."""
        if session.socket_gone or session.state is not State.PENDING:
            raise domain.NotLoggedIn("the socket went away while logging in")

    def _decide_login(self, session: Session, head: StreamHead, *, resume: bool = False) -> list[NewEvent]:
        decide = domain.decide_resume if resume else domain.decide_login
        return decide(
            session.name,
            head,
            session=session.id,
            node=self.settings.node_name,
            resume_hash=hash_token(session.token),
            command_id=new_command_id(),
        )

    async def _submit_login(self, session: Session, new: list[NewEvent]) -> StoredEvent:
        session.version = new[-1].version
        try:
            future = self.writer.submit(new)
        except UnencodableEvent as exc:
            raise domain.NameBad(f"this name cannot be stored: {exc}") from None
        stored = await future
        # Committed: the commit callback made the session ACTIVE (or, if its
        # socket went meanwhile, LEAVING with its leave submitted).
        return next(s for s in stored if isinstance(s.event, UserLoggedIn))

    async def _wait_name_free(self, sid: str, name: str) -> None:
        """Wait out a leave of ``name`` that is being stored (a quick
        reconnect), re-checking the socket afterwards."""
        self.sessions.check_can_claim(sid)
        holder = self.sessions.holder(name)
        if holder is None or holder.state not in (State.LEAVING, State.LEAVE_FAILED):
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.sessions.closed(holder)), LEAVE_WAIT)
        except TimeoutError:
            raise domain.ServerFailed(f"the previous session of {name} is still closing; try again") from None
        self.sessions.check_can_claim(sid)

    async def resume(
        self, sid: str, token: object, last_position: object, *, account: str | None = None
    ) -> StoredEvent:
        """Come back under the name a resume token was issued for.

        The socket then receives every visible event after ``last_position``,
        in order, and continues live. The session the token was issued to, if
        this process still holds it (a half-open socket), is taken over.
        Every refusal is decided before any session is touched.
        """
        token = domain.check_resume_token(token)
        token_hash = hash_token(token)
        grant = await projections.find_grant(self.store.engine, token_hash)
        if grant is None:
            raise domain.ResumeRefused("invalid_token", "the resume token is unknown or was superseded by a newer login")
        if account is not None and grant.name != account:
            # Accounts mode: a resume token is good only for its own account.
            raise domain.ResumeRefused("invalid_token", "the resume token belongs to another account")
        if datetime.now(UTC) > grant.issued_at + timedelta(seconds=self.settings.resume_ttl_seconds):
            raise domain.ResumeRefused("expired_token", "the resume token has expired")
        head_position = await self.store.head()
        after = domain.check_position(last_position, head_position)
        if head_position - after > self.settings.resume_max_gap:
            raise domain.ResumeRefused(
                "resume_gap_too_large",
                f"more than {self.settings.resume_max_gap} events were missed; log in again to get the history",
            )
        name = grant.name
        await self._wait_name_free(sid, name)
        holder = self.sessions.holder(name)
        if holder is not None and holder.id != grant.session:
            # A newer login holds the name here: the token is superseded.
            raise domain.ResumeRefused("invalid_token", "the resume token was superseded by a newer login")
        session = self.sessions.claim(sid, name, takeover=holder)
        session.resume_after = after
        try:
            return await self._store_resume(session, token_hash, grant.session)
        except BaseException:
            self.carry_out(self.sessions.login_failed(session))
            raise

    async def _store_resume(self, session: Session, token_hash: str, granted_to: str) -> StoredEvent:
        for _attempt in range(RESUME_ATTEMPTS):
            head = await self._read_head(session)
            # Looked at again after the head: a login that landed before the
            # head was read has replaced the grant; one that lands after makes
            # the append below fail on its version.
            current = await projections.find_grant(self.store.engine, token_hash)
            self._still_claiming(session)
            if current is None or current.session != granted_to:
                raise domain.ResumeRefused("invalid_token", "the resume token was superseded by a newer login")
            new = self._decide_login(session, head, resume=True)
            try:
                return await self._submit_login(session, new)
            except ConcurrencyError:
                continue  # the old session's last appends landed in between: look again
        raise domain.ResumeRefused("name_busy", f"{session.name} changed while resuming; log in again")

    async def chat(
        self, sid: str, raw_message: object, raw_id: object = None, options: dict[str, object] | None = None
    ) -> StoredEvent:
        session = self.sessions.active(sid)
        options = options or {}
        ids = domain.check_attachment_ids(options.get("attachments"), max_files=self.settings.files_per_message)
        message = domain.check_chat_text(raw_message, max_chars=self.settings.max_message_chars, with_files=bool(ids))
        client_id = domain.check_client_id(raw_id)
        target = domain.check_target(options, room_name_max=self.settings.room_name_max)
        if target.room is not None or target.to is not None:
            # Its membership is known once its login is delivered (at once,
            # but for a chat racing its own welcome).
            await self._delivered(session)
        command_id = f"{session.name}/{client_id}" if client_id is not None else new_command_id()
        attachments: tuple[dict[str, Any], ...] = ()
        if ids:
            if self.uploads is None:
                raise domain.BadAttachment("this server takes no files")
            attachments = await self.uploads.for_posting(session.name, ids, command_id)
            self._still_active(session)
        # No await from here to submit: the order of a socket's chats is the
        # order of their submission, whatever task runs each handler.
        if target.room is not None:
            room = self._member_room(session, target.room)
            new = domain.decide_chat(
                session.name,
                session.version + 1,
                message,
                room=room.name,
                command_id=command_id,
                attachments=attachments,
            )
        elif target.to is not None:
            new = domain.decide_private_message(
                session.name,
                session.version + 1,
                target.to,
                message,
                known=user_stream(target.to) in self.heads,
                command_id=command_id,
                attachments=attachments,
            )
        else:
            new = domain.decide_chat(
                session.name, session.version + 1, message, command_id=command_id, attachments=attachments
            )
        if not ids:
            session.next_version()
            return (await self._submit(session, [new], "chat"))[0]
        assert self.uploads is not None
        self.uploads.hold(ids, command_id)
        session.next_version()
        try:
            return (await self._submit(session, [new], "chat"))[0]
        finally:
            self.uploads.release(ids)

    async def upload_token(self, sid: str) -> dict[str, Any]:
        """A token for the HTTP file routes, good while this session lasts."""
        session = await self._room_session(sid)
        if self.uploads is None:
            raise domain.ServerFailed("this server takes no files")
        token = await self.uploads.issue_token(session.name, session.id)
        self._still_active(session)
        return token

    async def _submit(self, session: Session, new: list[NewEvent], what: str) -> list[StoredEvent]:
        """Submit a session's events (versions already counted) and wait for
        the commit; a version conflict means the session was taken over."""
        try:
            future = self.writer.submit(new)
        except UnencodableEvent as exc:
            raise domain.BadPayload(f"this {what} cannot be stored: {exc}") from None
        try:
            return await future
        except ConcurrencyError:
            log.warning("the stream of %s moved under its session; closing it here", session.name)
            self.carry_out(self.sessions.superseded(session))
            raise domain.NotStored(f"the {what} was not stored: this session was taken over") from None
        except Exception:
            raise domain.NotStored(f"the {what} was not stored") from None

    async def _delivered(self, session: Session) -> None:
        if not session.delivered.is_set():
            try:
                await asyncio.wait_for(session.delivered.wait(), DELIVERY_WAIT)
            except TimeoutError:
                raise domain.ServerFailed("the login is still being delivered; try again") from None
            self._still_active(session)

    async def _room_session(self, sid: str) -> Session:
        session = self.sessions.active(sid)
        await self._delivered(session)
        return session

    def _room(self, raw: object) -> tuple[str, Room | None]:
        """A room a request names: its key, and the room (None: the lobby)."""
        name = domain.check_room_name(raw, max_chars=self.settings.room_name_max)
        key = room_key(name)
        if key == LOBBY:
            return key, None
        room = self.delivery.rooms.rooms.get(key)
        if room is None:
            raise domain.NoSuchRoom(f"there is no room named {name}")
        return key, room

    async def _find_room(self, raw: object) -> tuple[str, Room | None]:
        """``_room``, for a room this process may not have seen yet: created
        by another process moments ago (a user there told a user here to
        join). The log has the last word: if it holds the room, wait for
        this process to follow it that far."""
        try:
            return self._room(raw)
        except domain.NoSuchRoom:
            name = domain.check_room_name(raw, max_chars=self.settings.room_name_max)
            created = await self.store.read_all(streams=[room_stream(name)], limit=1)
            if not created or not await self.delivery.applied_through(created[0].position, ROOM_FOLLOW_WAIT):
                raise
            return self._room(raw)

    def _member_room(self, session: Session, raw: str) -> Room:
        key, room = self._room(raw)
        assert room is not None  # the lobby is not a target
        if key not in (session.rooms or ()):
            raise domain.NotAMember(f"you are not a member of {room.name}")
        return room

    # -- rooms --------------------------------------------------------------------
    async def create_room(self, sid: str, request: object) -> StoredEvent:
        session = await self._room_session(sid)
        req = domain.check_request(request, protocol.CREATE_ROOM)
        name = domain.check_room_name(req.get("room"), max_chars=self.settings.room_name_max)
        topic = domain.check_topic(req.get("topic"), max_chars=self.settings.room_topic_max)
        key = room_key(name)
        view = self.delivery.rooms
        # Another process may have created it (the append would tell), or
        # this one, not yet delivered: look at the log.
        exists = key in view.rooms or (await self.store.stream_head(room_stream(name))).version > 0
        self._still_active(session)
        rooms = session.rooms if session.rooms is not None else set()
        new = domain.decide_create_room(
            session.name,
            session.version + 1,
            name,
            topic,
            exists=exists or key in self._creating,
            rooms=len(view.rooms) + len(self._creating),
            member_of=len(rooms),
            rooms_max=self.settings.rooms_max,
            rooms_per_user=self.settings.rooms_per_user,
            command_id=new_command_id(),
        )
        session.next_version()
        rooms.add(key)
        session.summary = None
        self._creating.add(key)
        try:
            future = self.writer.submit(new)
            try:
                stored = await future
            except ConcurrencyError:
                if (await self.store.stream_head(room_stream(name))).version > 0:
                    raise domain.RoomExists(f"a room named {name} exists already") from None
                self.carry_out(self.sessions.superseded(session))
                raise domain.NotStored("the room was not created: this session was taken over") from None
            except Exception:
                raise domain.NotStored("the room was not created") from None
        except BaseException:
            rooms.discard(key)
            raise
        finally:
            self._creating.discard(key)
        return stored[0]

    async def join_room(self, sid: str, request: object) -> tuple[str, StoredEvent | None]:
        """The room's name, and its join (None: a member already, the lobby
        included)."""
        session = await self._room_session(sid)
        req = domain.check_request(request, protocol.JOIN_ROOM)
        key, room = await self._find_room(req.get("room"))
        self._still_active(session)
        rooms = session.rooms if session.rooms is not None else set()
        if room is None or key in rooms:
            return (room.name if room is not None else LOBBY), None
        new = domain.decide_join_room(
            session.name,
            session.version + 1,
            room.name,
            members=len(room.members) + self._joining.get(key, 0),
            member_of=len(rooms),
            members_max=self.settings.room_members_max,
            rooms_per_user=self.settings.rooms_per_user,
            command_id=new_command_id(),
        )
        session.next_version()
        rooms.add(key)
        session.summary = None
        self._joining[key] = self._joining.get(key, 0) + 1
        try:
            return room.name, (await self._submit(session, [new], "join"))[0]
        except BaseException:
            rooms.discard(key)
            raise
        finally:
            self._joining[key] -= 1
            if not self._joining[key]:
                del self._joining[key]

    async def leave_room(self, sid: str, request: object) -> StoredEvent:
        session = await self._room_session(sid)
        req = domain.check_request(request, protocol.LEAVE_ROOM)
        key, room = self._room(req.get("room"))
        if room is None:
            raise domain.CannotLeaveLobby("everyone is in the lobby; it cannot be left")
        rooms = session.rooms if session.rooms is not None else set()
        if key not in rooms:
            raise domain.NotAMember(f"you are not a member of {room.name}")
        new = domain.decide_leave_room(session.name, session.next_version(), room.name, command_id=new_command_id())
        rooms.discard(key)
        session.summary = None
        try:
            return (await self._submit(session, [new], "leave"))[0]
        except BaseException:
            rooms.add(key)
            raise

    def list_rooms(self, sid: str, request: object) -> dict[str, Any]:
        """A page of every room, by casefolded name: ``{after, limit}``."""
        session = self.sessions.active(sid)
        req = domain.check_request({} if request is None else request, protocol.LIST_ROOMS)
        after = req.get("after")
        if after is not None and (not isinstance(after, str) or len(after) > 8 * self.settings.room_name_max):
            raise domain.BadPayload("after must be a room name")
        limit = req.get("limit", ROOM_LIST_MAX)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise domain.BadPayload(f"limit must be an integer from 1 to {ROOM_LIST_MAX}")
        limit = min(limit, ROOM_LIST_MAX)
        mine = session.rooms or set()
        out: list[dict[str, Any]] = []
        # The lobby is listed in its place among the rooms, within the limit.
        keys = self.delivery.rooms.sorted_keys(with_lobby=True)
        index = bisect.bisect_right(keys, room_key(after)) if after is not None else 0
        for key in keys[index : index + limit]:
            if key == LOBBY:
                out.append(self._lobby_entry())
                continue
            out.append({**self._room_entry(self.delivery.rooms.rooms[key]), "member": key in mine})
        return {"rooms": out, "more": index + limit < len(keys)}

    def _room_entry(self, room: Room) -> dict[str, Any]:
        online = self.delivery.online
        return {
            "room": room.name,
            "topic": room.topic,
            "members": len(room.members),
            "online": sum(1 for m in room.members if m in online),
        }

    def _lobby_entry(self) -> dict[str, Any]:
        online = len(self.delivery.online)
        return {"room": LOBBY, "topic": "", "members": max(len(self.heads), online), "online": online, "member": True}

    def room_members(self, sid: str, request: object) -> dict[str, Any]:
        """Members of a room and who of them is online; the lobby's members
        are everyone who ever logged in, so it lists those online."""
        self.sessions.active(sid)
        req = domain.check_request(request, protocol.ROOM_MEMBERS)
        _key, room = self._room(req.get("room"))
        online = self.delivery.online
        if room is None:
            return {"room": LOBBY, "members": [{"name": n, "online": True} for n in online.names()]}
        members = sorted(room.members, key=room.members.__getitem__)
        return {"room": room.name, "members": [{"name": m, "online": m in online} for m in members]}

    # -- conversations and read markers ---------------------------------------------
    async def _markers(self, session: Session) -> dict[str, int]:
        if session.markers is None and session.name not in self.delivery.rooms.readers:
            session.markers = {}  # never marked anything: nothing to read
        if session.markers is None:
            t = read_markers_table
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(sa.select(t.c.scope, t.c.position).where(t.c.name == session.name))).all()
            if session.markers is None:
                session.markers = {scope: position for scope, position in rows}
        return session.markers

    async def conversations(self, sid: str) -> dict[str, Any]:
        session = await self._room_session(sid)
        return await self._shared_summary(session)

    async def _shared_summary(self, session: Session) -> dict[str, Any]:
        """A summary costs a couple of indexed reads per conversation: a
        socket asking again within ``SUMMARY_REUSE`` seconds (or while one is
        being read) gets the same one. It is still right: its counts are as
        of its ``position``, and the socket has had every event since."""
        loop = asyncio.get_running_loop()
        if session.summary is not None:
            at, future = session.summary
            if not future.done() or (loop.time() - at < SUMMARY_REUSE and future.exception() is None):
                return await asyncio.shield(future)
        future = asyncio.ensure_future(self._summary(session))
        self._summaries.add(future)
        future.add_done_callback(self._summaries.discard)
        session.summary = (loop.time(), future)
        return await asyncio.shield(future)

    async def push_conversations(self, session: Session) -> None:
        """After a login or resume is delivered: the user's rooms and private
        conversations with their unread counts."""
        try:
            summary = await self._shared_summary(session)
        except Exception as exc:
            log.warning("could not build the conversations of %s: %s", session.name, exc)
            return
        if not session.socket_gone and session.state is State.ACTIVE:
            self.delivery.reply(session.sid, protocol.CONVERSATIONS, lambda: summary)

    async def _summary(self, session: Session) -> dict[str, Any]:
        through = self.delivery.dispatched
        name = session.name
        view = self.delivery.rooms
        online = self.delivery.online
        markers = await self._markers(session)
        peers: list[tuple[str, int]] = []
        if name in view.talkers:
            t = conversations_table
            async with self.store.engine.connect() as conn:
                peers = [
                    (r.peer, r.last_position)
                    for r in await conn.execute(
                        sa.select(t.c.peer, t.c.last_position)
                        .where(t.c.name == name)
                        .order_by(t.c.last_position.desc())
                        .limit(self.settings.conversations_max)
                    )
                ]
        # What each conversation was read up to: a room, from the member's
        # join unless marked; the lobby, from this login; a peer, from the start.
        read: dict[str, int] = {}
        entries: list[tuple[str, dict[str, Any]]] = []
        lobby = self._lobby_entry()
        del lobby["member"]
        if LOBBY_SCOPE in markers:
            read[LOBBY_SCOPE] = markers[LOBBY_SCOPE]
        else:
            # Unmarked, the lobby is read up to this login: its history came
            # with the welcome and everything since came live. No look at
            # the log (a seed client's login costs no read).
            recent = self.delivery.recent.last(1, before=through + 1)
            lobby.update(
                unread=0,
                lastPosition=recent[0].position if recent else 0,
                readPosition=session.login_position or through,
                last=protocol.history_item(recent[0]) if recent else None,
            )
        entries.append((LOBBY_SCOPE, lobby))
        rooms = sorted(
            (view.rooms[key] for key in (session.rooms or ()) if key in view.rooms), key=lambda r: room_key(r.name)
        )
        for room in rooms:
            scope = room_scope(room.name)
            read[scope] = markers.get(scope, room.members.get(name, 0))
            entries.append((scope, self._room_entry(room)))
        private: list[tuple[str, dict[str, Any]]] = []
        for peer, _last in peers:
            scope = private_scope(name, peer)
            read[scope] = markers.get(f"peer:{peer}", 0)
            private.append((scope, {"with": peer, "online": peer in online}))
        state = (
            await self.store.conversation_state(
                read, through=through, types=_UNREAD_TYPES, not_stream=user_stream(name), cap=self.settings.unread_cap
            )
            if read
            else {}
        )
        for scope, entry in (*entries, *private):
            if scope not in read:
                continue
            unread, last = state.get(scope, (0, None))
            entry.update(
                unread=unread,
                lastPosition=last.position if last is not None else 0,
                readPosition=read[scope],
                # The newest item, as history gives it: a conversation list
                # can show it, and an offline recipient sees what came.
                last=protocol.history_item(last) if last is not None else None,
            )
        return {
            "position": through,
            "rooms": [entry for _scope, entry in entries],
            "private": [entry for _scope, entry in private],
        }

    async def mark_read(self, sid: str, request: object) -> dict[str, Any]:
        session = await self._room_session(sid)
        req = domain.check_request(request, protocol.MARK_READ)
        if (req.get("room") is None) == (req.get("with") is None):
            raise domain.BadPayload("markRead takes {room, position} or {with, position}")
        position = domain.check_position(req.get("position"), self.delivery.dispatched)
        room_name, peer = "", ""
        if req.get("room") is not None:
            key, room = self._room(req.get("room"))
            if room is not None and key not in (session.rooms or ()):
                raise domain.NotAMember(f"you are not a member of {room.name}")
            room_name = room.name if room is not None else LOBBY
            scope = room_scope(room_name)
        else:
            peer = self._known_user(req.get("with"))
            scope = f"peer:{peer}"
        markers = await self._markers(session)
        self._still_active(session)
        new = domain.decide_read(
            session.name, session.version + 1, position, marked=markers.get(scope, 0), room=room_name, peer=peer
        )
        if new is None:
            return {"position": markers.get(scope, 0)}
        session.next_version()
        await self._submit(session, [new], "read marker")
        markers[scope] = max(markers.get(scope, 0), position)
        session.summary = None  # its read positions changed
        return {"position": position}

    def _known_user(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise domain.BadPayload("with must be a user name")
        try:
            name = domain.check_name(raw)
        except domain.NameBad:
            raise domain.NoSuchUser("there is no user of that name") from None
        if user_stream(name) not in self.heads:
            raise domain.NoSuchUser(f"no user named {name} has ever logged in")
        return name

    @staticmethod
    def _still_active(session: Session) -> None:
        if session.socket_gone or session.state is not State.ACTIVE:
            raise domain.NotLoggedIn("the session ended")

    def online_users(self, sid: str) -> list[str]:
        """Answer now (for an ack) and queue the event reply behind pending emits."""
        self.sessions.active(sid)
        self.delivery.reply(sid, protocol.ONLINE_USERS, self.delivery.online.names)
        return self.delivery.online.names()

    async def history(self, sid: str, request: object) -> dict[str, Any]:
        """A page of older history: ``{before, limit, room | with}`` ->
        ``{items, reachedStart}`` of the lobby, a room the user is a member
        of, or the user's private conversation with another."""
        session = self.sessions.active(sid)
        before, limit = domain.check_page(request, cap=self.settings.history_page_max)
        req = request if isinstance(request, dict) else {}
        scope = LOBBY_SCOPE
        if req.get("room") is not None and req.get("with") is not None:
            raise domain.BadPayload("history takes a room or a user (with), not both")
        if req.get("room") is not None:
            await self._delivered(session)
            key, room = self._room(req.get("room"))
            if room is not None:
                if key not in (session.rooms or ()):
                    raise domain.NotAMember(f"you are not a member of {room.name}")
                scope = room_scope(room.name)
        elif req.get("with") is not None:
            scope = private_scope(session.name, self._known_user(req.get("with")))
        items = await self.store.latest(limit=limit + 1, before=before, scope=scope)
        reached_start = len(items) <= limit
        return protocol.history_payload(items[-limit:], reached_start)

    def reply(self, sid: str, event: str, data: Any = None) -> None:
        self.delivery.reply(sid, event, lambda: data)

    # -- shutdown and reconciliation ------------------------------------------------
    async def stop(self) -> None:
        """Stop the reads in flight before the engine goes."""
        pending = list(self._summaries)
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def close_sessions(self, reason: str, timeout: float) -> None:
        """Record the leave of every logged-in socket (graceful shutdown)."""
        sessions = [s for s in self.sessions.live() if s.state is State.ACTIVE]
        for session in sessions:
            self.carry_out([self.sessions.leave(session, reason)])
        waiting = [self.sessions.closed(s) for s in self.sessions.live() if s.state is not State.ACTIVE]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    async def close_lost(
        self, sessions: list[tuple[str, str]], reason: str, held_by: Callable[[str], Awaitable[str | None]]
    ) -> None:
        """Record the leaves of sessions a dead process (or an earlier run)
        left open; ``held_by(name)`` tells which session the log says holds
        a name."""
        for name, session_id in sessions:
            await self._close_if_still_held(name, session_id, reason, held_by)

    async def _close_if_still_held(
        self, name: str, session_id: str, reason: str, held_by: Callable[[str], Awaitable[str | None]]
    ) -> bool:
        """Append a leave for ``name`` if ``session_id`` still holds it.
        ``held_by`` is asked after the stream head is read: a login that got
        in between is left alone, and one that comes after loses on the
        version."""
        head = await self.store.stream_head(user_stream(name))
        if not head.online or await held_by(name) != session_id:
            return False
        try:
            await self.writer.append([domain.decide_leave(name, head.version + 1, reason, command_id=new_command_id())])
        except ConcurrencyError:
            return False
        return True

    def fence(self) -> None:
        """Stop serving: the sessions here are closed by the process that
        reaps this one's lease, so they end here with no leave of their own."""
        self.fenced = True
        for session in self.sessions.live():
            if session.state is not State.PENDING:
                self.carry_out(self.sessions.superseded(session))

    async def reconcile(self) -> None:
        """Close what the log shows online for this process with no session
        here holding it (a leave lost by a bug or a fault): a session must be
        seen orphaned on two passes in a row, so anything merely in flight is
        never touched."""
        orphans = set()
        for user in self.delivery.online.users():
            if not self.sessions.is_ours(user.session):
                continue
            session = self.sessions.by_id(user.session)
            if session is None or session.state is State.CLOSED:
                orphans.add((user.name, user.session))
        confirmed, self._suspects = orphans & self._suspects, orphans - self._suspects
        for name, session_id in confirmed:
            if self.sessions.holder(name) is not None:
                continue  # a login here is deciding the name's fate
            if await self._close_if_still_held(name, session_id, LEFT_SESSION_LOST, self._live_view_holder):
                log.warning("closed the session of %s: no socket of this process held it", name)

    async def _live_view_holder(self, name: str) -> str | None:
        user = self.delivery.online.get(name)
        return user.session if user is not None else None
