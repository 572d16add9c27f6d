"""The library API in one process: a real relay, quictun.serve as a task, quictun.connect."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import signed_register
from websockets.asyncio.client import connect as ws_connect

import quictun
from quictun.errors import AuthError, TunnelError
from quictun.proto import signalling as sigproto
from quictun.proto.identity import Identity
from signal_server.server import RelayConfig, RelayServer
from signal_server.types import MatchmakerConfig


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


EVENTS: list[str] = []  # the env server's event lines, per test


@pytest.fixture
async def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    server_id = Identity.generate()
    EVENTS.clear()
    task = asyncio.create_task(quictun.serve(
        "lib", forward=f"127.0.0.1:{port}", signal=relay.url, secret="lib-secret",
        identity=server_id, on_event=EVENTS.append))
    # wait until the name is registered: a connect before that gets no-such-name
    for _ in range(100):
        if relay.stats.get("names", 0) >= 1:
            break
        await asyncio.sleep(0.05)
    try:
        yield relay, server_id
    finally:
        task.cancel()
        with __import__("contextlib").suppress(asyncio.CancelledError):
            await task
        target.close()
        await relay.stop()


async def test_many_connections_over_one_tunnel(env) -> None:  # type: ignore[no-untyped-def]
    relay, _ = env
    async with quictun.connect("lib", signal=relay.url, secret="lib-secret",
                               identity=Identity.generate(), on_status=lambda s: None) as tunnel:

        async def one(i: int) -> bool:
            reader, writer = await tunnel.open_connection()
            payload = os.urandom(50_000 + i)
            writer.write(payload)
            writer.write_eof()
            got = await reader.read(-1)
            writer.close()
            return hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

        results = await asyncio.gather(*(one(i) for i in range(10)))
        assert all(results)
        assert tunnel.path is not None


async def _until(pred, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_wrong_secret_raises_a_clear_error_and_costs_a_guess(env) -> None:  # type: ignore[no-untyped-def]
    """The client learns "wrong" from a box that does not open; the server charges the
    exchange to its guess throttle (and logs it), and nothing else happens."""
    relay, _ = env
    with pytest.raises(AuthError, match="does not open with our secret.*wrong secret") as exc:
        async with quictun.connect("lib", signal=relay.url, secret="nope",
                                   identity=Identity.generate(), on_status=lambda s: None):
            pass
    assert exc.value.permanent  # connect --listen stops retrying
    await _until(lambda: any("failed exchange on 'lib' (strangers" in e for e in EVENTS),
                 "the failed exchange")
    assert not any("connected" in e for e in EVENTS)


async def _rejecting_owner(url: str, name: str, reason: str, code: str | None,
                           ready: asyncio.Event) -> None:
    """A bare owner on the relay that rejects every offer with ``reason``/``code``."""
    async with ws_connect(url, proxy=None) as ws:
        await ws.send(sigproto.encode(sigproto.Hello(v=2, token=None, agent="test")))
        welcome = sigproto.decode(await ws.recv())
        assert isinstance(welcome, sigproto.Welcome)
        await ws.send(sigproto.encode(signed_register(name, "ef" * 32, welcome.challenge)))
        assert sigproto.decode(await ws.recv()) == sigproto.Registered(name)
        ready.set()
        async for frame in ws:
            msg = sigproto.decode(frame)
            if isinstance(msg, sigproto.Incoming):
                await ws.send(sigproto.encode(
                    sigproto.Reject(session=msg.session, reason=reason, code=code)))


@pytest.mark.parametrize(
    ("reason", "code", "permanent"),
    [
        ("authentication backend unavailable", "busy", False),  # "auth" in text only
        ("authentication failed: wrong secret", None, False),  # an old server: no code
        ("secret auth", "replay", False),
        ("whatever", "auth", True),  # the code decides, not the text
        ("upgrade quictun on the connecting machine", "version", True),
        ("malformed offer", "malformed", True),  # e.g. `connect pair-7`: said so
    ],
)
async def test_reject_code_decides_auth_error(reason: str, code: str | None,
                                              permanent: bool) -> None:
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    ready = asyncio.Event()
    owner = asyncio.create_task(_rejecting_owner(relay.url, "rej", reason, code, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        with pytest.raises(TunnelError) as exc:
            async with quictun.connect("rej", signal=relay.url, secret="s",
                                       identity=Identity.generate(), on_status=lambda s: None):
                pass
        assert isinstance(exc.value, AuthError) is permanent, exc.value
        assert exc.value.permanent is permanent
        if not permanent or code == "malformed":
            assert reason in str(exc.value)  # the printable reason, as before
    finally:
        owner.cancel()
        with __import__("contextlib").suppress(asyncio.CancelledError):
            await owner
        await relay.stop()


async def test_token_relay_serve_needs_token_connect_does_not(tmp_path: Path) -> None:
    """A token-protected relay: serve without the token is told what to set; serve with
    it works, and a connector without the token (a pasted ticket) reaches it."""
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0,
                                     matchmaker=MatchmakerConfig(token="relay-t0ken")))
    await relay.start()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    task = None
    try:
        with pytest.raises(TunnelError, match="requires a token.*QUICTUN_SIGNAL_TOKEN"):
            await asyncio.wait_for(quictun.serve(
                "tok", forward=f"127.0.0.1:{port}", signal=relay.url, secret="s",
                identity=Identity.generate(), on_event=lambda s: None), 20)
        with pytest.raises(TunnelError, match="refused our token"):
            await asyncio.wait_for(quictun.serve(
                "tok", forward=f"127.0.0.1:{port}", signal=relay.url, secret="s",
                token="wrong", identity=Identity.generate(), on_event=lambda s: None), 20)
        task = asyncio.create_task(quictun.serve(
            "tok", forward=f"127.0.0.1:{port}", signal=relay.url, secret="s",
            token="relay-t0ken", identity=Identity.generate(), on_event=lambda s: None))
        for _ in range(200):
            if relay.stats.get("names", 0) >= 1 or task.done():
                break
            await asyncio.sleep(0.05)
        assert relay.stats["names"] == 1
        async with quictun.connect("tok", signal=relay.url, secret="s",
                                   identity=Identity.generate(), on_status=lambda s: None) as t:
            reader, writer = await t.open_connection()
            writer.write(b"no token here\n")
            assert await reader.readline() == b"no token here\n"
            writer.close()
    finally:
        if task is not None:
            task.cancel()
            with __import__("contextlib").suppress(asyncio.CancelledError):
                await task
        target.close()
        await relay.stop()


async def test_pinned_fingerprint_mismatch_is_refused(env) -> None:  # type: ignore[no-untyped-def]
    """A ticket pins the server's identity: another fingerprint is refused."""
    relay, _ = env
    from quictun.aio.client import open_tunnel

    with pytest.raises(TunnelError, match="fingerprint differs"):
        await open_tunnel("lib", signal=relay.url, secret="lib-secret",
                          identity=Identity.generate(), on_status=lambda s: None,
                          pin=Identity.generate().fingerprint)


