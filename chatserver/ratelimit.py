"""Token buckets per socket (events, and frames before they are decoded):
floods are refused, bursts are not."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Take one token at time ``now``; False when the bucket is empty."""
        if self.rate <= 0:
            return True
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# What a FrameBudget says about one frame.
ACCEPT = 0  # decode and handle it
REFUSE = 1  # drop it undecoded
DROP = 2  # disconnect the socket


class FrameBudget:
    """Every frame a socket sends, counted before anything decodes it.

    A token bucket like ``TokenBucket``, with two differences. A refused frame
    still costs a fraction of a token (the bucket may go into debt, down to
    minus one burst), so a client that never pauses gets nothing through
    rather than a trickle; a client slightly over the rate still gets most of
    its frames through. And refusals are watched: more than one burst of them
    within a second, or refusals that go on for longer than ``grace`` seconds
    without a calm second, and the socket is to be dropped.
    """

    __slots__ = (
        "rate",
        "burst",
        "grace",
        "refused",
        "_tokens",
        "_stamp",
        "_window_start",
        "_window_refused",
        "_episode_start",
        "_last_refusal",
    )

    REFUSED_COST = 0.25
    CALM = 1.0  # seconds without a refusal that end an episode of refusals

    def __init__(self, rate: float, burst: int, grace: float, now: float) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.grace = grace
        self.refused = 0  # frames refused over the socket's life
        self._tokens = self.burst
        self._stamp = now
        self._window_start = now
        self._window_refused = 0
        self._episode_start = now
        self._last_refusal = float("-inf")

    def start_with(self, tokens: float) -> None:
        """Start below a full burst (a peer that was just dropped)."""
        self._tokens = min(self._tokens, float(tokens))

    def frame(self, now: float) -> int:
        """Count one frame at time ``now``: ACCEPT, REFUSE or DROP."""
        if self.rate <= 0:
            return ACCEPT
        tokens = self._tokens + (now - self._stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return ACCEPT
        tokens -= self.REFUSED_COST
        self._tokens = tokens if tokens > -self.burst else -self.burst
        return self.refusal(now)

    def refusal(self, now: float) -> int:
        """Record a refused frame (also one that was decoded and found bad):
        REFUSE, or DROP once the socket keeps it up."""
        self.refused += 1
        if now - self._last_refusal > self.CALM:
            self._episode_start = now
        self._last_refusal = now
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._window_refused = 0
        self._window_refused += 1
        if self._window_refused > self.burst or now - self._episode_start > self.grace:
            return DROP
        return REFUSE
