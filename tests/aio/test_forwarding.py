"""Several services through one tunnel, in one process: a real relay, quictun.serve with
named TCP, Unix-socket and UDP services and --allow rules, quictun.connect. Every target
is a real socket; the forbidden ones count their accepts, which must stay at zero."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import quictun
from quictun.aio.client import Tunnel
from quictun.config import TunnelConfig
from quictun.errors import TunnelError
from quictun.proto.identity import Identity
from signal_server.server import RelayConfig, RelayServer


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


# one datagram size on every path (no path MTU discovery): the frame limits below are fixed
FIXED = TunnelConfig(pmtu=None, relay_datagram_size=TunnelConfig().max_datagram)


class Accepts:
    """A TCP listener that counts connections and answers with a tag."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.count = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.count += 1
            w.write(self.tag)
            await w.drain()
            w.close()

        self.server = await asyncio.start_server(handle, host, 0)
        return self.server.sockets[0].getsockname()[1]


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict]:
    loop = asyncio.get_running_loop()
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    tcp = await asyncio.start_server(_echo, "127.0.0.1", 0)
    sock_path = str(tmp_path / "app.sock")
    unix = await asyncio.start_unix_server(_echo, sock_path)
    udp_t, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    allowed, forbidden = Accepts(b"allowed"), Accepts(b"forbidden")
    allowed_port, forbidden_port = await allowed.start(), await forbidden.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, not listening: connections refused
    forward = {"echo": f"127.0.0.1:{tcp.sockets[0].getsockname()[1]}",
               "app": f"unix:{sock_path}",
               "dns": f"udp:127.0.0.1:{udp_t.get_extra_info('sockname')[1]}"}
    rules = [f"127.0.0.1:{allowed_port},{closed_port}", "10.0.0.0/8:22"]  # 10/8: never dialled
    task = asyncio.create_task(quictun.serve(
        "multi", forward=forward, allow=rules, config=FIXED,
        signal=relay.url, secret="s3", identity=Identity.generate(), on_event=lambda s: None))
    for _ in range(100):
        if relay.stats.get("names", 0) >= 1:
            break
        await asyncio.sleep(0.05)
    tunnel = await quictun.aio.client.open_tunnel(
        "multi", signal=relay.url, secret="s3", identity=Identity.generate(),
        on_status=lambda s: None, config=FIXED)
    try:
        yield {"tunnel": tunnel, "allowed": allowed, "forbidden": forbidden,
               "allowed_port": allowed_port, "forbidden_port": forbidden_port,
               "closed_port": closed_port}
    finally:
        await tunnel.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for s in (tcp, unix, allowed.server, forbidden.server):
            s.close()  # type: ignore[union-attr]
        udp_t.close()
        closed.close()
        await relay.stop()


async def _roundtrip(tunnel: Tunnel, payload: bytes, **kw: object) -> bytes:
    reader, writer = await tunnel.open_connection(**kw)  # type: ignore[arg-type]
    writer.write(payload)
    writer.write_eof()
    got = await reader.read(-1)
    writer.close()
    return got


async def test_several_services_at_once(world: dict) -> None:
    tunnel: Tunnel = world["tunnel"]
    flow = await tunnel.open_datagram("dns")

    async def udp() -> list[bytes]:
        out = []
        for i in range(20):
            assert flow.send(b"q%d" % i)
            out.append(await asyncio.wait_for(flow.recv(), 10))
        return out

    tcp_p, unix_p = os.urandom(300_000), os.urandom(200_000)
    got = await asyncio.gather(
        _roundtrip(tunnel, tcp_p, service="echo"),
        _roundtrip(tunnel, unix_p, service="app"),
        _roundtrip(tunnel, b"", host="127.0.0.1", port=world["allowed_port"]),
        udp(),
        *(_roundtrip(tunnel, b"x%d" % i, service="echo") for i in range(5)),
    )
    assert got[0] == tcp_p and got[1] == unix_p and got[2] == b"allowed"
    assert got[3] == [b"echo:q%d" % i for i in range(20)]
    assert got[4:] == [b"x%d" % i for i in range(5)]
    assert flow.stats.datagrams_in == 20 and flow.stats.datagrams_out == 20
    flow.close()


