"""A man in the middle for relay tests: a WebSocket proxy between quictun processes and a
real ``quictun-signal``. It forwards every frame both ways, records the text frames (what
a relay sees), and may rewrite them: the hostile relay of the adversary tests.

It runs its own event loop in a thread, so that tests written with plain processes and
sockets can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

#: ``rewrite(direction, message) -> message`` where direction is "up" (peer to relay) or
#: "down" (relay to peer) and message the decoded JSON object; return it changed or not.
Rewrite = Callable[[str, dict[str, Any]], dict[str, Any]]


class WsProxy:
    """Listen on 127.0.0.1 (``url``) and forward each connection to ``upstream``."""

    def __init__(self, upstream: str, rewrite: Rewrite | None = None,
                 keep_binary: bool = False) -> None:
        self.upstream = upstream
        self.rewrite = rewrite
        self.keep_binary = keep_binary
        #: the binary frames (relayed packets), when ``keep_binary``
        self.binary: list[bytes] = []
        #: every text frame as (connection number, direction, text as forwarded)
        self.frames: list[tuple[int, str, str]] = []
        self.binary_frames = 0
        self._lock = threading.Lock()
        self._conns = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def messages(self, direction: str | None = None) -> list[dict[str, Any]]:
        """The recorded text frames as JSON objects (optionally one direction only)."""
        with self._lock:
            return [json.loads(t) for _, d, t in self.frames if direction in (None, d)]

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        async with serve(self._handle, "127.0.0.1", 0, compression=None,
                         max_size=2**20) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/"
            self._ready.set()
            await self._stop

    async def _handle(self, down: ServerConnection) -> None:
        with self._lock:
            self._conns += 1
            n = self._conns
        try:
            async with connect(self.upstream, compression=None, max_size=2**20,
                               proxy=None) as up:
                tasks = [asyncio.create_task(self._pump(n, "up", down, up)),
                         asyncio.create_task(self._pump(n, "down", up, down))]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    t.cancel()
        except (OSError, ConnectionClosed):
            pass

    async def _pump(self, n: int, direction: str, src: Any, dst: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in src:
                if isinstance(frame, bytes):
                    with self._lock:
                        self.binary_frames += 1
                        if self.keep_binary:
                            self.binary.append(frame)
                    await dst.send(frame)
                    continue
                text = frame
                if self.rewrite is not None:
                    text = json.dumps(self.rewrite(direction, json.loads(frame)))
                with self._lock:
                    self.frames.append((n, direction, text))
                await dst.send(text)
        await dst.close()
