"""The one timer every asyncio shell re-arms after feeding its state machine.

A sans-I/O core (the QUIC connection, the path manager, the server's proof gate) answers
``get_timer()`` with the loop time at which it wants ``handle_timer(now)``, or None. The
shell calls :meth:`Timer.set` with that answer after every input; the timer moves only
when the answer changed, and fires the callback once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timer:
    """One re-armable ``loop.call_at`` for ``callback`` (called with no arguments)."""

    __slots__ = ("_loop", "_callback", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    @property
    def at(self) -> float | None:
        """When the timer fires (loop time), or None when it is not armed."""
        return self._at

    def set(self, at: float | None) -> None:
        """Fire at loop time ``at`` (None: not at all). A no-op when ``at`` is unchanged."""
        if at == self._at:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = self._loop.call_at(at, self._fire) if at is not None else None

    def cancel(self) -> None:
        """Disarm it (the same as ``set(None)``)."""
        self.set(None)

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        self._callback()