async def test_listing_names_kinds_and_rules(world: dict) -> None:
    listing = await world["tunnel"].services()
    assert sorted(listing.services) == [("app", "unix", False), ("dns", "udp", True),
                                        ("echo", "tcp", False)]
    assert listing.allow == (f"127.0.0.1:{world['allowed_port']},{world['closed_port']}",
                             "10.0.0.0/8:22")


async def test_unknown_and_wrong_kind_services_are_refused_with_the_names(world: dict) -> None:
    tunnel: Tunnel = world["tunnel"]
    with pytest.raises(TunnelError, match="no service 'nope'.*echo"):
        await tunnel.open_connection("nope")
    with pytest.raises(TunnelError, match="'dns' is udp"):
        await tunnel.open_connection("dns")
    with pytest.raises(TunnelError, match="'echo' is tcp"):
        await tunnel.open_datagram("echo")
    # the default stream service: there are two (echo, app) and none is the default
    reader, writer = await tunnel.open_connection()
    assert await reader.read(-1) == b""
    writer.close()
    # other streams are not disturbed
    assert await _roundtrip(tunnel, b"still fine", service="echo") == b"still fine"


@pytest.mark.parametrize("host", ["localhost", "::ffff:127.0.0.1", "[::ffff:7f00:1]"])
async def test_other_spellings_of_the_allowed_address_reach_only_it(world: dict,
                                                                    host: str) -> None:
    got = await _roundtrip(world["tunnel"], b"", host=host, port=world["allowed_port"])
    assert got == b"allowed" and world["forbidden"].count == 0


@pytest.mark.parametrize("host", [
    "127.0.0.2", "::1", "[::1]", "0.0.0.0", "127.1", "0x7f000001", "017700000001",
    "fe80::1%lo",
])
async def test_proxy_targets_outside_the_rules_never_connect(world: dict, host: str) -> None:
    with pytest.raises(TunnelError, match="not allowed|neither an IP|never a target"):
        await world["tunnel"].open_connection(host=host, port=world["allowed_port"])
    assert world["forbidden"].count == 0 and world["allowed"].count == 0


async def test_another_port_on_the_allowed_host_never_connects(world: dict) -> None:
    with pytest.raises(TunnelError, match="not allowed"):
        await world["tunnel"].open_connection(host="127.0.0.1", port=world["forbidden_port"])
    assert world["forbidden"].count == 0


async def test_a_name_resolving_to_a_forbidden_address_is_refused(world: dict) -> None:
    # 10.0.0.0/8:22 is allowed, so a name on port 22 is resolved here; localhost is
    # 127.0.0.1 / ::1, outside the rule: refused after DNS, before any connection
    with pytest.raises(TunnelError, match="resolves to .*127.0.0.1.*not allowed"):
        await world["tunnel"].open_connection(host="localhost", port=22)


async def test_port_edges_around_an_allowed_port(world: dict) -> None:
    tunnel: Tunnel = world["tunnel"]
    p = world["allowed_port"]
    for port in (p - 1, p + 1, 0, 65535):
        with pytest.raises(TunnelError, match="not allowed|out of range"):
            await tunnel.open_connection(host="127.0.0.1", port=port)
    assert await _roundtrip(tunnel, b"", host="127.0.0.1", port=p) == b"allowed"
    assert world["allowed"].count == 1


async def test_refused_allowed_target_gets_its_reason(world: dict) -> None:
    with pytest.raises(TunnelError, match="refused the connection: .*[Rr]efused"):
        await world["tunnel"].open_connection(host="127.0.0.1", port=world["closed_port"])
    assert await _roundtrip(world["tunnel"], b"ok", service="echo") == b"ok"


async def test_oversized_datagrams_are_dropped_and_counted(world: dict) -> None:
    flow = await world["tunnel"].open_datagram("dns")
    limit = flow.max_payload
    assert 1100 < limit < FIXED.max_datagram  # one 1200-byte packet, less its headers
    assert not flow.send(b"x" * (limit + 1))  # too big for one frame: never fragmented
    assert flow.stats.dropped_too_big == 1
    # exactly the limit goes; its echo is 5 bytes longer, so the serving side drops it
    # on the way back (and counts it); the small one after it is what comes back
    assert flow.send(b"y" * limit)
    assert flow.send(b"z" * 100)
    assert await asyncio.wait_for(flow.recv(), 10) == b"echo:" + b"z" * 100
    assert flow.stats.datagrams_in == 2 and flow.stats.datagrams_out == 1
    flow.close()
