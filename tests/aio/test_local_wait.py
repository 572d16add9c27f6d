"""`connect --listen`'s listeners while no tunnel is up (quictun.aio.local): a local
connection waits for the next tunnel (its first bytes kept), within a deadline."""

from __future__ import annotations

import asyncio
import logging

import pytest

from quictun.aio.local import Listener, TunnelSlot
from quictun.config import TunnelConfig
from quictun.proto.services import parse_listen


async def test_a_waiting_connection_is_closed_after_the_deadline(
        caplog: pytest.LogCaptureFixture) -> None:
    slot = TunnelSlot()
    wanted: list[bool] = []
    slot.on_wanted = lambda: wanted.append(True)
    lst = Listener(parse_listen("127.0.0.1:0"), None, slot, TunnelConfig(tunnel_wait=0.5))
    bound = await lst.start()
    port = int(bound.rsplit(":", 1)[1])
    try:
        with caplog.at_level(logging.WARNING, logger="quictun"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"early bytes")
            await writer.drain()
            try:  # closed (reset: its early bytes were never read), never answered
                got = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                got = b""
            writer.close()
        assert got == b""
        assert wanted, "a waiting connection asks for a tunnel at once"
        assert any("no tunnel within 0.5 s; closed a local connection" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        lst.close()


async def test_the_slot_hands_over_the_next_tunnel() -> None:
    slot = TunnelSlot()

    class Up:
        closed = False

    waiter = asyncio.ensure_future(slot.wait(10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    t = Up()
    slot.set(t)  # type: ignore[arg-type]
    assert await asyncio.wait_for(waiter, 5) is t
    assert await slot.wait(0) is t  # up: no wait at all
    t.closed = True
    assert slot() is None and await slot.wait(0.05) is None