@pytest.mark.parametrize("field", ["box", "pake"])
async def test_a_relay_that_rewrites_the_answer_is_caught(env, monkeypatch, field) -> None:  # type: ignore[no-untyped-def]
    """A relay that alters the answer (its sealed box, or the SPAKE2 message, as a
    man in the middle would) gets a box that does not open: refused, nothing learnt."""
    relay, _ = env
    from quictun.proto.offer import b64
    from signal_server import matchmaker

    original = matchmaker.Matchmaker._send

    def tampering(self, conn_id, msg, *a, **k):  # type: ignore[no-untyped-def]
        if isinstance(msg, matchmaker.sp.Answer):
            ans = dict(msg.answer)
            if field == "box":
                ans["box"] = b64(os.urandom(512))
            else:  # a SPAKE2 message the relay made with its own guess
                from quictun.proto import pake
                mine = pake.start(pake.prepare("guess", "lib", "connect", "server"),
                                  os.urandom(64))
                ans["pake"] = b64(mine.message)
            msg = type(msg)(msg.session, ans)
        return original(self, conn_id, msg, *a, **k)

    monkeypatch.setattr(matchmaker.Matchmaker, "_send", tampering)
    with pytest.raises(AuthError, match="does not open with our secret"):
        async with quictun.connect("lib", signal=relay.url, secret="lib-secret",
                                   identity=Identity.generate(), on_status=lambda s: None):
            pass


