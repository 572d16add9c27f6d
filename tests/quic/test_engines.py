"""The QUIC engine choice (quictun/quic/engines.py): selection, both engines and mixed pairs
in memory, and the tunnel end to end on qh3 and on a mixed pair."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PY, Proc, TcpServer, base_env, hash_then_reply
from test_flow import (
    CLIENT,
    SERVER,
    STREAM_WINDOW,
    engine_params,
    exchange,
    make_pair,
    received,
    unconsumed_run,
    window_slack,
)

from quictun.proto.identity import Identity
from quictun.quic import engines
from quictun.quic.credit import ALPN_PLAIN, ALPNS, FLOW_CONTROL_ERROR

HAVE_QH3 = "qh3" in engines.available()
needs_qh3 = pytest.mark.skipif(not HAVE_QH3, reason="qh3 >= 2.1 is not installed "
                               "(pip install 'quictun[fast]')")
PAIRS = [(c, s) for c in engines.NAMES for s in engines.NAMES]


# -- selection --------------------------------------------------------------------------
def test_selection_by_name_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engines.select("aioquic").name == "aioquic"
    assert engines.select("AIOQUIC ").name == "aioquic"
    monkeypatch.delenv(engines.ENV, raising=False)
    assert engines.DEFAULT == "auto"  # unset: qh3 when installed ([fast]), else aioquic
    assert engines.select().name == ("qh3" if HAVE_QH3 else "aioquic")
    monkeypatch.setenv(engines.ENV, "aioquic")
    assert engines.select().name == "aioquic"
    monkeypatch.setenv(engines.ENV, "auto")
    assert engines.select().name == ("qh3" if HAVE_QH3 else "aioquic")
    with pytest.raises(ValueError, match="unknown QUIC engine"):
        engines.select("quiche")


@pytest.fixture
def fresh_engine_cache() -> Iterator[None]:
    engines.get.cache_clear()
    yield
    engines.get.cache_clear()


@needs_qh3
@pytest.mark.parametrize("version", ["2.2.0", "3.0.1", "2.0.9", "2.2.0rc1"])
def test_a_qh3_outside_2_1_is_refused_and_auto_falls_back(
        monkeypatch: pytest.MonkeyPatch, fresh_engine_cache: None, version: str) -> None:
    """flow.py reaches into qh3 2.1's private internals; another version is refused by
    name (one line) and ``auto`` (the default) takes aioquic instead."""
    import qh3

    monkeypatch.setattr(qh3, "__version__", version)
    with pytest.raises(engines.EngineUnavailable, match=rf"qh3 {version} is not supported.*< 2\.2"):
        engines.select("qh3")
    assert engines.select("auto").name == "aioquic"
    monkeypatch.delenv(engines.ENV, raising=False)
    assert engines.select().name == "aioquic"


def test_explicit_qh3_without_qh3_is_a_clear_error() -> None:
    if HAVE_QH3:
        assert engines.select("qh3").name == "qh3"
        assert engines.select("qh3").native_core
    else:
        with pytest.raises(engines.EngineUnavailable, match="qh3"):
            engines.select("qh3")


def test_long_header_parsing_is_the_same() -> None:
    dcid = os.urandom(8)
    initial = bytes([0xC0]) + (1).to_bytes(4, "big") + b"\x08" + dcid + b"\x00\x00\x40\x10"
    initial += os.urandom(1200)
    for name in engines.available():
        header = engines.get(name).pull_quic_header(initial, host_cid_length=8)
        assert header.destination_cid == dcid
        assert header.packet_type is not None


# -- in memory: handshake, pinning, flow control, on every pair --------------------------
def _pair_params() -> list[Any]:
    usable = set(engines.available())
    out = []
    for c, s in PAIRS:
        marks: list[Any] = []
        if not {c, s} <= usable:
            marks.append(pytest.mark.skip(reason="qh3 >= 2.1 is not installed"))
        out.append(pytest.param(c, s, id=f"{c}-client-{s}-server", marks=marks))
    return out


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_handshake_fingerprint_and_flow_control(client_name: str, server_name: str) -> None:
    ce, se = engines.get(client_name), engines.get(server_name)
    ident = Identity.generate()
    client, server = make_pair(ce, se, ident)
    exchange(client, server, 0.0)
    kinds = set()
    while (ev := client.next_event()) is not None:
        kinds.add(type(ev).__name__)
    assert "HandshakeCompleted" in kinds
    # the client pins the server's identity: SHA-256 of the Ed25519 SPKI
    assert ce.peer_fingerprint(client) == ident.fingerprint
    assert ce.peer_fingerprint(client) != Identity.generate().fingerprint
    # the server learns nothing from a client without a certificate
    assert se.peer_fingerprint(server) == ""
    # an unconsuming receiver bounds the sender, whichever engines
    got, _sid = unconsumed_run(client, server, rounds=30)
    assert 0 < got <= STREAM_WINDOW + window_slack(se)


@needs_qh3
def test_qh3_server_answers_a_zero_padded_initial_in_one_flight() -> None:
    """aioquic pads its Initial with zeros after the packet (515 of 1350 bytes). qh3
    2.1 credited only the packet against its anti-amplification limit (3 x 515 bytes,
    less than its first flight) and then raised 'packet builder capacity exhausted';
    quic/flow.py feeds such a datagram to the core whole (RFC 9000 8.1: it all counts)."""
    client, server = make_pair(engines.get("aioquic"), engines.get("qh3"))
    (first, _addr), = client.datagrams_to_send(0.0)
    assert len(first) >= 1200 and first.endswith(bytes(200))  # the case in question
    server.receive_datagram(first, CLIENT, 0.0)
    for d, _addr in server.datagrams_to_send(0.0):  # the whole first flight, no retry
        client.receive_datagram(d, SERVER, 0.0)
    kinds = set()
    while (ev := client.next_event()) is not None:
        kinds.add(type(ev).__name__)
    assert "HandshakeCompleted" in kinds


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_no_datagram_exceeds_the_configured_size(client_name: str, server_name: str) -> None:
    """QUIC talks to one virtual peer whatever the path, so an engine must not raise its
    datagram size on its own (qh3 clients probe up to 1472 bytes by default: a size
    confirmed over the relay black-holed on a smaller direct path; see the lab)."""
    client, server = make_pair(engines.get(client_name), engines.get(server_name))
    sizes: list[int] = []
    now = 0.0
    sid = None
    for i in range(300):
        for a, b, addr in ((client, server, CLIENT), (server, client, SERVER)):
            for d, _addr in a.datagrams_to_send(now):
                sizes.append(len(d))
                b.receive_datagram(d, addr, now)
        received(server, consume=True)
        received(client, consume=True)
        if i == 5:
            sid = client.get_next_available_stream_id()
            client.send_stream_data(sid, b"p" * STREAM_WINDOW, end_stream=True)
        now += 0.05  # long enough for probe timers, had they been armed
        client.handle_timer(now)
        server.handle_timer(now)
    assert sid is not None and len(sizes) > 1000
    assert max(sizes) <= 1350


@pytest.mark.parametrize("name", engine_params())
def test_only_decrypted_packets_count_as_authenticated(name: str) -> None:
    e = engines.get(name)
    client, server = make_pair(e, e)
    exchange(client, server, 0.0)
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"hello")
    (d, _addr), *_ = client.datagrams_to_send(1.0)
    forged = bytearray(d)
    forged[-3] ^= 0xFF
    before = server.authenticated_packets
    server.receive_datagram(bytes(forged), ("5.6.7.8", 9), 1.0)
    assert server.authenticated_packets == before
    server.receive_datagram(d, ("5.6.7.8", 9), 1.1)
    assert server.authenticated_packets > before
    assert server.stream_alive(sid)


def _stalled_stream_run(client_name: str, server_name: str,
                        alpn: str | tuple[str, ...] = ALPNS) -> tuple[int, int]:
    """Stream A is never consumed, stream B is: (bytes of A, bytes of B) that arrive."""
    client, server = make_pair(engines.get(client_name), engines.get(server_name), alpn=alpn)
    exchange(client, server, 0.0)
    received(client, consume=True)
    a = client.get_next_available_stream_id()
    client.send_stream_data(a, b"a" * (4 * STREAM_WINDOW))
    b = a + 4
    client.send_stream_data(b, b"b" * (3 * STREAM_WINDOW))
    got = {a: 0, b: 0}
    events = server.engine.events
    now = 1.0
    for _ in range(200):
        exchange(client, server, now)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived) and ev.data:
                server.delivered(ev.stream_id, len(ev.data))
                got[ev.stream_id] += len(ev.data)
                if ev.stream_id == b:
                    server.consume(b, len(ev.data))
        received(client, consume=True)
        now += 0.05
        client.handle_timer(now)
        server.handle_timer(now)
    return got[a], got[b]


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_a_stalled_stream_does_not_stall_the_others(client_name: str,
                                                    server_name: str) -> None:
    """quictun/1+credit: per-stream credit (quic/credit.py) also for qh3's native core, which
    grants QUIC credit as events are popped, in arrival order for all streams."""
    got_a, got_b = _stalled_stream_run(client_name, server_name)
    assert got_b == 3 * STREAM_WINDOW
    # ... while the stalled stream still holds no more than its window
    assert 0 < got_a <= STREAM_WINDOW


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_a_quictun1_peer_still_bounds_memory(client_name: str, server_name: str) -> None:
    """Against a quictun/1 peer (no credit stream), QUIC flow control alone bounds a
    stalled stream. A qh3 receiver then holds its core while one stream is full, so a
    stalled stream may stall the others there (the reason quictun/1+credit exists)."""
    got_a, got_b = _stalled_stream_run(client_name, server_name, alpn=ALPN_PLAIN)
    assert 0 < got_a <= STREAM_WINDOW + window_slack(engines.get(server_name))
    if not engines.get(server_name).native_core:
        assert got_b == 3 * STREAM_WINDOW


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_a_new_client_and_a_quictun1_server_agree_on_quictun1(client_name: str,
                                                              server_name: str) -> None:
    """A client offering quictun/1+credit and quictun/1 to a server that knows only
    quictun/1:
    no credit stream, and what the client held back for credit goes out after all."""
    client, server = make_pair(engines.get(client_name), engines.get(server_name),
                               server_alpn=ALPN_PLAIN)
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"x" * (3 * STREAM_WINDOW), end_stream=True)  # early
    got, now = 0, 0.0
    for _ in range(400):
        exchange(client, server, now)
        got += received(server, consume=True)
        received(client, consume=True)
        if got == 3 * STREAM_WINDOW:
            break
        now += 0.05
        client.handle_timer(now)
        server.handle_timer(now)
    assert got == 3 * STREAM_WINDOW
    assert client._send_credit is None and client._recv_credit is None
    assert client._my_credit_sid is None and server._my_credit_sid is None


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_the_credit_stream_is_hidden_and_other_uni_streams_pass(client_name: str,
                                                                server_name: str) -> None:
    client, server = make_pair(engines.get(client_name), engines.get(server_name))
    exchange(client, server, 0.0)
    received(client, consume=True)
    received(server, consume=True)
    bidi = client.get_next_available_stream_id()
    client.send_stream_data(bidi, b"hello")
    uni = client.get_next_available_stream_id(is_unidirectional=True)
    client.send_stream_data(uni, b'["candidate"]', end_stream=True)
    uni2 = uni + 4  # an update that arrives in two pieces, the second after the records
    client.send_stream_data(uni2, b"[")
    seen: dict[int, bytes] = {}
    events = server.engine.events
    now = 1.0
    for i in range(100):
        if i == 50:
            client.send_stream_data(uni2, b'"late"]', end_stream=True)
        exchange(client, server, now)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                server.delivered(ev.stream_id, len(ev.data))
                server.consume(ev.stream_id, len(ev.data))
                seen[ev.stream_id] = seen.get(ev.stream_id, b"") + ev.data
                if ev.stream_id == bidi and len(seen[bidi]) == 5:  # reply: 1 MiB
                    server.send_stream_data(bidi, b"r" * (2 * STREAM_WINDOW))
        received(client, consume=True)  # makes the client grant credit in band
        now += 0.05
        client.handle_timer(now)
        server.handle_timer(now)
    assert client._my_credit_sid is not None  # records were sent...
    assert server._peer_credit_sid == client._my_credit_sid
    assert set(seen) == {bidi, uni, uni2}  # ...and never shown to the application
    assert seen[uni] == b'["candidate"]' and seen[uni2] == b'["late"]'
    assert server._app_uni == set()  # finished application streams are not remembered


@needs_qh3
def test_a_peer_sending_beyond_its_credit_is_disconnected() -> None:
    """qh3's core would take whatever its popping granted; creditstream.py closes instead."""
    qh3 = engines.get("qh3")
    client, server = make_pair(qh3, qh3)
    exchange(client, server, 0.0)
    received(client, consume=True)
    received(server, consume=False)
    client._send_credit = None  # a peer that ignores the credit it was given
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"x" * (4 * STREAM_WINDOW))
    codes = []
    now = 1.0
    for _ in range(100):
        exchange(client, server, now)
        received(server, consume=False)
        while (ev := client.next_event()) is not None:
            if isinstance(ev, qh3.events.ConnectionTerminated):
                codes.append(ev.error_code)
        now += 0.05
        client.handle_timer(now)
        server.handle_timer(now)
    assert codes == [FLOW_CONTROL_ERROR]
    # the credit, plus what sat in the core when it closed (a closing core is drained)
    assert server._pending_total <= 2 * STREAM_WINDOW


