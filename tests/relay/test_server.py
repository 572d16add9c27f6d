"""Integration tests: the real RelayServer on 127.0.0.1, real websockets clients, real UDP.

Every bad-input test ends by checking that a well-behaved pair of clients can still
register, connect, answer and relay a binary frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from helpers import signed_register
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from quictun.proto import signalling as sp
from quictun.proto import stun
from signal_server.server import RelayConfig, RelayServer
from signal_server.types import MatchmakerConfig

pytestmark = pytest.mark.timeout(60)

OWNER = "cd" * 32


@pytest.fixture
async def relay(caplog: pytest.LogCaptureFixture) -> AsyncIterator[RelayServer]:
    caplog.set_level(logging.INFO)
    server = RelayServer(RelayConfig(host="127.0.0.1", port=0, max_per_ip=8))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    # Client mistakes must never produce tracebacks.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def open_client(server: RelayServer, hello: bool = True, token: str | None = None):
    ws = await connect(server.url, proxy=None, open_timeout=10)
    if hello:
        await ws.send(sp.encode(sp.Hello(v=2, token=token, agent="pytest")))
        welcome = await recv(ws)
        assert isinstance(welcome, sp.Welcome), welcome
        ws.challenge = welcome.challenge  # type: ignore[attr-defined]
    return ws


async def recv(ws: ClientConnection) -> sp.Message:
    data = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(data, str), data
    return sp.decode(data)


async def expect_error(ws: ClientConnection, code: str) -> sp.Error:
    msg = await recv(ws)
    assert isinstance(msg, sp.Error) and msg.code == code, msg
    return msg


async def expect_closed(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code


async def check_pair_works(
    server: RelayServer, owner_token: str | None = None, connector_token: str | None = None
) -> None:
    """A well-behaved owner and connector can meet and relay through the server."""
    owner = await open_client(server, token=owner_token)
    connector = await open_client(server, token=connector_token)
    name = "ok-" + os.urandom(4).hex()
    try:
        await owner.send(sp.encode(signed_register(name, OWNER, owner.challenge)))
        assert await recv(owner) == sp.Registered(name)
        await connector.send(sp.encode(sp.Connect(name=name, offer={"c": [1]})))
        incoming = await recv(owner)
        assert isinstance(incoming, sp.Incoming) and incoming.offer == {"c": [1]}
        sid = incoming.session
        await owner.send(sp.encode(sp.Answer(session=sid, answer={"a": 1})))
        assert await recv(connector) == sp.Answer(sid, {"a": 1})
        assert await recv(owner) == sp.Go(sid)
        frame = sp.encode_relay(sid, b"\xc0" + os.urandom(1200))
        await connector.send(frame)
        assert await asyncio.wait_for(owner.recv(), 10) == frame
        await owner.send(sp.encode_relay(sid, b"\x40back"))
        assert await asyncio.wait_for(connector.recv(), 10) == sp.encode_relay(sid, b"\x40back")
        await connector.send(sp.encode(sp.Close(session=sid, reason="done")))
        assert await recv(owner) == sp.Closed(sid, "done")
    finally:
        await owner.close()
        await connector.close()


async def http_get(port: int, path: str, raw: bytes | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw or f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    return data


def stun_exchange(port: int, junk: list[bytes]) -> tuple[stun.StunMessage, tuple[str, int]]:
    """Send junk datagrams then a Binding request; return the first reply and our addr."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.1", 0))
        for datagram in junk:
            sock.sendto(datagram, ("127.0.0.1", port))
        txid = os.urandom(12)
        sock.sendto(stun.binding_request(txid), ("127.0.0.1", port))
        reply, _ = sock.recvfrom(2048)
        msg = stun.decode(reply)
        assert msg.txid == txid, "a junk datagram was answered"
        return msg, sock.getsockname()


# --- happy paths ---------------------------------------------------------------------


