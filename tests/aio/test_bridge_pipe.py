"""StreamBridge with a read pipe (``connect --stdio``'s stdin) as its local side."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from quictun.aio.bridge import StreamBridge


def test_stdin_connected_after_the_stream_ended_is_closed_quietly() -> None:
    """The stream may end (the server refused it) before the stdin pipe's transport is
    made: the pipe is then closed; a read pipe has no abort(), which raised in the event
    loop's callback and printed a traceback under the one-line error."""
    async def main() -> tuple[list[dict[str, Any]], bool]:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        bridge = StreamBridge(None, 0)  # type: ignore[arg-type]  # no QUIC byte is sent
        bridge.duplex = False
        bridge._done = True  # what _finish() leaves after a refusal
        r, w = os.pipe()
        try:
            transport, _ = await loop.connect_read_pipe(lambda: bridge, os.fdopen(r, "rb"))
            await asyncio.sleep(0.01)
            return errors, transport.is_closing()
        finally:
            os.close(w)

    errors, closing = asyncio.run(main())
    assert errors == []
    assert closing