async def test_relay_only_library_tunnel(env) -> None:  # type: ignore[no-untyped-def]
    relay, _ = env
    async with quictun.connect("lib", signal=relay.url, secret="lib-secret", mode="relay",
                               identity=Identity.generate(), on_status=lambda s: None) as t:
        reader, writer = await t.open_connection()
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        assert t.path is not None and t.path.kind == "relay"
        writer.close()
    assert relay.stats["relayed_bytes"] > 0


async def test_replayed_offer_gets_no_session(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A relay that replays a recorded offer gets a reject, not a second session."""
    from signal_server import matchmaker

    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    original = matchmaker.Matchmaker._send

    def replaying(self, conn_id, msg, *a, **k):  # type: ignore[no-untyped-def]
        original(self, conn_id, msg, *a, **k)
        if isinstance(msg, matchmaker.sp.Incoming):  # the same offer again, later session
            original(self, conn_id, type(msg)(msg.session + 1000, msg.name, msg.offer), *a, **k)

    monkeypatch.setattr(matchmaker.Matchmaker, "_send", replaying)
    events: list[str] = []
    server_id = Identity.generate()
    task = asyncio.create_task(quictun.serve(
        "lib", forward=f"127.0.0.1:{port}", signal=relay.url, secret="lib-secret",
        identity=server_id, on_event=events.append))
    try:
        for _ in range(100):
            if relay.stats.get("names", 0) >= 1:
                break
            await asyncio.sleep(0.05)
        from quictun.aio.client import open_tunnel
        from quictun.proto.pake import box_key_of

        # a ticket holder sends a hint (sealed to the server's box key): the replayed
        # copy is recognised before any PAKE work
        t = await open_tunnel("lib", signal=relay.url, secret="lib-secret",
                              identity=Identity.generate(), on_status=lambda s: None,
                              pin=server_id.fingerprint, box_key=box_key_of(server_id))
        try:
            reader, writer = await t.open_connection()
            writer.write(b"still works\n")
            assert await reader.readline() == b"still works\n"
            writer.close()
        finally:
            await t.close()
        assert any("replayed offer" in e for e in events), events
    finally:
        task.cancel()
        with __import__("contextlib").suppress(asyncio.CancelledError):
            await task
        target.close()
        await relay.stop()


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:22", ("127.0.0.1", 22)), ("[::1]:22", ("::1", 22)), ("22", ("127.0.0.1", 22)),
    ("example.org:8080", ("example.org", 8080)),
])
def test_parse_hostport(text: str, want: tuple[str, int]) -> None:
    from quictun.proto.addr import parse_hostport

    assert parse_hostport(text) == want


@pytest.mark.parametrize("text", ["::1", "::1:22", "[::1]", "[]:22", "[::1:22", "x:y",
                                  "host:0", "host:65536"])
def test_parse_hostport_refuses(text: str) -> None:
    from quictun.proto.addr import parse_hostport

    with pytest.raises(ValueError):
        parse_hostport(text)


async def test_a_relay_of_another_protocol_version_is_one_permanent_line() -> None:
    """What a protocol-1 relay answers a protocol-2 hello (recorded from quictun 0.1)."""
    from websockets.asyncio.server import serve as ws_serve

    async def old_relay(ws) -> None:  # type: ignore[no-untyped-def]
        await ws.recv()
        await ws.send(json.dumps({"t": "error", "code": "unsupported-version", "message":
                                  "relay speaks protocol version 1, client sent 2",
                                  "session": None}))
        await ws.close(1002)

    async with ws_serve(old_relay, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/"
        with pytest.raises(TunnelError) as exc:
            async with quictun.connect("box", signal=url, secret="s" * 16,
                                       identity=Identity.generate(), on_status=lambda s: None):
                pass
    assert exc.value.permanent
    assert "speaks another protocol version (relay speaks protocol version 1" in str(exc.value)
    assert "same quictun release" in str(exc.value)