async def test_pair_and_stats(relay: RelayServer) -> None:
    assert relay.url == f"ws://127.0.0.1:{relay.port}/"
    assert relay.stun_ports[0] == relay.port and relay.stun_ports[1] not in (0, relay.port)
    ws = await connect(relay.url, proxy=None)
    await ws.send(sp.encode(sp.Hello(v=1, token=None, agent="t")))
    welcome = await recv(ws)
    assert isinstance(welcome, sp.Welcome)
    assert welcome.stun == list(relay.stun_ports) and welcome.relay is True
    assert welcome.addr == f"127.0.0.1:{ws.local_address[1]}"
    await ws.send(sp.encode(sp.Ping(7)))
    assert await recv(ws) == sp.Pong(7)
    await ws.close()
    await check_pair_works(relay)
    assert relay.stats["relayed_bytes"] == 1201 + 5
    assert relay.stats["sessions_total"] == 1


async def test_stun_on_both_ports(relay: RelayServer) -> None:
    for port in relay.stun_ports:
        msg, addr = await asyncio.to_thread(stun_exchange, port, [])
        assert msg.msg_type == stun.BINDING_SUCCESS
        assert msg.xor_mapped_address == addr


async def test_healthz_and_plain_http(relay: RelayServer) -> None:
    data = await http_get(relay.port, "/healthz")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"OK\n")
    data = await http_get(relay.port, "/")
    assert re.match(rb"HTTP/1.1 4\d\d", data), data[:40]
    await check_pair_works(relay)


# --- bad input -----------------------------------------------------------------------


async def test_random_bytes_on_udp(relay: RelayServer) -> None:
    junk = [os.urandom(n) for n in (1, 19, 20, 100, 548)]
    junk.append(stun.binding_success(os.urandom(12), ("1.2.3.4", 5)))  # not a request
    fake = bytearray(stun.binding_request(os.urandom(12)))
    fake[-1] ^= 0xFF  # bad fingerprint
    junk.append(bytes(fake))
    for port in relay.stun_ports:
        msg, addr = await asyncio.to_thread(stun_exchange, port, junk)
        assert msg.xor_mapped_address == addr
    await check_pair_works(relay)


async def test_random_bytes_on_tcp(relay: RelayServer) -> None:
    data = await http_get(relay.port, "", raw=os.urandom(4096))
    assert data == b"" or data.startswith(b"HTTP/1.1 4")
    data = await http_get(relay.port, "", raw=b"GET / HTTP/1.1\r\n" + os.urandom(300) + b"\r\n\r\n")
    assert data == b"" or data.startswith(b"HTTP/1.1 4")
    await check_pair_works(relay)


async def test_oversized_frames(relay: RelayServer) -> None:
    ws = await open_client(relay)
    # Over the protocol limit but under the frame limit: an error, connection stays.
    await ws.send(json.dumps({"t": "ping", "id": 1, "pad": "x" * (sp.MAX_MESSAGE_SIZE + 10)}))
    await expect_error(ws, "too-large")
    await ws.send(sp.encode(sp.Ping(2)))
    assert await recv(ws) == sp.Pong(2)
    # Over the WebSocket max_size: the server closes with 1009.
    await ws.send("x" * (relay.config.max_size + 1))
    assert await expect_closed(ws) == 1009
    await check_pair_works(relay)


async def test_malformed_unknown_and_out_of_order(relay: RelayServer) -> None:
    ws = await open_client(relay)
    await ws.send("{not json")
    assert "invalid JSON" in (await expect_error(ws, "bad-message")).message
    await ws.send('{"t":"teleport"}')
    assert "teleport" in (await expect_error(ws, "bad-message")).message
    await ws.send(sp.encode(sp.Answer(session=12345, answer={})))
    await expect_error(ws, "no-such-session")
    await ws.send(sp.encode(sp.Connect(name="nobody-here", offer={})))
    assert "nobody-here" in (await expect_error(ws, "no-such-name")).message
    await ws.send(b"\x09garbage")
    await expect_error(ws, "bad-message")
    await ws.close()
    # Out of order: register before hello is fatal.
    ws = await open_client(relay, hello=False)
    await ws.send(sp.encode(sp.Register(name="early", key="00" * 32, sig="00" * 64)))
    await expect_error(ws, "hello-required")
    assert await expect_closed(ws) == 1008
    await check_pair_works(relay)


