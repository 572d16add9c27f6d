"""A tunnel in one process over loopback: QUIC's datagram size follows the path.

Loopback's route MTU (65535) lets path MTU discovery go to its 16380-byte maximum on
the direct path; over the relay the relay's size is used; with discovery off the size
stays at 1200; data stays intact meanwhile, and a UDP flow's largest payload follows
the size (a 10 000-byte UDP datagram crosses once the path carries it). That is aioquic;
qh3 (the process's engine, ``QUICTUN_ENGINE``) keeps 1200 whatever the path proved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

import quictun
from quictun.aio.client import Tunnel, open_tunnel
from quictun.config import TunnelConfig
from quictun.proto.identity import Identity
from quictun.quic import engines
from signal_server.server import RelayConfig, RelayServer

CFG = TunnelConfig()
MAX = CFG.pmtu.max_size if CFG.pmtu is not None else 0
GROWS = engines.current().name == "aioquic"  # qh3 cannot change its size (quic/flow.py)


def in_effect(size: int) -> int:
    """What the engine uses when the path says ``size``."""
    return size if GROWS else 1200


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    h = hashlib.sha256()
    while data := await reader.read(65536):
        h.update(data)
    writer.write(h.hexdigest().encode())
    await writer.drain()
    writer.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(data, addr)  # type: ignore[attr-defined]


@pytest.fixture
async def relay_and_server() -> AsyncIterator[RelayServer]:
    loop = asyncio.get_running_loop()
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    target = await asyncio.start_server(_sink, "127.0.0.1", 0)
    udp_t, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    forward = {"sink": f"127.0.0.1:{target.sockets[0].getsockname()[1]}",
               "echo": f"udp:127.0.0.1:{udp_t.get_extra_info('sockname')[1]}"}
    task = asyncio.create_task(quictun.serve(
        "mtu", forward=forward, signal=relay.url, secret="mtu-secret-0123456789",
        identity=Identity.generate(), on_event=lambda s: None))
    for _ in range(100):
        if relay.stats.get("names", 0) >= 1:
            break
        await asyncio.sleep(0.05)
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        target.close()
        udp_t.close()
        await relay.stop()


async def _push(tunnel: Tunnel, data: bytes) -> str:
    reader, writer = await tunnel.open_connection(service="sink")
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    digest = (await reader.read()).decode()
    writer.close()
    return digest


async def _wait_size(tunnel: Tunnel, pred: Any) -> int:
    driver = tunnel.session.driver
    assert driver is not None
    for _ in range(200):
        if pred(driver.max_datagram_size):
            break
        await asyncio.sleep(0.05)
    return driver.max_datagram_size


async def _open(relay: RelayServer, mode: str, config: TunnelConfig | None = None) -> Tunnel:
    return await open_tunnel("mtu", signal=relay.url, secret="mtu-secret-0123456789",
                             identity=Identity.generate(), on_status=lambda s: None,
                             mode=mode, config=config)


async def test_direct_loopback_path_goes_to_the_maximum(relay_and_server: RelayServer) -> None:
    tunnel = await _open(relay_and_server, "direct")
    try:
        flow = await tunnel.open_datagram("echo")
        data = os.urandom(4_000_000)
        assert await _push(tunnel, data) == hashlib.sha256(data).hexdigest()
        for _ in range(200):
            if tunnel.session.paths.mtu.datagram_size == MAX:
                break
            await asyncio.sleep(0.05)
        assert tunnel.session.paths.mtu.datagram_size == MAX  # what the path proved
        stats = tunnel.session.paths.stats()
        assert stats["pmtu"]["state"] == "complete" and stats["pmtu_probes_acked"] >= 2
        assert await _wait_size(tunnel, lambda n: n == in_effect(MAX)) == in_effect(MAX)
        assert await _push(tunnel, data) == hashlib.sha256(data).hexdigest()
        if not GROWS:
            assert flow.max_payload < 1200 and not flow.send(os.urandom(10_000))
            return
        assert flow.max_payload > 16_000  # the DATAGRAM frame limit followed the size
        big = os.urandom(10_000)
        for _ in range(20):  # the serving side may still be on its way up: retry
            assert flow.send(big)
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(flow.recv(), 0.5) == big:
                    break
        else:
            pytest.fail("a 10 000-byte UDP datagram never came back")
        flow.close()
    finally:
        await tunnel.close()


async def test_relay_path_uses_the_relay_size(relay_and_server: RelayServer) -> None:
    tunnel = await _open(relay_and_server, "relay")
    try:
        data = os.urandom(2_000_000)
        assert await _push(tunnel, data) == hashlib.sha256(data).hexdigest()
        size = await _wait_size(tunnel, lambda n: n == in_effect(CFG.relay_datagram_size))
        assert size == in_effect(CFG.relay_datagram_size)
        assert tunnel.session.paths.mtu.datagram_size == CFG.relay_datagram_size
        assert tunnel.session.paths.stats()["pmtu_probes_sent"] == 0  # no UDP at all
    finally:
        await tunnel.close()


async def test_without_discovery_the_size_stays_1200(relay_and_server: RelayServer) -> None:
    tunnel = await _open(relay_and_server, "direct", CFG.replace(pmtu=None))
    try:
        data = os.urandom(1_000_000)
        assert await _push(tunnel, data) == hashlib.sha256(data).hexdigest()
        await asyncio.sleep(0.5)
        assert tunnel.session.driver is not None
        assert tunnel.session.driver.max_datagram_size == 1200
        assert tunnel.session.paths.stats()["pmtu_probes_sent"] == 0
    finally:
        await tunnel.close()
