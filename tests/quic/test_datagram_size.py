"""The QUIC datagram size follows the path (set_max_datagram_size), per engine.

aioquic changes it mid-connection and keeps the stream intact, capped by the peer's
max_udp_payload_size and aioquic's 2-byte frame lengths; qh3 keeps its configured size
(no binding changes it); the DATAGRAM frame limit (datagram_limit) follows the size.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from quictun.config import TunnelConfig
from quictun.proto.identity import Identity
from quictun.quic import engines
from quictun.quic.flow import AIOQUIC_MAX_DATAGRAM, MIN_DATAGRAM_SIZE, connection_class

CLIENT, SERVER = ("1.2.3.4", 1), ("5.6.7.8", 2)
CFG = TunnelConfig()


def needs_qh3() -> None:
    try:
        engines.get("qh3")
    except engines.EngineUnavailable as exc:
        pytest.skip(str(exc))


def pair(client_engine: str = "aioquic", server_engine: str = "aioquic",
         now: float = 0.0, peer: tuple[str, int] = SERVER) -> tuple[Any, Any]:
    ident = Identity.generate()
    kw = {"alpn": "t", "max_datagram_size": CFG.max_datagram,
          "max_stream_data": CFG.stream_window, "max_data": CFG.connection_window,
          "idle_timeout": 60.0, "max_datagram_frame_size": CFG.max_datagram_frame}
    ce, se = engines.get(client_engine), engines.get(server_engine)
    client = connection_class(ce)(configuration=ce.configuration(True, ident, **kw))
    server = connection_class(se)(
        configuration=se.configuration(False, ident, **kw),
        original_destination_connection_id=client.original_destination_connection_id)
    client.connect(peer, now=now)
    return client, server


def move(a: Any, b: Any, now: float, sizes: list[int]) -> None:
    """Datagrams both ways until quiet, noting the sizes a sent."""
    for _ in range(10_000):
        out_a = a.datagrams_to_send(now)
        for d, _addr in out_a:
            sizes.append(len(d))
            b.receive_datagram(d, CLIENT, now)
        out_b = b.datagrams_to_send(now)
        for d, _addr in out_b:
            a.receive_datagram(d, SERVER, now)
        if not out_a and not out_b:
            return
        now += 0.0005


def drain(conn: Any) -> tuple[bytes, list[bytes]]:
    """Stream bytes and DATAGRAM frames received (stream bytes consumed at once)."""
    out, frames = b"", []
    events = conn.engine.events
    while (ev := conn.next_event()) is not None:
        if isinstance(ev, events.StreamDataReceived) and ev.data:
            conn.delivered(ev.stream_id, len(ev.data))
            conn.consume(ev.stream_id, len(ev.data))
            out += ev.data
        elif isinstance(ev, events.DatagramFrameReceived):
            frames.append(ev.data)
    return out, frames


def push(client: Any, server: Any, data: bytes, now: float) -> tuple[bytes, list[int]]:
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, data, end_stream=True)
    got, sizes = b"", []
    for i in range(400):
        move(client, server, now + i * 0.01, sizes)
        got += drain(server)[0]
        drain(client)
        if len(got) == len(data):
            break
    return got, sizes


@pytest.mark.parametrize("size", [1252, 1472, 8972, AIOQUIC_MAX_DATAGRAM])
def test_aioquic_grows_mid_connection(size: int) -> None:
    client, server = pair()
    move(client, server, 0.0, [])
    drain(client), drain(server)
    assert client.set_max_datagram_size(size) == size
    data = os.urandom(3 * 1024 * 1024)
    got, sizes = push(client, server, data, 1.0)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert max(sizes) == size  # full datagrams use the new size, never more


def test_aioquic_shrinks_mid_stream_and_loses_nothing() -> None:
    client, server = pair()
    move(client, server, 0.0, [])
    client.set_max_datagram_size(8972)
    sid = client.get_next_available_stream_id()
    data = os.urandom(2 * 1024 * 1024)
    client.send_stream_data(sid, data, end_stream=True)
    now, got = 1.0, b""
    # the first flight at 8972 bytes is lost in a black hole ...
    lost = client.datagrams_to_send(now)
    assert lost and max(len(d) for d, _addr in lost) == 8972
    client.set_max_datagram_size(MIN_DATAGRAM_SIZE)  # ... and the path falls back
    sizes: list[int] = []
    for _ in range(3000):
        now += 0.01
        client.handle_timer(now)  # retransmissions after the probe timeout
        move(client, server, now, sizes)
        got += drain(server)[0]
        drain(client)
        if len(got) == len(data):
            break
    assert got == data
    assert sizes and max(sizes) <= MIN_DATAGRAM_SIZE


def test_aioquic_caps_at_floor_frame_limit_and_peer_limit() -> None:
    client, server = pair()
    assert client.set_max_datagram_size(500) == MIN_DATAGRAM_SIZE
    assert client.set_max_datagram_size(65000) == AIOQUIC_MAX_DATAGRAM
    move(client, server, 0.0, [])
    server.peer_max_udp_payload = 1472  # what a qh3 client announces
    assert server.set_max_datagram_size(9000) == 1472


def test_datagram_frame_limit_follows_the_size() -> None:
    client, server = pair()
    move(client, server, 0.0, [])
    drain(client), drain(server)
    small = client.datagram_limit()
    assert 1100 < small < MIN_DATAGRAM_SIZE
    client.set_max_datagram_size(8972)
    big = client.datagram_limit()
    assert big - small == 8972 - MIN_DATAGRAM_SIZE
    frame = os.urandom(big)
    client.send_datagram_frame(frame)  # exactly the limit: one packet of 8972 bytes
    sizes: list[int] = []
    move(client, server, 1.0, sizes)
    assert drain(server)[1] == [frame] and max(sizes) == 8972
    client.set_max_datagram_size(MIN_DATAGRAM_SIZE)  # a black hole: back to 1200
    assert client.datagram_limit() == small


def test_aioquic_learns_the_peer_max_udp_payload_from_qh3() -> None:
    needs_qh3()
    client, server = pair("qh3", "aioquic")
    move(client, server, 0.0, [])
    assert server.peer_max_udp_payload == 1472  # qh3 clients announce it
    assert server.set_max_datagram_size(8972) == 1472


def test_qh3_keeps_its_size() -> None:
    needs_qh3()
    client, server = pair("qh3", "qh3")
    move(client, server, 0.0, [])
    drain(client), drain(server)
    limit = client.datagram_limit()
    assert client.set_max_datagram_size(1472) == MIN_DATAGRAM_SIZE
    assert client.datagram_limit() == limit  # the frame limit did not move either
    assert client._configuration.probe_datagram_size is False  # no blind search of its own
    got, sizes = push(client, server, os.urandom(500_000), 1.0)
    assert len(got) == 500_000 and max(sizes) <= MIN_DATAGRAM_SIZE


def test_pto_count_counts_probe_timeouts() -> None:
    for name in engines.available():
        client, server = pair(name, name)
        move(client, server, 0.0, [])
        assert client.pto_count() == 0
        client.send_stream_data(client.get_next_available_stream_id(), b"x" * 5000)
        now = 1.0
        client.datagrams_to_send(now)  # lost: nothing is acknowledged
        for _ in range(50):
            now = max(now, client.get_timer() or now)
            client.handle_timer(now)
            client.datagrams_to_send(now)
            if client.pto_count() >= 2:
                break
        assert client.pto_count() >= 2, name  # what QuicDriver.on_stall watches
