"""Operational metrics, exposed at ``/metrics`` in the Prometheus text format.

Counting is plain integer arithmetic on ``STATS`` (no lock, no label lookup,
no prometheus-client object on the hot path): the writer counts once per
committed batch, the fan-out once per broadcast (recipients and bytes, one
addition each). Everything is turned into Prometheus families only when
``/metrics`` is scraped, and prometheus-client is imported then, not at
start-up. Gauges that describe one app (sockets, sessions, dispatcher lag)
are read from that app's objects at scrape time.

The counters are process-wide, as Prometheus' own client keeps them: one
server process runs one app.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .events import StoredEvent
    from .service import ChatService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Group-commit batch sizes and commit latencies: the shapes an operator asks
# about (is batching working; how long is the fsync).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COMMIT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts per bucket; cumulated only when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        total = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class Stats:
    """Process-wide counters."""

    def __init__(self) -> None:
        self.logins = 0
        self.resumes = 0
        self.refusals: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.deliveries = 0
        self.delivery_bytes = 0
        self.dropped: dict[str, int] = {}
        self.history_requests = 0
        self.replay_requests = 0
        self.database_errors = 0
        self.client_problems: dict[str, int] = {}
        # Reads of other processes' events on a shared log, and the events
        # they brought, by how: "signal" (the follower, after a signal, a
        # poll or a gap) or "append" (in this process's own append).
        self.follow_reads: dict[str, int] = {}
        self.followed_events: dict[str, int] = {}

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def followed(self, via: str, events: int) -> None:
        self.follow_reads[via] = self.follow_reads.get(via, 0) + 1
        self.followed_events[via] = self.followed_events.get(via, 0) + events

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def batch(self, stored: list[StoredEvent]) -> None:
        """One committed batch: its size and what it holds, by type."""
        self.batch_size.observe(len(stored))
        events = self.events
        for s in stored:
            kind = s.type
            events[kind] = events.get(kind, 0) + 1
            if kind == "UserLoggedIn":
                if getattr(s.event, "resumed", False):
                    self.resumes += 1
                else:
                    self.logins += 1


STATS = Stats()


class DispatchLag:
    """How far delivery is behind what this process committed: positions, and
    seconds since the oldest committed batch delivery has not applied yet."""

    def __init__(self, applied: Callable[[], int] = lambda: 0) -> None:
        # Set once the delivery exists (the writer is built before it).
        self.applied = applied
        self._head = 0
        # (last position of a batch, when it committed); pruned as delivery
        # passes it, so it holds only the batches in flight.
        self._pending: deque[tuple[int, float]] = deque()

    def committed(self, stored: list[StoredEvent]) -> None:
        position = stored[-1].position
        self._head = max(self._head, position)
        self._pending.append((position, time.monotonic()))
        self._prune()

    def _prune(self) -> int:
        applied = self.applied()
        pending = self._pending
        while pending and pending[0][0] <= applied:
            pending.popleft()
        return applied

    def now(self) -> tuple[int, float]:
        applied = self._prune()
        behind = max(0, self._head - applied)
        seconds = time.monotonic() - self._pending[0][1] if self._pending else 0.0
        return behind, seconds


class AppCollector:
    """The families of one app, built when ``/metrics`` is scraped."""

    def __init__(self, eio_sockets: Callable[[], dict[str, Any]], service: Callable[[], ChatService | None],
                 lag: DispatchLag) -> None:
        self._eio_sockets = eio_sockets
        self._service = service
        self.lag = lag

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        by_transport = {"websocket": 0, "polling": 0}
        for sock in list(self._eio_sockets().values()):
            if not sock.closed:
                by_transport["websocket" if sock.upgraded else "polling"] += 1
        g = GaugeMetricFamily("chat_connected_sockets", "Engine.IO connections open on this process", labels=["transport"])
        for transport, n in by_transport.items():
            g.add_metric([transport], n)
        yield g

        from .lifecycle import State

        service = self._service()
        logged_in = online = 0
        if service is not None:
            logged_in = sum(1 for s in service.sessions.live() if s.state is State.ACTIVE)
            online = len(service.online)
        yield GaugeMetricFamily("chat_sessions_logged_in", "Sessions logged in on this process", value=logged_in)
        yield GaugeMetricFamily("chat_online_users", "Users online in the shared log (all processes)", value=online)
        behind, seconds = self.lag.now()
        yield GaugeMetricFamily("chat_dispatch_lag_positions", "Committed positions the dispatcher has not applied yet",
                                value=behind)
        yield GaugeMetricFamily("chat_dispatch_lag_seconds",
                                "Age of the oldest committed batch the dispatcher has not applied yet", value=seconds)

        s = STATS
        yield CounterMetricFamily("chat_logins", "Logins stored", value=s.logins)
        yield CounterMetricFamily("chat_resumes", "Resumes stored", value=s.resumes)
        yield _labelled("chat_refusals", "Requests refused, by the protocol's error code", "reason", s.refusals)
        yield _labelled("chat_events_appended", "Events committed to the log, by type", "type", s.events)
        for name, doc, h in (
            ("chat_commit_batch_size", "Events per group commit", s.batch_size),
            ("chat_commit_seconds", "Group commit latency (the transaction, fsync included)", s.commit_seconds),
        ):
            yield HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum)
        yield CounterMetricFamily("chat_fanout_deliveries", "Broadcast packets written to sockets", value=s.deliveries)
        yield CounterMetricFamily("chat_fanout_bytes", "Broadcast bytes written to sockets", value=s.delivery_bytes)
        yield _labelled("chat_sockets_dropped", "Sockets the server disconnected, by reason", "reason", s.dropped)
        yield CounterMetricFamily("chat_rate_limited", "Requests refused by the per-socket rate limit",
                                  value=s.refusals.get("rate_limited", 0))
        yield CounterMetricFamily("chat_history_requests", "History pages asked for", value=s.history_requests)
        yield CounterMetricFamily("chat_replay_requests", "Resumes asked for (each replays what the client missed)",
                                  value=s.replay_requests)
        yield CounterMetricFamily("chat_database_errors", "Failed database transactions and health checks",
                                  value=s.database_errors)
        yield _labelled("chat_log_follow_reads", "Reads of other processes' events on a shared log, by how", "via",
                        s.follow_reads)
        yield _labelled("chat_log_followed_events", "Other processes' events read, by how", "via", s.followed_events)
        yield _labelled("chat_client_problems", "Problems clients caused, by kind", "kind", s.client_problems)


def _labelled(name: str, doc: str, label: str, counts: dict[str, int]) -> Any:
    """A counter family with one label, from a dict of counts."""
    from prometheus_client.core import CounterMetricFamily  # loaded at the first scrape

    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


def render(collector: AppCollector) -> bytes:
    """The exposition: this app's families, then the process collector's
    (CPU, memory, open files) from prometheus-client's default registry."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry) + generate_latest(REGISTRY)