# -- end to end: real processes on loopback -----------------------------------------------
QT = [PY, "-m", "quictun"]


@pytest.fixture
def spawn_on(tmp_path: Path) -> Iterator:
    procs: list[Proc] = []

    def _spawn(args: list[str], *, engine: str, home: str, name: str) -> Proc:
        env = base_env(tmp_path / home)
        env[engines.ENV] = engine
        p = Proc(QT + args, env=env, log=tmp_path / f"{name}.log")
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.stop()


def _five_mb_through(spawn_on, url: str, client_engine: str, server_engine: str) -> None:  # type: ignore[no-untyped-def]
    target = TcpServer(hash_then_reply)
    try:
        srv = spawn_on(["serve", "box", "--forward", f"127.0.0.1:{target.port}",
                        "--signal", url], engine=server_engine, home="srv", name="serve")
        srv.wait_for(r"serving 'box'")
        cli = spawn_on(["connect", "box", "--listen", "127.0.0.1:0", "--signal", url],
                       engine=client_engine, home="cli", name="connect")
        port = int(cli.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        payload = os.urandom(5 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            t = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            t.start()
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            t.join(60)
        assert reply.decode().split() == [hashlib.sha256(payload).hexdigest(),
                                          str(len(payload))], cli.text() + srv.text()
        srv.wait_for(r"client [0-9a-f]{16} connected")
        for p in (srv, cli):
            assert "Traceback" not in p.text(), p.text()
    finally:
        target.close()


@needs_qh3
def test_loopback_5mb_sha256_on_qh3(relay, spawn_on) -> None:  # type: ignore[no-untyped-def]
    _proc, url = relay
    _five_mb_through(spawn_on, url, "qh3", "qh3")


@needs_qh3
def test_loopback_mixed_qh3_client_aioquic_server(relay, spawn_on) -> None:  # type: ignore[no-untyped-def]
    _proc, url = relay
    _five_mb_through(spawn_on, url, "qh3", "aioquic")


@needs_qh3
def test_loopback_mixed_aioquic_client_qh3_server(relay, spawn_on) -> None:  # type: ignore[no-untyped-def]
    _proc, url = relay
    _five_mb_through(spawn_on, url, "aioquic", "qh3")


def _stall_or_hash(c: socket.socket) -> None:
    """First byte S: never read (a stalled reader); H: hash until EOF, then reply."""
    if c.recv(1) == b"S":
        threading.Event().wait(120)
    else:
        hash_then_reply(c)


@pytest.mark.parametrize(("client_engine", "server_engine"), _pair_params())
def test_loopback_a_stalled_connection_does_not_stall_another(
        relay, spawn_on, client_engine: str, server_engine: str) -> None:  # type: ignore[no-untyped-def]
    """Two connections through one tunnel; the target never reads the first. The second
    still moves 5 MB (with qh3 as receiver this needs the quictun/1+credit stream)."""
    _proc, url = relay
    target = TcpServer(_stall_or_hash)
    target.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no kernel slack
    try:
        srv = spawn_on(["serve", "box", "--forward", f"127.0.0.1:{target.port}",
                        "--signal", url], engine=server_engine, home="srv", name="serve")
        srv.wait_for(r"serving 'box'")
        cli = spawn_on(["connect", "box", "--listen", "127.0.0.1:0", "--signal", url],
                       engine=client_engine, home="cli", name="connect")
        port = int(cli.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        stalled = socket.create_connection(("127.0.0.1", port), timeout=60)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        # more than every buffer on the way (socket buffers, bridges, the stream window)
        pusher = threading.Thread(target=lambda: _send_quietly(stalled, b"S" + bytes(64 << 20)),
                                  daemon=True)
        pusher.start()
        deadline = time.monotonic() + 30  # until the stalled stream is full end to end
        while not _send_blocked(stalled):
            assert time.monotonic() < deadline and pusher.is_alive(), cli.text() + srv.text()
            time.sleep(0.1)
        payload = os.urandom(5 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"H" + payload)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.decode().split() == [hashlib.sha256(payload).hexdigest(),
                                          str(len(payload))], cli.text() + srv.text()
        assert pusher.is_alive()  # the first one still stalls (64 MiB fit in no buffer)
        stalled.close()
    finally:
        target.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def _send_blocked(sock: socket.socket) -> bool:
    """Whether the kernel holds unsent bytes of ``sock`` (its peer stopped reading)."""
    SIOCOUTQ = 0x5411
    import fcntl
    import struct

    buf = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4)
    return bool(struct.unpack("i", buf)[0] > 32768)
