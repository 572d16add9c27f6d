"""Port mapping inside real tunnels, in one process: a real relay, quictun.serve as a task,
quictun.connect, each side with its own scriptable PCP/NAT-PMP gateway on loopback.

Each gateway reports its own loopback address as the "external" one, so a mapped
address really reaches the tunnel socket (bound to all addresses) and nothing leaves
this host. Checked here: a mapping is signalled as a ``portmap`` candidate (the client's
in its sealed hello when it is quick, in-band when it comes late; the server asks only
after the client proved the secret, and sends its own in-band), the peer's path manager
ranks it as one, and every way a tunnel ends deletes it (close, a failed connect, the
server stopping). Against a real miniupnpd and
real NATs: tests/lab/test_lab_portmap_tunnel.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from gateway import FakeGateway, loopback_ip, start_gateway

import quictun
from quictun.aio.client import open_tunnel
from quictun.aio.server import Server, forwarding
from quictun.aio.session import PeerSession
from quictun.config import PortmapConfig, TunnelConfig
from quictun.errors import TunnelError
from quictun.proto.addr import Candidate
from quictun.proto.identity import Identity
from quictun.punch.manager import PathManager
from quictun.punch.types import RANK_PORTMAP, Mode, rank_of
from signal_server.server import RelayConfig, RelayServer

SECRET = "portmap-secret"


def tunnel_config(gw: FakeGateway | None) -> TunnelConfig:
    """Port mapping on, through ``gw`` only (no UPnP: its SSDP would go to the LAN)."""
    if gw is None:
        return TunnelConfig()
    return TunnelConfig(portmap=PortmapConfig(
        enabled=True, gateway=gw.ip, protocols=("pcp", "natpmp"), require_global=False,
        retransmits=(0.0, 0.1, 0.3), udp_wait=0.6))


@dataclass
class Seen:
    """Candidates each path manager was given, by the session that owns it."""

    signalled: dict[int, list[Candidate]] = field(default_factory=dict)
    in_band: dict[int, list[str]] = field(default_factory=dict)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    s = Seen()
    add = PathManager.add_remote_candidates
    remote = PeerSession._remote_candidates

    def spy_add(self: PathManager, cands: Any, now: float) -> None:
        cands = list(cands)
        s.signalled.setdefault(id(self), []).extend(cands)
        add(self, cands, now)

    def spy_remote(self: PeerSession, texts: list[str]) -> None:
        s.in_band.setdefault(id(self.paths), []).extend(texts)
        remote(self, texts)

    monkeypatch.setattr(PathManager, "add_remote_candidates", spy_add)
    monkeypatch.setattr(PeerSession, "_remote_candidates", spy_remote)
    return s


@dataclass
class Rig:
    relay: RelayServer
    server_gw: FakeGateway | None
    client_gw: FakeGateway
    server: Server
    serve_task: asyncio.Task[None]

    def connect(self, **kw: Any) -> contextlib.AbstractAsyncContextManager[quictun.Tunnel]:
        return quictun.connect("pm", signal=self.relay.url, secret=SECRET,
                               identity=Identity.generate(), on_status=lambda s: None,
                               config=tunnel_config(self.client_gw), **kw)

    async def stop_serving(self) -> None:
        self.serve_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.serve_task


async def _gateway(delay: float = 0.0) -> FakeGateway:
    ip = loopback_ip()
    gw = await start_gateway(ip, external_ip=ip)
    gw.behaviour.delay = delay
    return gw


@contextlib.asynccontextmanager
async def rig(server_delay: float | None = 0.0,
              client_delay: float = 0.0) -> AsyncIterator[Rig]:
    """Relay, echo target, ``serve`` (with a gateway unless ``server_delay`` is None)."""
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
        w.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    server_gw = None if server_delay is None else await _gateway(server_delay)
    client_gw = await _gateway(client_delay)
    server = Server("pm", forwarding(f"127.0.0.1:{port}"), signal=relay.url, secret=SECRET,
                    mode=Mode.AUTO, token=None, identity=Identity.generate(),
                    on_event=lambda s: None, config=tunnel_config(server_gw))
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.registered.wait(), 10)
    r = Rig(relay, server_gw, client_gw, server, task)
    try:
        yield r
    finally:
        await r.stop_serving()
        target.close()
        await relay.stop()


def portmap_texts(texts: list[str]) -> list[str]:
    return [t for t in texts if t.startswith("portmap ")]


async def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return check()


async def echo_once(t: quictun.Tunnel) -> bytes:
    reader, writer = await t.open_connection()
    writer.write(b"ping\n")
    line = await reader.readline()
    writer.close()
    return line


async def test_quick_grants_are_signalled_and_close_deletes(seen: Seen) -> None:
    """The client's grant (a millisecond on loopback) rides in its sealed hello; the
    server asks only once the client proved the secret, so its grant follows in-band."""
    async with rig() as r:
        assert r.server_gw is not None
        async with r.connect() as t:
            assert await echo_once(t) == b"ping\n"
            port = t.session.endpoint.port
            assert r.client_gw.mapped == {port: port}
            mine = Candidate((r.client_gw.ip, port), "portmap")
            # the server's path manager got our mapping with our hello, not in-band
            server_pm = next(s.session.paths for s in r.server.sessions.values())
            assert await until(lambda: mine in seen.signalled.get(id(server_pm), []))
            assert not portmap_texts(seen.in_band.get(id(server_pm), []))
            # and ours got the server's, in-band
            assert await until(lambda: any(
                text.startswith(f"portmap {r.server_gw.ip} ")  # type: ignore[union-attr]
                for text in seen.in_band.get(id(t.session.paths), [])))
            assert len(r.server_gw.mapped) == 1
            r.client_gw.behaviour.delay = 0.3  # deletions confirmed slowly
        # Tunnel.close() returned after our deletion was confirmed...
        assert t.session.portmap is not None and t.session.portmap.released
        assert r.client_gw.mapped == {}
        assert await until(lambda: r.server_gw.mapped == {})  # ...the session end, theirs


async def test_late_grants_follow_in_band(seen: Seen) -> None:
    async with rig(server_delay=0.4, client_delay=0.4) as r:
        assert r.server_gw is not None
        async with r.connect() as t:
            port = t.session.endpoint.port
            server_pm = next(s.session.paths for s in r.server.sessions.values())
            want = f"portmap {r.client_gw.ip} {port}"
            # not in the offer (the gateway answered after it left), then in-band
            assert await until(lambda: want in seen.in_band.get(id(server_pm), []))
            assert await until(lambda: any(
                text.startswith(f"portmap {r.server_gw.ip} ")  # type: ignore[union-attr]
                for text in seen.in_band.get(id(t.session.paths), [])))
            assert await echo_once(t) == b"ping\n"
        assert r.client_gw.mapped == {}
        assert await until(lambda: r.server_gw.mapped == {})  # type: ignore[union-attr]


async def test_the_peer_ranks_a_mapped_address_above_a_reflexive_one() -> None:
    mapped, reflexive = ("198.51.100.9", 40000), ("198.51.100.9", 40001)
    assert rank_of(mapped, "portmap", []) == RANK_PORTMAP
    assert rank_of(reflexive, "srflx", []) > RANK_PORTMAP > rank_of(mapped, "host", [])


async def test_stopping_the_server_deletes_its_mappings() -> None:
    async with rig() as r:
        assert r.server_gw is not None
        async with r.connect() as t:
            assert await echo_once(t) == b"ping\n"
            assert await until(lambda: len(r.server_gw.mapped) == 1)  # type: ignore[union-attr]
            await r.stop_serving()  # what SIGTERM does to `quictun serve`
            assert r.server_gw.mapped == {}


async def test_a_failed_connect_deletes_its_mapping() -> None:
    async with rig() as r:
        with pytest.raises(TunnelError, match="no peer is serving"):
            await open_tunnel("nobody", signal=r.relay.url, secret=SECRET,
                              identity=Identity.generate(), on_status=lambda s: None,
                              config=tunnel_config(r.client_gw))
        assert any(p == "pcp" for p, _ in r.client_gw.requests)  # it did ask
        assert r.client_gw.mapped == {}


async def test_relay_only_and_switched_off_ask_nothing() -> None:
    async with rig(server_delay=None) as r:
        async with r.connect(mode="relay") as t:
            assert await echo_once(t) == b"ping\n"
        off = TunnelConfig()  # the library's default: no port mapping
        async with quictun.connect("pm", signal=r.relay.url, secret=SECRET,
                                   identity=Identity.generate(), on_status=lambda s: None,
                                   config=off) as t:
            assert await echo_once(t) == b"ping\n"
            assert t.session.portmap is None
        assert r.client_gw.requests == []


async def test_a_wrong_secret_makes_the_server_ask_its_gateway_nothing() -> None:
    """The server maps only for a client that proved the secret: a stranger's offer must
    not change the server's router."""
    async with rig() as r:
        assert r.server_gw is not None
        with pytest.raises(TunnelError, match="wrong secret|refused"):
            await open_tunnel("pm", signal=r.relay.url, secret="not-the-secret",
                              identity=Identity.generate(), on_status=lambda s: None,
                              config=tunnel_config(r.client_gw), timeout=10)
        assert r.server_gw.requests == []
        assert await until(lambda: r.client_gw.mapped == {})
