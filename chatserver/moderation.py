"""Moderation (accounts mode): an admin kicks a user or bans a name.

Both are events in the log, on the target's ``account-<name>`` stream, so
chat-replay shows who did what and when. A ban is also written to the
accounts table (what the handshake checks). Ending the target's sockets is
not done here: every process applies the event from the log and drops its
own sockets of that name (see SocketHandlers.moderated), so a kick reaches
a user served by another process too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from . import domain
from .accounts import Accounts
from .events import DomainEvent, NewEvent, StoredEvent, UserBanned, UserKicked, account_stream
from .store import ConcurrencyError, EventStore

APPEND_ATTEMPTS = 3
BAN_MAX_SECONDS = 10 * 365 * 24 * 3600


class Moderation:
    def __init__(
        self, accounts: Accounts, store: EventStore, submit: Callable[[list[NewEvent]], Awaitable[list[StoredEvent]]]
    ) -> None:
        self.accounts = accounts
        self.store = store
        self.submit = submit

    async def _admin(self, caller: str | None) -> None:
        account = await self.accounts.get(caller) if caller else None
        if account is None or not account.is_admin:
            raise domain.NotAllowed("only an admin may do this")

    async def _target(self, request: Any) -> str:
        if not isinstance(request, dict):
            raise domain.BadPayload("takes one object {name}")
        try:
            name = domain.check_name(request.get("name"))
        except domain.NameBad as exc:
            raise domain.BadPayload(exc.message) from None
        if await self.accounts.get(name) is None:
            raise domain.NoSuchUser(f"there is no account {name}")
        return name

    async def _append(self, name: str, event: DomainEvent) -> StoredEvent:
        stream = account_stream(name)
        command = uuid.uuid4().hex
        for _attempt in range(APPEND_ATTEMPTS):
            head = await self.store.stream_head(stream)
            try:
                stored = await self.submit([NewEvent(stream, head.version + 1, event, command)])
            except ConcurrencyError:
                continue  # another moderation of the same name landed first
            return stored[0]
        raise domain.ServerFailed("the account changed meanwhile; try again")

    async def kick(self, caller: str | None, request: Any) -> StoredEvent:
        await self._admin(caller)
        name = await self._target(request)
        assert caller is not None
        return await self._append(name, UserKicked(name, caller))

    async def ban(self, caller: str | None, request: Any) -> StoredEvent:
        await self._admin(caller)
        name = await self._target(request)
        seconds = request.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= BAN_MAX_SECONDS:
            raise domain.BadPayload(f"seconds must be an integer from 1 to {BAN_MAX_SECONDS}")
        until = time.time() + seconds
        # The table first: from the moment the event can be seen, the
        # handshake of the banned name is refused.
        await self.accounts.ban(name, until)
        assert caller is not None
        iso = datetime.fromtimestamp(until, UTC).isoformat().replace("+00:00", "Z")
        return await self._append(name, UserBanned(name, caller, seconds, iso))
