"""QuicDriver and the datagram size: applied after the handshake (the last size asked for
wins), a flush handed over as one batch, probe timeouts reported (quictun.aio.driver)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quictun.aio.driver import VIRTUAL_PEER, QuicDriver
from quictun.config import TunnelConfig
from quictun.proto.identity import Identity
from quictun.quic import engines
from quictun.quic.flow import MIN_DATAGRAM_SIZE, connection_class

CLIENT = ("1.2.3.4", 1)
CFG = TunnelConfig()


def pair(now: float) -> tuple[Any, Any]:
    ident = Identity.generate()
    kw = {"alpn": "t", "max_datagram_size": CFG.max_datagram,
          "max_stream_data": CFG.stream_window, "max_data": CFG.connection_window,
          "idle_timeout": 60.0}
    e = engines.get("aioquic")
    client = connection_class(e)(configuration=e.configuration(True, ident, **kw))
    server = connection_class(e)(
        configuration=e.configuration(False, ident, **kw),
        original_destination_connection_id=client.original_destination_connection_id)
    client.connect(VIRTUAL_PEER, now=now)  # as PeerSession does
    return client, server


async def handshake(driver: QuicDriver, server: Any, sent: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(50):
        for d in sent:
            server.receive_datagram(d, CLIENT, loop.time())
        sent.clear()
        for d, _addr in server.datagrams_to_send(loop.time()):
            driver.datagram_received(d)
        await asyncio.sleep(0.002)
        if driver.quic._handshake_complete:
            return
    pytest.fail("no handshake")


@pytest.mark.parametrize("asked,want", [([8972], 8972), ([16380, 1200], 1200)],
                         ids=["grow", "the-last-size-asked-wins"])
async def test_the_size_is_applied_after_the_handshake(asked: list[int], want: int) -> None:
    client, server = pair(asyncio.get_running_loop().time())
    sent: list[bytes] = []
    driver = QuicDriver(client, sent.append, keepalive=0)
    for size in asked:  # e.g. the relay's size, then a fresh direct path's 1200
        driver.set_max_datagram_size(size)
    driver.schedule_flush()
    await asyncio.sleep(0.01)
    assert sent and all(len(d) <= MIN_DATAGRAM_SIZE for d in sent)  # Initials stay at 1200
    assert driver.max_datagram_size == MIN_DATAGRAM_SIZE
    await handshake(driver, server, sent)
    assert driver.max_datagram_size == want
    driver.close()


async def test_a_flush_is_one_batch_and_stalls_are_reported() -> None:
    client, server = pair(asyncio.get_running_loop().time())
    batches: list[list[bytes]] = []
    single: list[bytes] = []
    driver = QuicDriver(client, single.append, keepalive=0, send_datagrams=batches.append)
    stalls: list[float] = []
    driver.on_stall = lambda: stalls.append(asyncio.get_running_loop().time())
    driver.schedule_flush()
    await asyncio.sleep(0.01)
    sent = [d for b in batches for d in b]
    batches.clear()
    await handshake(driver, server, sent)
    batches.clear()
    driver.set_max_datagram_size(8972)
    driver.send(driver.open_stream(), b"x" * 200_000)
    await asyncio.sleep(0.01)
    assert not single  # everything went through the batch hook
    assert batches and max(len(b) for b in batches) > 1  # several datagrams per flush
    assert max(len(d) for b in batches for d in b) == 8972
    # nothing is acknowledged (a black hole): QUIC's probe timeout fires, and is reported
    for _ in range(100):
        if stalls:
            break
        await asyncio.sleep(0.02)
    assert stalls
    driver.close()
