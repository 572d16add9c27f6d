"""quictun.aio.udpio on real loopback sockets: GSO runs, GRO splitting, fallbacks.

The kernel's answers are real; only the "kernel refuses GSO" case needs a socket whose
``sendmsg`` fails the way a device without checksum offload makes it fail (EIO).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import time
from collections.abc import Iterator

import pytest

from quictun.aio.udp import UdpEndpoint
from quictun.aio.udpio import GSO_MAX_SEGMENTS, NO_OFFLOAD, Offload, UdpIO, route_mtu
from quictun.config import OFFLOAD_ENV, OFFLOADS, TunnelConfig

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="UDP GSO/GRO and IP_MTU are Linux features")


def _sock(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    s.setblocking(False)
    return s


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = _sock(), _sock()
    yield a, b
    a.close()
    b.close()


def receive_all(io: UdpIO, want: int, timeout: float = 2.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        io.receive(lambda data, addr: got.append(data), 64)
        time.sleep(0.005)
    return got


def datagrams(sizes: list[int]) -> list[bytes]:
    return [bytes([i % 251]) * n for i, n in enumerate(sizes)]


SIZES = [1400] * 20 + [900] + [1400] * 3 + [500, 500] + [1200]


@pytest.mark.parametrize("offload", [Offload(), Offload(gso=False, gro=False),
                                     Offload(gso=True, gro=False),
                                     Offload(gso=False, gro=True)],
                         ids=["gso+gro", "none", "gso", "gro"])
def test_every_datagram_arrives_in_order(pair: tuple[socket.socket, socket.socket],
                                         offload: Offload) -> None:
    a, b = pair
    tx, rx = UdpIO(a, offload), UdpIO(b, offload)
    sent = datagrams(SIZES)
    tx.send(sent, b.getsockname())
    assert receive_all(rx, len(sent)) == sent
    assert tx.stats["datagrams_sent"] == rx.stats["datagrams_received"] == len(sent)
    if tx.gso:
        # [1400]*20+[900] | [1400]*3+[500] | [500] | [1200]: 4 calls instead of 27
        assert tx.stats["send_calls"] == 4 and tx.stats["gso_sends"] == 2
    else:
        assert tx.stats["send_calls"] == len(sent)


@linux
def test_gso_and_gro_cut_system_calls(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    tx, rx = UdpIO(a, Offload()), UdpIO(b, Offload())
    if not (tx.gso and rx.gro):
        pytest.skip("this kernel has no UDP GSO/GRO")
    sent = datagrams([1472] * 40)
    tx.send(sent, b.getsockname())
    assert receive_all(rx, 40) == sent
    assert tx.stats["send_calls"] == 1
    assert rx.stats["recv_calls"] < 40 and rx.stats["gro_buffers"] >= 1  # loopback keeps it


def test_long_runs_are_cut_at_the_segment_limit(pair: tuple[socket.socket, socket.socket],
                                               ) -> None:
    a, b = pair
    tx, rx = UdpIO(a, Offload(gso=True, gro=False)), UdpIO(b, Offload(gso=False, gro=False))
    n = GSO_MAX_SEGMENTS + 10
    sent = datagrams([1000] * n)
    tx.send(sent, b.getsockname())
    assert receive_all(rx, n) == sent
    if tx.gso:
        assert tx.stats["send_calls"] == 2


class _NoGsoSocket(socket.socket):
    """A real socket whose kernel 'refuses' GSO like a device without checksum offload."""

    def sendmsg(self, *args: object, **kw: object) -> int:  # type: ignore[override]
        raise OSError(errno.EIO, "Input/output error")


def test_gso_refused_falls_back_to_single_sends() -> None:
    a = _NoGsoSocket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    a.setblocking(False)
    b = _sock()
    try:
        tx, rx = UdpIO(a, Offload()), UdpIO(b, Offload(gso=False, gro=False))
        tx.gso = True  # as if the kernel had accepted UDP_SEGMENT at setup
        sent = datagrams([1400] * 10)
        tx.send(sent, b.getsockname())
        assert tx.gso is False  # off for good on this socket
        assert receive_all(rx, 10) == sent
        tx.send(sent, b.getsockname())
        assert receive_all(rx, 10) == sent
    finally:
        a.close()
        b.close()


def test_oversized_datagram_is_reported(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    refused: list[tuple[tuple, int]] = []
    tx = UdpIO(a, Offload(), on_too_big=lambda addr, n: refused.append((addr, n)))
    tx.send([bytes(65508)], b.getsockname())  # over IPv4's 65507-byte UDP limit
    assert refused == [(b.getsockname(), 65508)]
    tx.send([bytes(100)], b.getsockname())  # the socket still works
    assert receive_all(UdpIO(b, Offload()), 1) == [bytes(100)]


@linux
def test_dont_fragment_is_set(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    io = UdpIO(a, Offload())
    assert io.dont_fragment
    assert a.getsockopt(socket.IPPROTO_IP, 10) == 3  # IP_MTU_DISCOVER = IP_PMTUDISC_PROBE


@linux
def test_route_mtu_of_loopback() -> None:
    assert route_mtu(("127.0.0.1", 9)) in (65535, 65536)
    if socket.has_ipv6:
        assert route_mtu(("::1", 9)) == 65536


def test_offload_setting_and_environment() -> None:
    assert TunnelConfig().udp_offload == "auto"
    assert Offload.named("auto") == Offload()
    assert Offload.named("off") == NO_OFFLOAD
    assert Offload.named("gso") == Offload(gso=True, gro=False)
    assert Offload.named("gro") == Offload(gso=False, gro=True)
    for name in OFFLOADS:
        assert TunnelConfig.from_environment({OFFLOAD_ENV: name.upper()}).udp_offload == name
    assert TunnelConfig.from_environment({}).udp_offload == "auto"
    with pytest.raises(ValueError, match="unknown UDP offload 'nonsense'.*QUICTUN_UDP_OFFL"):
        TunnelConfig.from_environment({OFFLOAD_ENV: "nonsense"})
    with pytest.raises(ValueError):
        Offload.named("fast")


@linux
def test_offloads_can_be_turned_off_again(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    tx, rx = UdpIO(a, Offload()), UdpIO(b, Offload())
    if not (tx.gso and rx.gro):
        pytest.skip("this kernel has no UDP GSO/GRO")
    tx.configure(NO_OFFLOAD)
    rx.configure(NO_OFFLOAD)
    assert not tx.gso and not rx.gro
    sent = datagrams([1472] * 10)
    tx.send(sent, b.getsockname())
    assert receive_all(rx, 10) == sent
    assert tx.stats["send_calls"] == 10 and rx.stats["gro_buffers"] == 0


async def test_a_new_endpoint_uses_no_offload_until_asked() -> None:
    ep = UdpEndpoint.open("127.0.0.1")
    kernel = UdpIO(_sock(), Offload())  # what this kernel accepts
    try:
        assert ep.io is not None and not ep.io.gso and not ep.io.gro
        ep.set_offload(Offload())
        assert (ep.io.gso, ep.io.gro) == (kernel.gso, kernel.gro)
        ep.set_offload(Offload.named("gro"))
        assert (ep.io.gso, ep.io.gro) == (False, kernel.gro)
    finally:
        ep.close()
        kernel.sock.close()


async def test_endpoint_send_many_to_ipv4_from_dual_stack() -> None:
    ep = UdpEndpoint.open()
    ep.set_offload(Offload())
    got: list[bytes] = []
    peer = UdpEndpoint.open("127.0.0.1")
    peer.on_quic = lambda data, addr: got.append(data)
    try:
        sent = [b"\x40" + bytes([i]) * 1300 for i in range(12)]
        ep.send_many(sent, ("127.0.0.1", peer.port))
        for _ in range(100):
            if len(got) == len(sent):
                break
            await asyncio.sleep(0.01)
        assert got == sent
    finally:
        ep.close()
        peer.close()
