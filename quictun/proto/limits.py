"""Small bounded memories every untrusted input passes through (pure: time passed in).

* :class:`TokenBucket`: a rate limit, ``burst`` at once and ``rate`` per second on average;
  an amount can be more than one (bytes of relayed traffic).
* :class:`ReplayWindow`: keys seen within ``window`` seconds (at most ``capacity``), each
  with the *origin* it first came from. A key seen again from the same origin is a
  *repeat* (a retransmission); from another origin, a *replay*. Used for the peer's probe
  transaction ids (origin: source address and socket) and for the client nonces of offers
  (no origin: every second sighting is a replay).
* :class:`Quieter`: at most one log line per key every ``interval`` seconds, telling how
  many were left out (a flood of refused connections makes a line, not a flood of them).

Neither reads a clock: every call takes ``now`` (seconds, any monotonic origin); a clock
that goes backwards adds no tokens and expires nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from enum import StrEnum

__all__ = ["Quieter", "ReplayWindow", "Sighting", "TokenBucket"]


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


class Quieter:
    """At most one line per key every ``interval`` seconds (at most ``capacity`` keys)."""

    def __init__(self, interval: float = 10.0, capacity: int = 256) -> None:
        self.interval = interval
        self.capacity = capacity
        self._keys: dict[Hashable, tuple[float, int]] = {}  # key -> (last line, left out)

    def allow(self, key: Hashable, now: float) -> int | None:
        """None: leave this line out (counted); else log it, and mention the returned
        number of lines left out since the previous one (0: none)."""
        last = self._keys.get(key)
        if last is not None and now - last[0] < self.interval:
            self._keys[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._keys) >= self.capacity:
            self._keys.pop(next(iter(self._keys)))
        self._keys[key] = (now, 0)
        return last[1] if last is not None else 0