async def test_garbage_flood_disconnects(relay: RelayServer) -> None:
    ws = await open_client(relay)
    for _ in range(relay.config.matchmaker.max_errors):
        await ws.send("[]")
    for _ in range(relay.config.matchmaker.max_errors):
        await expect_error(ws, "bad-message")
    assert await expect_closed(ws) == 1008
    await check_pair_works(relay)


async def test_per_ip_cap(relay: RelayServer) -> None:
    clients = [await open_client(relay, hello=False) for _ in range(relay.config.max_per_ip)]
    with pytest.raises(InvalidStatus) as info:
        await connect(relay.url, proxy=None)
    assert info.value.response.status_code == 429
    assert (await http_get(relay.port, "/healthz")).startswith(b"HTTP/1.1 200")
    for ws in clients:
        await ws.close()
    await check_pair_works(relay)


# --- configuration -------------------------------------------------------------------


async def test_token_and_hello_timeout() -> None:
    config = RelayConfig(host="127.0.0.1", port=0,
                         matchmaker=MatchmakerConfig(token="t0ken", hello_timeout=0.3))
    async with RelayServer(config) as server:
        ws = await open_client(server, hello=False)
        await ws.send(sp.encode(sp.Hello(v=1, token="nope", agent="t")))
        err = await expect_error(ws, "unauthorized")
        assert "token" in err.message
        assert await expect_closed(ws) == 1008
        ws = await open_client(server, hello=False)
        await expect_error(ws, "timeout")  # silent client
        assert await expect_closed(ws) == 1008
        await check_pair_works(server, owner_token="t0ken", connector_token="t0ken")


async def test_token_restricts_register_not_connect(caplog: pytest.LogCaptureFixture) -> None:
    """With a token-protected relay, a client without the token (a pasted ticket) can
    reach a name a token holder registered, but cannot register one itself."""
    caplog.set_level(logging.INFO)
    config = RelayConfig(host="127.0.0.1", port=0, matchmaker=MatchmakerConfig(token="t0ken"))
    async with RelayServer(config) as server:
        # The token-less connector pairs with the token-holding owner, relay included.
        await check_pair_works(server, owner_token="t0ken", connector_token=None)
        # A token-less register is refused, the connection stays, the name stays free.
        squatter = await open_client(server)
        await squatter.send(sp.encode(signed_register("squat", OWNER, squatter.challenge)))
        err = await expect_error(squatter, "unauthorized")
        assert "QUICTUN_SIGNAL_TOKEN" in err.message
        await squatter.send(sp.encode(sp.Connect(name="squat", offer={})))
        await expect_error(squatter, "no-such-name")
        # ... and the relay keeps serving others while it is connected.
        await check_pair_works(server, owner_token="t0ken", connector_token=None)
        await squatter.send(sp.encode(sp.Ping(5)))
        assert await recv(squatter) == sp.Pong(5)
        await squatter.close()
        # A wrong token is still refused at hello.
        ws = await open_client(server, hello=False)
        await ws.send(sp.encode(sp.Hello(v=1, token="t0ken-not", agent="t")))
        await expect_error(ws, "unauthorized")
        assert await expect_closed(ws) == 1008
        assert server.stats["relayed_bytes"] > 0
    assert not [r for r in caplog.records if r.exc_info]


async def test_no_relay() -> None:
    async with RelayServer(RelayConfig(host="127.0.0.1", port=0,
                                       matchmaker=MatchmakerConfig(relay_enabled=False))) as server:
        owner = await open_client(server)
        connector = await open_client(server)
        await owner.send(sp.encode(signed_register("srv", OWNER, owner.challenge)))
        await recv(owner)
        await connector.send(sp.encode(sp.Connect(name="srv", offer={})))
        sid = (await recv(owner)).session  # type: ignore[union-attr]
        await owner.send(sp.encode(sp.Answer(session=sid, answer={})))
        await recv(connector)
        await connector.send(sp.encode_relay(sid, b"x"))
        await expect_error(connector, "relay-disabled")
        await owner.send(sp.encode(sp.Ping(1)))
        assert await recv(owner) == sp.Go(sid)
        assert await recv(owner) == sp.Pong(1)  # nothing relayed in between
        assert server.stats["relayed_bytes"] == 0


