"""The one token bucket, for every per-peer and per-stream rate limit of the node and the relay.

Pure: the caller passes the current time (`Clock.monotonic()` in the shells), so tests drive it
with plain numbers.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; full when made at time `now`."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if rate < 0 or burst <= 0:
            raise ValueError("a token bucket needs rate >= 0 and burst > 0")
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def take(self, count: float, *, now: float) -> bool:
        """Take `count` tokens if there are that many at time `now`; False (taking none) if not.
        A `now` earlier than the last one (it cannot happen with a monotonic clock) refills
        nothing."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)
        if count > self.tokens:
            return False
        self.tokens -= count
        return True
