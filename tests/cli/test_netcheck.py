"""netcheck: the verdict table (pure) and a probe against a real in-process relay."""

from __future__ import annotations

import json
import re

import pytest

from quictun.cli import netcheck as nc
from quictun.errors import TunnelError

R1, R2 = ("198.51.100.1", 3478), ("198.51.100.1", 3479)
R6a, R6b = ("2001:db8::1", 3478), ("2001:db8::1", 3479)
PUB = ("203.0.113.7", 40000)
PUB2 = ("203.0.113.7", 40001)
PUB6 = ("2001:db8::7", 40000)


def obs(stun4=(), stun6=(), relays: bool = True) -> nc.Observations:  # type: ignore[no-untyped-def]
    return nc.Observations(relay_url="ws://relay/", relay_rtt_ms=12.5, relay_relays=relays,
                           stun4=list(stun4), stun6=list(stun6))


CASES = [
    # name, observations, udp, public_addr, mapping, ipv6, verdict
    ("eim", obs([(R1, PUB), (R2, PUB)]), True, "203.0.113.7:40000",
     "endpoint-independent", False, nc.VERDICT_DIRECT),
    ("edm", obs([(R1, PUB), (R2, PUB2)]), True, "203.0.113.7:40000",
     "endpoint-dependent", False, nc.VERDICT_SYMMETRIC),
    ("blocked", obs([(R1, None), (R2, None)]), False, None, None, False, nc.VERDICT_BLOCKED),
    ("blocked, no relay", obs([(R1, None), (R2, None)], relays=False), False, None, None,
     False, nc.VERDICT_BLOCKED_NO_RELAY),
    ("nothing asked", obs(), False, None, None, False, nc.VERDICT_BLOCKED),
    ("one answer", obs([(R1, PUB), (R2, None)]), True, "203.0.113.7:40000", None, False,
     nc.VERDICT_UNKNOWN),
    ("dual stack", obs([(R1, PUB), (R2, PUB)], [(R6a, PUB6), (R6b, PUB6)]), True,
     "203.0.113.7:40000", "endpoint-independent", True, nc.VERDICT_DIRECT),
    ("v6 only", obs([(R1, None), (R2, None)], [(R6a, PUB6), (R6b, PUB6)]), True,
     "[2001:db8::7]:40000", "endpoint-independent", True, nc.VERDICT_DIRECT),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_report_table(case) -> None:  # type: ignore[no-untyped-def]
    _name, o, udp, public, mapping, ipv6, verdict = case
    r = nc.report(o)
    assert (r.udp, r.public_addr, r.mapping, r.ipv6) == (udp, public, mapping, ipv6)
    assert r.verdict == verdict
    assert r.relay_rtt_ms == 12.5 and r.relay_url == "ws://relay/"


def test_symmetric_v4_with_direct_v6_says_so() -> None:
    r = nc.report(obs([(R1, PUB), (R2, PUB2)], [(R6a, PUB6), (R6b, PUB6)]))
    assert r.mapping == "endpoint-dependent"
    assert r.verdict.startswith(nc.VERDICT_SYMMETRIC) and "IPv6" in r.verdict


def test_text_and_json() -> None:
    r = nc.report(obs([(R1, PUB), (R2, PUB)]))
    data = json.loads(r.to_json())
    assert set(data) == {"udp", "public_addr", "mapping", "ipv6", "relay_rtt_ms",
                         "relay_url", "verdict", "portmap", "portmap_mapped",
                         "portmap_protocol"}
    assert data["portmap"] == "off" and data["portmap_mapped"] is None
    text = r.to_text()
    assert "203.0.113.7:40000" in text and f"verdict: {nc.VERDICT_DIRECT}" in text


async def test_probe_real_relay() -> None:
    from signal_server.server import RelayConfig, RelayServer

    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    try:
        r = nc.report(await nc.probe(relay.url))
    finally:
        await relay.stop()
    assert r.udp is True
    assert r.mapping == "endpoint-independent"
    assert r.public_addr is not None and r.public_addr.startswith("127.0.0.1:")
    assert r.relay_rtt_ms is not None and r.relay_rtt_ms >= 0
    assert r.verdict == nc.VERDICT_DIRECT


async def test_probe_unreachable_relay() -> None:
    from helpers import free_port

    with pytest.raises(TunnelError, match="cannot reach the relay"):
        await nc.probe(f"ws://127.0.0.1:{free_port()}/")


# -- port mapping --------------------------------------------------------------------
GRANT = ("PCP", ("203.0.113.7", 41000))


def pm_obs(stun4, offered: str = "UPnP, NAT-PMP, PCP", granted=GRANT):  # type: ignore[no-untyped-def]
    o = obs(stun4)
    o.portmap, o.portmap_mapped = offered, granted
    return o


PORTMAP_CASES = [
    # name, observations, verdict, portmap, mapped (text row)
    ("symmetric, mapped", pm_obs([(R1, PUB), (R2, PUB2)]),
     nc.VERDICT_PORTMAP.format(protocol="PCP"), "UPnP, NAT-PMP, PCP",
     "granted 203.0.113.7:41000 (PCP)"),
    ("symmetric, refused", pm_obs([(R1, PUB), (R2, PUB2)], granted=None),
     nc.VERDICT_SYMMETRIC, "UPnP, NAT-PMP, PCP", "refused"),
    ("symmetric, no gateway", pm_obs([(R1, PUB), (R2, PUB2)], "none", None),
     nc.VERDICT_SYMMETRIC, "none", "-"),
    ("unknown NAT, mapped", pm_obs([(R1, PUB), (R2, None)]),
     nc.VERDICT_PORTMAP.format(protocol="PCP"), "UPnP, NAT-PMP, PCP",
     "granted 203.0.113.7:41000 (PCP)"),
    ("cone, mapped", pm_obs([(R1, PUB), (R2, PUB)]), nc.VERDICT_DIRECT,
     "UPnP, NAT-PMP, PCP", "granted 203.0.113.7:41000 (PCP)"),
    ("UDP blocked, mapped", pm_obs([(R1, None), (R2, None)]), nc.VERDICT_BLOCKED,
     "UPnP, NAT-PMP, PCP", "granted 203.0.113.7:41000 (PCP)"),
    ("not asked", obs([(R1, PUB), (R2, PUB2)]), nc.VERDICT_SYMMETRIC, "off", "-"),
]


@pytest.mark.parametrize("case", PORTMAP_CASES, ids=[c[0] for c in PORTMAP_CASES])
def test_verdict_counts_the_mapping(case) -> None:  # type: ignore[no-untyped-def]
    _name, o, verdict, portmap, mapped = case
    r = nc.report(o)
    assert r.verdict == verdict
    assert r.portmap == portmap
    text = r.to_text()
    assert re.search(rf"^\s+portmap:\s+{re.escape(portmap)}$", text, re.M), text
    assert re.search(rf"port mapping:\s+{re.escape(mapped)}$", text, re.M), text
    data = json.loads(r.to_json())
    assert data["portmap"] == portmap
    assert data["portmap_mapped"] == ("203.0.113.7:41000" if o.portmap_mapped else None)
    assert data["portmap_protocol"] == ("PCP" if o.portmap_mapped else None)


def _gateway_config(gw, **kw):  # type: ignore[no-untyped-def]
    """Only the loopback gateway is asked (UPnP's SSDP to a closed loopback port)."""
    from helpers import free_port

    from quictun.config import PortmapConfig

    return PortmapConfig(enabled=True, gateway=gw.ip, require_global=False,
                         ssdp_addr=("127.0.0.1", free_port()), ssdp_wait=0.2,
                         udp_wait=0.6, retransmits=(0.0, 0.1, 0.3), **kw)


async def test_probe_asks_the_gateway_and_deletes_the_test_mapping() -> None:
    from gateway import EXTERNAL_IP, start_gateway

    from signal_server.server import RelayConfig, RelayServer

    gw = await start_gateway()
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    try:
        r = nc.report(await nc.probe(relay.url, portmap=_gateway_config(gw)))
    finally:
        await relay.stop()
    assert r.portmap == "NAT-PMP, PCP"  # no IGD answered SSDP
    assert r.portmap_protocol in ("PCP", "NAT-PMP")
    assert r.portmap_mapped is not None and r.portmap_mapped.startswith(f"{EXTERNAL_IP}:")
    assert gw.mapped == {}  # the test mapping is gone again
    assert any(f.get("lifetime") == 0 for _p, f in gw.requests)
    gw.behaviour.pcp_result = gw.behaviour.natpmp_result = 2  # NOT_AUTHORIZED
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    try:
        r = nc.report(await nc.probe(relay.url, portmap=_gateway_config(gw)))
    finally:
        await relay.stop()
    assert r.portmap == "NAT-PMP, PCP" and r.portmap_mapped is None
    assert "refused" in r.to_text()


async def test_unreachable_relay_still_deletes_the_test_mapping() -> None:
    import asyncio

    from gateway import start_gateway
    from helpers import free_port

    gw = await start_gateway()
    gw.behaviour.delay = 0.3  # the relay fails before the gateway has answered
    with pytest.raises(TunnelError, match="cannot reach the relay"):
        await nc.probe(f"ws://127.0.0.1:{free_port()}/", portmap=_gateway_config(gw))
    assert any(p == "pcp" and f["lifetime"] for p, f in gw.requests)
    for _ in range(100):
        if gw.mapped == {}:
            break
        await asyncio.sleep(0.02)
    assert gw.mapped == {}
