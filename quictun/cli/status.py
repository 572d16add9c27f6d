"""Status output for ``quictun connect``.

While the tunnel is being set up, the waiting stages ("contacting the relay",
"punching a path", ...) are shown on one line with a spinner when stderr is a
terminal, and as plain log lines otherwise. The stable ``path=...`` lines that
tests and the lab parse are always plain log lines. Once the tunnel is up,
:func:`log_stats_every` logs path, RTT and bytes moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any, TextIO

log = logging.getLogger("quictun")

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
ASCII_FRAMES = "|/-\\"


def is_stable(line: str) -> bool:
    """Lines always printed plainly: path reports and anything after set-up."""
    return line.startswith("path=")


class StatusLine:
    """An ``on_status`` callback. Use as a callable; call :meth:`close` when done."""

    def __init__(self, stream: TextIO | None = None, *, spinner: bool | None = None,
                 interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        if spinner is None:
            isatty = getattr(self.stream, "isatty", None)
            spinner = bool(isatty and isatty())
        self.spinner = spinner
        self.interval = interval
        enc = (getattr(self.stream, "encoding", None) or "").lower()
        self.frames = FRAMES if "utf" in enc else ASCII_FRAMES
        self.text: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._frame = 0
        self.done = False

    def __call__(self, line: str) -> None:
        if not self.spinner or self.done or is_stable(line):
            if is_stable(line):
                self.done = True  # set-up is over: from here on, plain lines only
            self._clear()
            log.info("%s", line)
            return
        self.text = line
        self._draw()
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: no animation
                self._task = asyncio.get_running_loop().create_task(self._spin())

    def _draw(self) -> None:
        if self.text is None:
            return
        frame = self.frames[self._frame % len(self.frames)]
        self.stream.write(f"\r\x1b[Kquictun: {frame} {self.text} …")
        self.stream.flush()

    def _clear(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.text is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.text = None

    async def _spin(self) -> None:
        while self.text is not None:
            await asyncio.sleep(self.interval)
            self._frame += 1
            self._draw()

    def close(self) -> None:
        """Clear the spinner line (call before printing an error)."""
        self.done = True
        self._clear()


def stats_line(tunnel: Any) -> str:
    """``stats: path=direct local=… remote=… rtt=1.2ms sent=123 received=456``."""
    from ..punch.types import describe

    return (f"stats: {describe(tunnel.path)} sent={tunnel.bytes_sent} "
            f"received={tunnel.bytes_received}")


async def log_stats_every(tunnel: Any, interval: float = 60.0) -> None:
    """Log :func:`stats_line` every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        log.info("%s", stats_line(tunnel))
