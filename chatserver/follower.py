"""Following the shared log: what other processes appended, handed to delivery.

With several processes on one PostgreSQL log, every process delivers every
event to its own sockets, from the log, in position order. The follower reads
the log after what delivery has applied and hands it over as ``Followed``
items: when the log signal (``logsignal``) says the log grew past that, when
delivery finds a gap before one of its own batches, and on a short timer in
case a signal was lost. Reading happens here, never in the dispatcher.

While this process's own append is on its way, a signal waits for it: the
append reads what others appended before it in its transaction, under the
log's lock (``EventWriter``'s ``read_preceding``), and delivery sends those
events and the append's own in one write per socket. Only what the append
did not cover is read here then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .delivery import Delivery
from .events import StoredEvent
from .metrics import STATS
from .store import EventStore

log = logging.getLogger(__name__)

FOLLOW_PAGE = 1000
RETRY_DELAY = 1.0  # seconds before reading again after a failed read
# Longest a signal waits for this process's own append in progress (one that
# is slow, e.g. in a database outage, must not hold other processes' events).
WAIT_FOR_OWN_APPEND = 0.05


class LogFollower:
    def __init__(
        self,
        store: EventStore,
        delivery: Delivery,
        *,
        interval: float | None,
        own_id: Callable[[], str] = lambda: "",
        writer_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.own_id = own_id
        self.writer_busy = writer_busy
        # A cheaper way to read, when there is one (the log signal's own
        # connection); None from it means "not now": read through the store.
        self.fast_read: Callable[[int, int], Awaitable[list[StoredEvent] | None]] | None = None
        self.store = store
        self.delivery = delivery
        self.interval = interval  # None: read only when asked
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._signalled = 0  # the highest head another process signalled
        # A signal waiting for this process's append in progress, and the
        # timer that bounds the wait.
        self._deferred: asyncio.TimerHandle | None = None
        delivery.want_follow = self.poke

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-follower")

    async def stop(self) -> None:
        self._cancel_deferred()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Read now (delivery found a gap, or waits for a position)."""
        self._read_now()

    def signalled(self, head: int, sender: str) -> None:
        """The log grew to ``head`` (0: unknown, look anyway). A process's
        own commits reach its delivery without a read: their signal is
        skipped (a gap before one of them asks for a read anyway). While an
        append of this process is on its way, the signal waits for it (at
        most ``WAIT_FOR_OWN_APPEND``)."""
        if sender and sender == self.own_id():
            return
        if head == 0:
            self._read_now()
        elif head > self.delivery.received:
            self._signalled = max(self._signalled, head)
            if self._deferred is None and not self._wake.is_set() and self.writer_busy():
                self._deferred = asyncio.get_running_loop().call_later(WAIT_FOR_OWN_APPEND, self._read_now)
            elif self._deferred is None:
                self._wake.set()

    def own_append_done(self) -> None:
        """This process's append (committed or not) is over: read what it
        did not bring of what was signalled meanwhile."""
        if self._deferred is None:
            return
        if self.delivery.received < self._signalled:
            self._read_now()
        else:
            self._cancel_deferred()

    def _read_now(self) -> None:
        self._cancel_deferred()
        self._wake.set()

    def _cancel_deferred(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    async def _read(self, after: int) -> list[StoredEvent]:
        if self.fast_read is not None:
            events = await self.fast_read(after, FOLLOW_PAGE)
            if events is not None:
                return events
        return await self.store.read_all(after=after, limit=FOLLOW_PAGE)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # The poll, in case a signal was lost: a timer, not a task per wait.
            poll = loop.call_later(self.interval, self._wake.set) if self.interval is not None else None
            await self._wake.wait()
            if poll is not None:
                poll.cancel()
            self._wake.clear()
            try:
                events = await self._read(self.delivery.applied)
            except Exception as exc:
                if not self._failing:
                    log.warning("cannot read the shared log (%s); retrying", exc)
                    self._failing = True
                await asyncio.sleep(RETRY_DELAY)
                self._wake.set()
                continue
            if self._failing:
                log.info("reading the shared log again")
                self._failing = False
            STATS.followed("signal", len(events))
            if events:
                self.delivery.followed(events)
                if len(events) == FOLLOW_PAGE:
                    self._wake.set()
