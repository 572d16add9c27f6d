"""Receive windows follow the application (no unbounded buffering in aioquic)."""

from __future__ import annotations

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

from quictun.identity import Identity
from quictun.quicconn import CONNECTION_WINDOW, STREAM_WINDOW, FlowControlledConnection

CLIENT, SERVER = ("1.2.3.4", 1), ("5.6.7.8", 2)


def _pair() -> tuple[FlowControlledConnection, FlowControlledConnection]:
    ident = Identity.generate()
    kw = {"alpn_protocols": ["t"], "max_stream_data": STREAM_WINDOW,
          "max_data": CONNECTION_WINDOW}
    ccfg = QuicConfiguration(is_client=True, **kw)
    ccfg.verify_mode = 0
    scfg = QuicConfiguration(is_client=False, certificate=ident.certificate,
                             private_key=ident.private_key, **kw)
    client = FlowControlledConnection(configuration=ccfg)
    server = FlowControlledConnection(configuration=scfg,
                                      original_destination_connection_id=client.original_destination_connection_id)
    client.connect(SERVER, now=0.0)
    return client, server


def _exchange(a: FlowControlledConnection, b: FlowControlledConnection, now: float) -> int:
    """Move datagrams both ways until quiet; returns bytes moved."""
    moved = 0
    for _ in range(10_000):
        out_a = a.datagrams_to_send(now)
        for d, _addr in out_a:
            b.receive_datagram(d, CLIENT, now)
            moved += len(d)
        out_b = b.datagrams_to_send(now)
        for d, _addr in out_b:
            a.receive_datagram(d, SERVER, now)
            moved += len(d)
        if not out_a and not out_b:
            break
        now += 0.001
    return moved


def _received(conn: FlowControlledConnection, consume: bool) -> int:
    n = 0
    while (ev := conn.next_event()) is not None:
        if isinstance(ev, StreamDataReceived) and ev.data:
            conn.delivered(ev.stream_id, len(ev.data))
            if consume:
                conn.consume(ev.stream_id, len(ev.data))
            n += len(ev.data)
    return n


def test_unconsumed_data_stops_the_sender_at_the_window() -> None:
    client, server = _pair()
    _exchange(client, server, 0.0)
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"x" * (8 * STREAM_WINDOW))
    got = 0
    now = 1.0
    for _ in range(50):
        _exchange(client, server, now)
        got += _received(server, consume=False)
        _received(client, consume=False)
        now += 0.5
        client.handle_timer(now)
        server.handle_timer(now)
    # stock aioquic would have doubled its window and taken everything
    assert 0 < got <= STREAM_WINDOW
    assert client.unacked(sid) >= 8 * STREAM_WINDOW - STREAM_WINDOW


def test_consumed_data_keeps_flowing_to_the_end() -> None:
    client, server = _pair()
    _exchange(client, server, 0.0)
    sid = client.get_next_available_stream_id()
    total = 6 * STREAM_WINDOW
    client.send_stream_data(sid, b"y" * total, end_stream=True)
    got = 0
    now = 1.0
    for _ in range(400):
        _exchange(client, server, now)
        got += _received(server, consume=True)
        _received(client, consume=True)
        if got == total:
            break
        now += 0.05
        client.handle_timer(now)
        server.handle_timer(now)
    assert got == total


def test_forgotten_stream_releases_connection_credit() -> None:
    client, server = _pair()
    _exchange(client, server, 0.0)
    server.delivered(0, 1000)
    assert server._pending_total == 1000
    server.forget_stream(0)
    assert server._pending_total == 0
