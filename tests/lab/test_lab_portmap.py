"""Port mapping against a real miniupnpd (UPnP IGD, NAT-PMP, PCP) on a lab router.

Cells: each protocol grants a mapping on a symmetric NAT, miniupnpd lists it, a packet
from the other site reaches the inside socket through it, and close() (or SIGTERM with the
documented handlers) deletes it; the three racing leave one mapping; renewals reach the
daemon; a router whose miniupnpd refuses, a router without one, and a host without a
default route give nothing, each for its own reason (answered refusals and ICMP errors,
not timeouts).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .netlab import Lab, LabProcess, SiteSpec

pytestmark = pytest.mark.lab

AGENT = Path(__file__).with_name("portmap_agent.py")
ALL = ("pcp", "natpmp", "upnp")

# From the other site: send "probe" to ip:port from source port argv[3], print the reply.
PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(1.5)
s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
try:
    data, addr = s.recvfrom(100)
    print("REPLY", addr[0], addr[1], data.decode())
except socket.timeout:
    print("NOREPLY")
"""


def agent(lab: Lab, protocols: tuple[str, ...], *, lifetime: int = 120,
          exit_mode: str = "async", site: str = "a") -> LabProcess:
    return lab.spawn(lab.host_ns(site), [sys.executable, str(AGENT), ",".join(protocols),
                                         str(lifetime), exit_mode],
                     stdin=subprocess.PIPE, name=f"agent-{site}-{'-'.join(protocols)}")


def mapped(proc: LabProcess) -> dict[str, Any]:
    return json.loads(proc.wait_for_line(r"^MAPPED (.*)$", timeout=30).group(1))


def probe(lab: Lab, ip: str, port: int, source_port: int = 41000) -> str:
    return lab.run_python(lab.host_b_ns, PROBE, ip, str(port), str(source_port)).stdout.strip()


def lease_for(lab: Lab, ext: int, internal: int) -> list[str]:
    return [line for line in lab.upnp_leases("a")
            if line.startswith(f"UDP:{ext}:{lab.host_a_ip4}:{internal}:")]


def wait_for(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


@pytest.mark.parametrize("protocol", ALL)
def test_each_protocol_maps_forwards_and_deletes(lab_factory: Any, protocol: str) -> None:
    lab = lab_factory(SiteSpec("symmetric", portmap="allow"), "cone")
    proc = agent(lab, (protocol,))
    info = mapped(proc)
    assert len(info["mappings"]) == 1, info
    proto, ext_ip, ext_port, lifetime = info["mappings"][0]
    assert (proto, ext_ip) == (protocol, lab.router_a_wan_ip4) and lifetime > 0
    assert len(lease_for(lab, ext_port, info["internal_port"])) == 1, lab.upnp_leases("a")
    assert f"dport {ext_port} dnat ip to {lab.host_a_ip4}:{info['internal_port']}" in \
        lab.upnp_rules("a")
    # through the symmetric NAT, unsolicited: the other site reaches the inside socket
    assert probe(lab, ext_ip, ext_port) == f"REPLY {ext_ip} {ext_port} reply"
    got = proc.wait_for_line(r"^GOT (\S+) (\d+) probe$", timeout=5)
    assert got.group(1) == lab.public_ip4("b")
    proc.send_line("close")
    proc.wait_for_line(r"^CLOSED$", timeout=10)
    assert lab.upnp_leases("a") == []
    assert f"dport {ext_port}" not in lab.upnp_rules("a")
    # the mapping is really gone: a new flow no longer gets in (the first flow's conntrack
    # entry outlives the rule, as with any NAT, until its UDP timeout)
    assert probe(lab, ext_ip, ext_port, source_port=41001) == "NOREPLY"
    assert proc.count_matches(r"^GOT ") == 1
    proc.send_line("quit")
    assert proc.wait(10) == 0


def test_symmetric_both_sides_with_mappings_reach_each_other(lab_factory: Any) -> None:
    """The socket-level half of the "symmetric <-> symmetric with mappings" cell: each
    side's first datagram to the other's mapped address arrives, and so does the answer
    (it leaves the far router from the mapped address)."""
    spec = SiteSpec("symmetric", portmap="allow")
    lab = lab_factory(spec, spec)
    a, b = agent(lab, ALL), agent(lab, ALL, site="b")
    (_, a_ip, a_port, _), = mapped(a)["mappings"]
    (_, b_ip, b_port, _), = mapped(b)["mappings"]
    assert (a_ip, b_ip) == (lab.router_a_wan_ip4, lab.router_b_wan_ip4)
    a.send_line(f"send {b_ip} {b_port}")
    assert b.wait_for_line(r"^GOT (\S+) \d+ hello$", timeout=5).group(1) == a_ip
    a.wait_for_line(rf"^GOT {re.escape(b_ip)} {b_port} reply$", timeout=5)
    b.send_line(f"send {a_ip} {a_port}")
    assert a.wait_for_line(r"^GOT (\S+) \d+ hello$", timeout=5).group(1) == b_ip
    b.wait_for_line(rf"^GOT {re.escape(a_ip)} {a_port} reply$", timeout=5)
    for proc in (a, b):
        proc.send_line("close")
        proc.wait_for_line(r"^CLOSED$", timeout=10)
    assert lab.upnp_leases("a") == [] and lab.upnp_leases("b") == []


def test_race_leaves_one_mapping(lab_factory: Any) -> None:
    lab = lab_factory(SiteSpec("symmetric", portmap="allow"), "cone")
    proc = agent(lab, ALL)
    info = mapped(proc)
    assert len(info["mappings"]) == 1
    assert list(info["tried"].values()).count("cancelled: another protocol won") <= 2
    assert len(lab.upnp_leases("a")) == 1
    proc.send_line("close")
    proc.wait_for_line(r"^CLOSED$", timeout=10)
    assert lab.upnp_leases("a") == []


@pytest.mark.parametrize("exit_mode", ["async", "sync"])
def test_sigterm_deletes_the_mapping(lab_factory: Any, exit_mode: str) -> None:
    lab = lab_factory(SiteSpec("symmetric", portmap="allow"), "cone")
    proc = agent(lab, ALL, exit_mode=exit_mode)
    assert mapped(proc)["mappings"]
    assert len(lab.upnp_leases("a")) == 1
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)
    assert lab.upnp_leases("a") == [], proc.tail()


