"""When to re-learn our own candidates and tell the peer (sans-I/O, used by the manager).

A NAT that reboots or flushes its table moves us to new public ports; a slow reflector
may miss the offer. Either way the peer only finds us again if we re-gather (STUN to the
relay's reflectors on the tunnel socket) and send the fresh candidates inside QUIC. The
:class:`~quictun.punch.manager.PathManager` decides *when*, through this schedule, and
emits :class:`~quictun.punch.types.GatherWanted`; the shell does the I/O and reports back
with :meth:`GatherSchedule.done`.

Triggers (each starts a schedule unless one is running):

* the direct path was lost (direct -> relay or nothing): at once;
* the first path is not direct (we started on the relay): after ``first_delay``;
* the direct path went suspect (silent; see ``PathManager.uncertain``): at once.

A schedule asks again after each of ``retry_delays`` (counted from the end of the previous
gathering), and stops as soon as the path is direct and not suspect when one is due.
"""

from __future__ import annotations

from collections import deque

__all__ = ["GatherSchedule", "FIRST_DELAY", "RETRY_DELAYS"]

FIRST_DELAY = 1.0
RETRY_DELAYS = (2.0, 5.0, 10.0, 20.0, 30.0)


class GatherSchedule:
    """The re-gathering plan of one session. Time is passed in."""

    def __init__(self, retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self._retry_delays = retry_delays
        self._left: deque[float] = deque()
        self._due: float | None = None
        self._running = False  # a gathering is in flight (between due() and done())
        self._active = False  # a schedule exists (due, running, or retries left)

    def trigger(self, now: float, delay: float = 0.0) -> None:
        """Start a schedule whose first gathering is due at ``now + delay``; ignored
        while one is active."""
        if self._active:
            return
        self._active = True
        self._left = deque(self._retry_delays)
        self._due = now + delay

    @property
    def next_time(self) -> float | None:
        """When :meth:`due` will next return True (for ``get_timer``), or None."""
        return self._due

    def due(self, now: float, satisfied: bool) -> bool:
        """True when a gathering should start now. ``satisfied``: the path is direct and
        not suspect, which ends the schedule instead."""
        if self._due is None or now < self._due:
            return False
        self._due = None
        if satisfied:
            self._active = False
            self._left.clear()
            return False
        self._running = True
        return True

    def done(self, now: float) -> None:
        """The gathering that :meth:`due` started ended (with or without candidates)."""
        if not self._running:
            return
        self._running = False
        if self._left:
            self._due = now + self._left.popleft()
        else:
            self._active = False
