"""Two small bounded memories every untrusted input passes through (pure: time passed in).

* :class:`TokenBucket`: a rate limit, ``burst`` at once and ``rate`` per second on average;
  an amount can be more than one (bytes of relayed traffic).
* :class:`ReplayWindow`: keys seen within ``window`` seconds (at most ``capacity``), each
  with the *origin* it first came from. A key seen again from the same origin is a
  *repeat* (a retransmission); from another origin, a *replay*. Used for the peer's probe
  transaction ids (origin: source address and socket) and for the client nonces of offers
  (no origin: every second sighting is a replay).

Neither reads a clock: every call takes ``now`` (seconds, any monotonic origin); a clock
that goes backwards adds no tokens and expires nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from enum import StrEnum

__all__ = ["ReplayWindow", "Sighting", "TokenBucket"]


class TokenBucket:
    """At most ``burst`` units at once and ``rate`` units per second on average."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` tokens if there are that many (True), else spend none (False)."""
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False


class Sighting(StrEnum):
    """What :meth:`ReplayWindow.check` says of a key."""

    NEW = "new"
    """First sighting within the window: remembered now."""
    REPEAT = "repeat"
    """Seen before, from the same origin: a retransmission."""
    REPLAY = "replay"
    """Seen before from another origin (or the window is full and refuses): drop it."""


class ReplayWindow:
    """Keys seen within ``window`` seconds, at most ``capacity`` of them.

    When full, ``evict_when_full=True`` forgets the oldest key (the caller has other
    limits that bound what a replay past eviction can do); ``False`` refuses every new
    key as :attr:`Sighting.REPLAY` until old ones expire (fail closed).
    Only record keys whose authenticity was checked: otherwise a stranger fills it.
    """

    def __init__(self, window: float, capacity: int, *, evict_when_full: bool = True) -> None:
        if window <= 0 or capacity < 1:
            raise ValueError("replay window needs window > 0 and capacity >= 1")
        self.window = window
        self.capacity = capacity
        self.evict_when_full = evict_when_full
        self._seen: dict[Hashable, tuple[Hashable, float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, key: Hashable, now: float, origin: Hashable = None) -> Sighting:
        """Classify ``key`` (from ``origin``) and remember it if it is new."""
        self._expire(now)
        first = self._seen.get(key)
        if first is not None:
            return Sighting.REPEAT if first[0] == origin else Sighting.REPLAY
        if len(self._seen) >= self.capacity:
            if not self.evict_when_full:
                return Sighting.REPLAY
            del self._seen[next(iter(self._seen))]
        self._seen[key] = (origin, now)
        return Sighting.NEW

    def _expire(self, now: float) -> None:
        while self._seen:
            key, (_origin, at) = next(iter(self._seen.items()))
            if now - at < self.window:
                break
            del self._seen[key]
