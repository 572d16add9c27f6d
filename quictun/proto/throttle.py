"""Online-guess throttling for the serving side (pure: the caller passes ``now``).

Theory of operation
-------------------
With a PAKE, every exchange a stranger starts is one guess of the secret, and the
stranger learns the answer whether or not it ever confirms. So a :class:`Throttle`
charges a failure when an exchange is *admitted* (:meth:`Throttle.admit`) and refunds it
when the exchange confirms (:meth:`Throttle.succeeded`); an exchange that fails or is
abandoned keeps its charge (:meth:`Throttle.failed`).

Per key (the server uses one key per tunnel name for unknown clients, and one per known
client identity, see docs/protocol.md, "Throttle") it keeps a failure count that *decays*
(one failure forgiven every ``forgive`` seconds) and a time before which it admits
nothing. Up to ``free`` guesses go through at once; from the ``free``-th charged failure
on, each sets a wait of ``base * factor ** ceil(failures - free)`` seconds, at most ``cap``. At most
``max_pending`` exchanges per key may be in flight at once. In the long run a key gets
about one guess per ``forgive`` seconds, whatever the guesser does.

With the defaults (free 5, base 2 s, factor 2, cap 600 s, forgive 300 s): 5 guesses at
once, then waits of 2, 4, 8, ... s up to 10 minutes, and about 288 guesses a day at
most. :func:`schedule` lists the waits a guesser meets.

:meth:`Throttle.admit` returns a :class:`Verdict` with a one-line ``reason`` that the
server logs at the default level and sends back as the reject reason (code ``busy``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["Policy", "Verdict", "Throttle", "schedule"]


@dataclass(frozen=True)
class Policy:
    """Tunables (see the module doc for what each does)."""

    free: int = 5
    base: float = 2.0
    factor: float = 2.0
    cap: float = 600.0
    forgive: float = 300.0
    max_pending: int = 4
    max_keys: int = 10_000

    def wait(self, failures: float) -> float:
        """The wait after a charge that left ``failures`` failures on a key."""
        over = failures - self.free
        if over < 0:
            return 0.0
        # rounded up, so that the little decay during a wait does not shorten the next one
        return min(self.cap, self.base * self.factor ** math.ceil(over - 1e-9))


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Throttle.admit` decided. ``retry_after`` is in seconds (0 if
    admitted, or if the refusal is for too many exchanges in flight)."""

    admitted: bool
    retry_after: float = 0.0
    reason: str = ""


@dataclass
class _Bucket:
    failures: float = 0.0
    updated: float = 0.0
    not_before: float = 0.0
    pending: int = 0


@dataclass
class Throttle:
    """Buckets of failures per key. Not thread-safe; one per event loop."""

    policy: Policy = field(default_factory=Policy)
    _buckets: dict[Hashable, _Bucket] = field(default_factory=dict)

    def _bucket(self, key: Hashable, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.policy.max_keys:
                self.prune(now)
            b = self._buckets[key] = _Bucket(updated=now)
        elif now > b.updated:
            b.failures = max(0.0, b.failures - (now - b.updated) / self.policy.forgive)
            b.updated = now
        return b

    def admit(self, key: Hashable, now: float) -> Verdict:
        """Start an exchange for ``key`` at ``now``: admitted (one failure charged, one
        more in flight) or refused (nothing charged)."""
        if key not in self._buckets and len(self._buckets) >= self.policy.max_keys:
            self.prune(now)
            if len(self._buckets) >= self.policy.max_keys:
                return Verdict(False, self.policy.base, "too many throttled clients")
        b = self._bucket(key, now)
        if now < b.not_before:
            wait = b.not_before - now
            return Verdict(False, wait, f"too many failed attempts: throttled for "
                                        f"{wait:.0f} s more")
        if b.pending >= self.policy.max_pending:
            return Verdict(False, 0.0, f"{b.pending} attempts already in progress")
        b.pending += 1
        b.failures += 1
        b.not_before = now + self.policy.wait(b.failures)
        return Verdict(True)

    def succeeded(self, key: Hashable, now: float, *, reset: bool = False) -> None:
        """The admitted exchange confirmed: refund its charge. ``reset`` also forgets
        every failure and wait of ``key`` (for a known client's own key; never for a
        name's key, which strangers share)."""
        b = self._bucket(key, now)
        b.pending = max(0, b.pending - 1)
        b.failures = 0.0 if reset else max(0.0, b.failures - 1)
        if reset:
            b.not_before = 0.0

    def failed(self, key: Hashable, now: float) -> None:
        """The admitted exchange failed or was abandoned: its charge stays."""
        b = self._bucket(key, now)
        b.pending = max(0, b.pending - 1)

    def retry_after(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` may start an exchange (0 if it may now)."""
        b = self._buckets.get(key)
        return 0.0 if b is None else max(0.0, b.not_before - now)

    def failures(self, key: Hashable, now: float) -> float:
        """The decayed failure count of ``key`` at ``now``."""
        b = self._buckets.get(key)
        if b is None:
            return 0.0
        return max(0.0, b.failures - max(0.0, now - b.updated) / self.policy.forgive)

    def prune(self, now: float) -> int:
        """Forget keys with nothing left to remember; returns how many were dropped."""
        idle = [k for k, b in self._buckets.items()
                if b.pending == 0 and now >= b.not_before and self.failures(k, now) == 0]
        for k in idle:
            del self._buckets[k]
        return len(idle)

    def __len__(self) -> int:
        return len(self._buckets)


def schedule(policy: Policy, guesses: int) -> list[float]:
    """When a guesser who tries again as soon as allowed gets each of its first
    ``guesses`` guesses (seconds from the first), every exchange failing at once."""
    t = Throttle(policy)
    now, times = 0.0, []
    while len(times) < guesses:
        v = t.admit("k", now)
        if v.admitted:
            times.append(now)
            t.failed("k", now)
        else:
            now += v.retry_after
    return times