def parse_setting(value: str) -> int | bool:
    """CHAT_METRICS: ``on`` (on the main port), ``off``, or a port number
    (a listener of its own, so /metrics can stay off the public port)."""
    lowered = value.strip().lower()
    if lowered in ("on", "true", "yes", ""):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    try:
        port = int(lowered)
    except ValueError:
        raise ValueError(f"CHAT_METRICS must be on, off or a port number, got {value!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"CHAT_METRICS port must be 1-65535, got {port}")
    return port


def setup_metrics(app: web.Application, setting: int | bool, host: str, collector: AppCollector) -> None:
    """Serve ``/metrics`` on the app, on a listener of its own, or not at all
    (then 404: never the chat page of the index fallback)."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=render(collector), headers={"Content-Type": CONTENT_TYPE})

    async def disabled(_request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text="metrics are served elsewhere or turned off (CHAT_METRICS)\n")

    if setting is True:
        app.router.add_get("/metrics", metrics)
        return
    app.router.add_get("/metrics", disabled)
    if setting is False:
        return
    port = setting

    async def own_listener(_app: web.Application) -> AsyncIterator[None]:
        side = web.Application()
        side.router.add_get("/metrics", metrics)
        runner = web.AppRunner(side, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        yield
        await runner.cleanup()

    app.cleanup_ctx.append(own_listener)