def test_sigterm_without_a_handler_leaves_the_mapping(lab_factory: Any) -> None:
    """Why the CLI must install one of the handlers above (the lease then only expires)."""
    lab = lab_factory(SiteSpec("symmetric", portmap="allow"), "cone")
    proc = agent(lab, ("pcp",), exit_mode="none")
    assert mapped(proc)["mappings"]
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)
    assert len(lab.upnp_leases("a")) == 1


@pytest.mark.parametrize("protocol", ALL)
def test_renewal_reaches_the_daemon(lab_factory: Any, protocol: str) -> None:
    lab = lab_factory(SiteSpec("cone", portmap="allow"), "cone")
    proc = agent(lab, (protocol,), lifetime=4)  # renewed every 2 s
    info = mapped(proc)
    _, _, ext_port, _ = info["mappings"][0]

    def expiry() -> int:
        lines = lease_for(lab, ext_port, info["internal_port"])
        return int(lines[0].split(":")[4]) if lines else 0

    first = expiry()
    assert first
    assert wait_for(lambda: expiry() > first, timeout=10), lab.upnp_leases("a")
    assert proc.count_matches(r"portmap: .*lost") == 0
    proc.send_line("close")
    proc.wait_for_line(r"^CLOSED$", timeout=10)
    assert lab.upnp_leases("a") == []


def test_refusing_router_answers_no(lab_factory: Any) -> None:
    lab = lab_factory(SiteSpec("symmetric", portmap="deny"), "cone")
    proc = agent(lab, ALL)
    info = mapped(proc)
    assert info["mappings"] == []
    assert info["tried"]["pcp"] == "refused: NOT_AUTHORIZED"
    assert info["tried"]["natpmp"] == "refused: NOT_AUTHORIZED"
    assert info["tried"]["upnp"].startswith("refused: UPnP fault"), info
    assert lab.upnp_leases("a") == []


def test_router_without_a_daemon(lab_factory: Any) -> None:
    lab = lab_factory("symmetric", "cone")
    proc = agent(lab, ALL)
    info = mapped(proc)
    assert info["mappings"] == []
    assert info["tried"]["pcp"] == "port unreachable (ICMP)"
    assert info["tried"]["natpmp"] == "port unreachable (ICMP)"
    assert info["tried"]["upnp"] == "no IGD found"


def test_host_without_a_default_route(lab_factory: Any) -> None:
    lab = lab_factory(SiteSpec("symmetric", portmap="allow"), "cone")
    lab.run(lab.host_a_ns, ["ip", "route", "del", "default"], check=True)
    proc = agent(lab, ALL)
    info = mapped(proc)
    assert info["mappings"] == []
    assert info["tried"] == {"pcp": "skipped: no default gateway",
                             "natpmp": "skipped: no default gateway",
                             "upnp": "no IGD found"}
    assert re.search(r"M-SEARCH not sent", proc.output("stderr"))


PROBE_GATEWAY = r"""
import asyncio, json
from quictun.aio.portmap import probe_gateway
offer = asyncio.run(probe_gateway())
print(json.dumps([offer.gateway, offer.describe(), offer.external_ip]))
"""


@pytest.mark.parametrize("portmap, offered", [("allow", "UPnP, NAT-PMP, PCP"),
                                              ("deny", "UPnP, NAT-PMP, PCP"),
                                              ("none", "none")])
def test_probe_gateway(lab_factory: Any, portmap: str, offered: str) -> None:
    lab = lab_factory(SiteSpec("symmetric", portmap=portmap), "cone")
    gateway, described, external = json.loads(
        lab.run_python(lab.host_a_ns, PROBE_GATEWAY).stdout)
    assert (gateway, described) == ("198.19.1.1", offered)
    assert external == (lab.router_a_wan_ip4 if portmap != "none" else None)
    assert lab.upnp_leases("a") == []


def test_site_spec_checks_portmap() -> None:
    assert SiteSpec("cone", portmap="deny").portmap == "deny"
    with pytest.raises(ValueError, match="unknown portmap"):
        SiteSpec("cone", portmap="yes")
    with pytest.raises(ValueError, match="needs a NAT"):
        SiteSpec("firewall", portmap="allow")
