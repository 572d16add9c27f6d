"""The port mapper's asyncio shell against a scriptable PCP/NAT-PMP gateway on loopback.

The real thing (miniupnpd, all three protocols, packets through the mapping) is in
tests/lab/test_lab_portmap.py; these cover what a real daemon will not do on demand:
junk before the answer, silence, refusals, a gateway without PCP, renewals that move the
port or stop, and the deletions of every protocol that was asked.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from gateway import EXTERNAL_IP, start_gateway

from quictun.aio.portmap import (
    Mapping,
    PortmapConfig,
    PortMapper,
    close_all_sync,
    probe_gateway,
)

FAST = dict(retransmits=(0.0, 0.1, 0.3), udp_wait=0.6, retry_after=0.2, close_timeout=1.0)


def config(gw: str, protocols: tuple[str, ...], **kw: object) -> PortmapConfig:
    """Fast timers; 203.0.113.7 (documentation range) accepted as an external address."""
    return PortmapConfig(gateway=gw, protocols=protocols,  # type: ignore[arg-type]
                         **(FAST | {"require_global": False} | kw))


async def test_pcp_grant_and_delete_with_the_same_nonce() -> None:
    gw = await start_gateway()
    gw.behaviour.junk_first = True  # malformed answers first: ignored, not fatal
    changes: list[list[Mapping]] = []
    pm = PortMapper(40000, config=config(gw.ip, ("pcp",)), on_change=changes.append)
    pm.start()
    assert pm.mappings == []  # start() only schedules
    got = await pm.wait_first(5)
    assert [(m.protocol, m.external, m.internal_port, m.lifetime) for m in got] == [
        ("pcp", (EXTERNAL_IP, 40000), 40000, 300)]
    assert pm.external_addresses() == [(EXTERNAL_IP, 40000)]
    assert changes == [got]
    await pm.close()
    maps = [f for p, f in gw.requests if p == "pcp"]
    assert maps[0]["lifetime"] == 300 and maps[-1]["lifetime"] == 0
    assert maps[0]["nonce"] == maps[-1]["nonce"] and maps[0]["client"] == "127.0.0.1"
    assert gw.mapped == {} and pm.mappings == [] and changes[-1] == []


async def test_natpmp_grant_and_delete() -> None:
    gw = await start_gateway()
    pm = PortMapper(40001, config=config(gw.ip, ("natpmp",)))
    pm.start()
    got = await pm.wait_first(5)
    assert [(m.protocol, m.external) for m in got] == [("natpmp", (EXTERNAL_IP, 40001))]
    assert ("natpmp-address", {}) in gw.requests
    await pm.close()
    assert gw.mapped == {}
    assert gw.requests[-1] == ("natpmp", {"lifetime": 0, "internal": 40001, "suggested": 0})


async def test_refusals_give_nothing_and_say_why() -> None:
    gw = await start_gateway()
    gw.behaviour.pcp_result = 2  # NOT_AUTHORIZED
    gw.behaviour.natpmp_result = 2
    pm = PortMapper(40002, config=config(gw.ip, ("pcp", "natpmp")))
    pm.start()
    assert await pm.wait_first(5) == []
    assert pm.tried == {"pcp": "refused: NOT_AUTHORIZED", "natpmp": "refused: NOT_AUTHORIZED"}
    await pm.close()


async def test_nat_pmp_only_gateway() -> None:
    gw = await start_gateway()
    gw.behaviour.speak_pcp = False  # PCP answered with NAT-PMP's "unsupported version"
    pm = PortMapper(40003, config=config(gw.ip, ("pcp", "natpmp")))
    pm.start()
    got = await pm.wait_first(5)
    assert [m.protocol for m in got] == ["natpmp"]
    assert "NAT-PMP" in pm.tried["pcp"]
    await pm.close()


async def test_silent_gateway_and_no_listener() -> None:
    gw = await start_gateway()
    gw.behaviour.silent = True
    silent = PortMapper(40004, config=config(gw.ip, ("pcp", "natpmp")))
    silent.start()
    assert await silent.wait_first(5) == []
    assert silent.tried["pcp"].startswith("no answer")
    sends = sum(1 for p, _ in gw.requests if p == "pcp")
    assert sends == len(FAST["retransmits"])  # type: ignore[arg-type]
    await silent.close()
    # nobody on port 5351: the ICMP "port unreachable" ends the attempt
    closed = PortMapper(40005, config=config("127.0.0.1", ("pcp",)))
    closed.start()
    assert await closed.wait_first(5) == []
    assert "unreachable" in closed.tried["pcp"] or closed.tried["pcp"].startswith("no answer")
    await closed.close()


async def test_no_gateway_skips_pcp_and_natpmp(monkeypatch: pytest.MonkeyPatch) -> None:
    from quictun.aio import portmap
    monkeypatch.setattr(portmap, "default_gateway", lambda: None)
    pm = PortMapper(40006, config=PortmapConfig(protocols=("pcp", "natpmp")))
    pm.start()
    assert await pm.wait_first(5) == []
    assert pm.tried == {"pcp": "skipped: no default gateway",
                        "natpmp": "skipped: no default gateway"}
    await pm.close()


async def test_renewal_keeps_the_nonce_and_reports_a_moved_port() -> None:
    gw = await start_gateway()
    gw.behaviour.granted_lifetime = 1  # renew after 0.5 s
    changes: list[list[Mapping]] = []
    pm = PortMapper(40007, config=config(gw.ip, ("pcp",)), on_change=changes.append)
    pm.start()
    await pm.wait_first(5)
    for _ in range(100):
        if sum(1 for p, _ in gw.requests if p == "pcp") >= 2:
            break
        await asyncio.sleep(0.05)
    maps = [f for p, f in gw.requests if p == "pcp"]
    assert len(maps) >= 2 and maps[1]["nonce"] == maps[0]["nonce"]
    assert maps[1]["suggested"] == 40007  # asks for the address it has
    assert len(changes) == 1  # same address: nothing new for the peer
    gw.behaviour.external_port_offset = 5
    for _ in range(100):
        if len(changes) >= 2:
            break
        await asyncio.sleep(0.05)
    assert changes[-1][0].external == (EXTERNAL_IP, 40012)
    await pm.close()


async def test_failed_renewals_lose_the_mapping() -> None:
    gw = await start_gateway()
    gw.behaviour.granted_lifetime = 1
    changes: list[list[Mapping]] = []
    pm = PortMapper(40008, config=config(gw.ip, ("natpmp",)), on_change=changes.append)
    pm.start()
    await pm.wait_first(5)
    gw.behaviour.drop_renewals = True
    for _ in range(200):
        if not pm.running:  # lost, raced once more, refused again: done
            break
        await asyncio.sleep(0.05)
    assert [len(c) for c in changes] == [1, 0]
    assert "no answer" in pm.tried["natpmp"]
    await pm.close()


async def test_close_sync_without_a_loop() -> None:
    gw = await start_gateway()
    pm = PortMapper(40009, config=config(gw.ip, ("pcp", "natpmp")))
    pm.start()
    assert await pm.wait_first(5)
    close_all_sync(0.2)  # what a SIGTERM handler calls: blocking sends, no awaiting
    assert pm.mappings == []
    for _ in range(50):
        if gw.mapped == {}:
            break
        await asyncio.sleep(0.02)
    lifetimes = [(p, f["lifetime"]) for p, f in gw.requests if p in ("pcp", "natpmp")]
    assert ("pcp", 0) in lifetimes and ("natpmp", 0) in lifetimes
    assert gw.mapped == {}
    await pm.close()  # a no-op now


async def test_race_keeps_one_mapping_and_deletes_through_all() -> None:
    gw = await start_gateway()
    pm = PortMapper(40010, config=config(gw.ip, ("pcp", "natpmp")))
    pm.start()
    got = await pm.wait_first(5)
    assert len(got) == 1
    await pm.close()
    deletes = {p for p, f in gw.requests if f.get("lifetime") == 0}
    assert deletes == {"pcp", "natpmp"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PortMapper(0)
    with pytest.raises(ValueError):
        PortMapper(1, config=PortmapConfig(protocols=("smtp",)))


async def test_does_not_touch_the_tunnel_socket() -> None:
    """The mapper only needs the port number; the tunnel socket sees no datagram."""
    gw = await start_gateway()
    tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tunnel.bind(("127.0.0.1", 0))
    tunnel.setblocking(False)
    pm = PortMapper(tunnel.getsockname()[1], config=config(gw.ip, ("pcp", "natpmp")))
    pm.start()
    assert await pm.wait_first(5)
    await pm.close()
    with pytest.raises(BlockingIOError):
        tunnel.recv(2048)
    tunnel.close()


async def test_probe_gateway_creates_nothing() -> None:
    gw = await start_gateway()
    offer = await probe_gateway(config(gw.ip, ("pcp", "natpmp"), ssdp_wait=0.2))
    assert (offer.gateway, offer.pcp, offer.natpmp, offer.upnp) == (gw.ip, True, True, False)
    assert offer.external_ip == EXTERNAL_IP and offer.describe() == "NAT-PMP, PCP"
    assert {p for p, _ in gw.requests} == {"pcp-announce", "natpmp-address"}
    gw.behaviour.speak_pcp = False
    assert (await probe_gateway(config(gw.ip, (), ssdp_wait=0.2))).names == ["NAT-PMP"]
    gw.behaviour.silent = True
    assert (await probe_gateway(config(gw.ip, (), ssdp_wait=0.2))).describe() == "none"


async def test_a_non_global_external_address_is_not_used() -> None:
    """A second NAT upstream: the gateway's external address is itself private."""
    gw = await start_gateway()
    pm = PortMapper(40011, config=config(gw.ip, ("pcp",), require_global=True))
    pm.start()
    assert await pm.wait_first(5) == []
    assert "not a global address" in pm.tried["pcp"]
    assert gw.mapped == {}  # deleted at once
    await pm.close()


async def test_close_during_the_race_still_deletes() -> None:
    gw = await start_gateway()
    gw.behaviour.silent = True  # the requests arrive, the answers never come
    pm = PortMapper(40012, config=config(gw.ip, ("pcp", "natpmp")))
    pm.start()
    for _ in range(100):
        if {p for p, _ in gw.requests} >= {"pcp", "natpmp"}:
            break
        await asyncio.sleep(0.01)
    t0 = asyncio.get_running_loop().time()
    await pm.close()
    waited = asyncio.get_running_loop().time() - t0
    assert not pm.running and pm.mappings == []
    # a gateway that never answered gets its deletions without waiting for confirmations
    # (the close stays far below udp_wait): they are in flight when close() returns
    assert waited < FAST["udp_wait"]  # type: ignore[operator]
    for _ in range(100):
        deletes = {p for p, f in gw.requests if f.get("lifetime") == 0}
        if deletes == {"pcp", "natpmp"}:
            break
        await asyncio.sleep(0.01)
    assert deletes == {"pcp", "natpmp"}  # the router may have mapped: ask it to forget