async def test_disconnect_notifies_peer(relay: RelayServer) -> None:
    owner = await open_client(relay)
    connector = await open_client(relay)
    await owner.send(sp.encode(signed_register("srv", OWNER, owner.challenge)))
    await recv(owner)
    await connector.send(sp.encode(sp.Connect(name="srv", offer={})))
    sid = (await recv(owner)).session  # type: ignore[union-attr]
    await owner.close()
    assert await recv(connector) == sp.Closed(sid, "peer disconnected")
    await connector.close()


async def test_console_script_subprocess(tmp_path: object) -> None:
    exe = shutil.which("quictun-signal")
    cmd = [exe] if exe else [sys.executable, "-m", "signal_server"]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "QUICTUN_SIGNAL_TOKEN": "abc"},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/ \(stun udp (\d+), (\d+)\)", line)
        assert match, line
        port = int(match.group(1))
        assert int(match.group(2)) == port
        assert (await http_get(port, "/healthz")).startswith(b"HTTP/1.1 200")
        # The token came from the environment.
        async with connect(f"ws://127.0.0.1:{port}/", proxy=None) as ws:
            await ws.send(sp.encode(sp.Hello(v=1, token="abc", agent="t")))
            assert isinstance(await recv(ws), sp.Welcome)
    finally:
        proc.terminate()
        await proc.wait()


def test_cli_help_and_usage_errors() -> None:
    from click.testing import CliRunner

    from signal_server.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "QUICTUN_SIGNAL_TOKEN" in result.output
    result = CliRunner().invoke(main, ["--token", "a", "--token-file", __file__])
    assert result.exit_code == 2


def test_version_and_busy_port_are_one_line() -> None:
    from click.testing import CliRunner

    from signal_server.cli import main

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("quictun-signal, version ")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["--host", "127.0.0.1", "--port", str(port)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith("quictun-signal: error: cannot listen on 127.0.0.1 port ")
    assert "already in use" in result.output and "another --port" in result.output


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_wss_with_make_certs_script(tmp_path: pathlib.Path) -> None:
    import ssl

    script = pathlib.Path(__file__).resolve().parents[2] / "certs" / "make-certs.sh"
    subprocess.run(["sh", str(script), "localhost", str(tmp_path)], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "relay.crt", tmp_path / "relay.key")
    config = RelayConfig(host="127.0.0.1", port=0, ssl_context=server_ctx)
    async with RelayServer(config) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        client_ctx = ssl.create_default_context(cafile=str(tmp_path / "relay.crt"))
        async with connect(server.url, proxy=None, ssl=client_ctx) as ws:
            await ws.send(sp.encode(sp.Hello(v=1, token=None, agent="t")))
            assert isinstance(await recv(ws), sp.Welcome)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
async def test_default_host_is_dual_stack() -> None:
    async with RelayServer(RelayConfig(host=None, port=0)) as server:
        assert server.hosts == ["0.0.0.0", "::"]
        for url in (f"ws://127.0.0.1:{server.port}/", f"ws://[::1]:{server.port}/"):
            async with connect(url, proxy=None) as ws:
                await ws.send(sp.encode(sp.Hello(v=1, token=None, agent="t")))
                welcome = await recv(ws)
                assert isinstance(welcome, sp.Welcome)
                assert welcome.addr.endswith(f":{ws.local_address[1]}")

        def stun6(port: int) -> tuple[tuple[str, int] | None, tuple[str, int]]:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                sock.settimeout(10)
                sock.bind(("::1", 0))
                txid = os.urandom(12)
                sock.sendto(stun.binding_request(txid), ("::1", port))
                reply = stun.decode(sock.recvfrom(2048)[0])
                return reply.xor_mapped_address, sock.getsockname()[:2]

        for port in server.stun_ports:
            mapped, own = await asyncio.to_thread(stun6, port)
            assert mapped == own
