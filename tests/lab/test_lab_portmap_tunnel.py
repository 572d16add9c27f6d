"""Port mapping in real tunnels: `quictun serve` and `connect` behind lab routers that
run a real miniupnpd (UPnP IGD, NAT-PMP, PCP), see :mod:`tests.lab.miniupnpd`.

Cells:

* symmetric NAT with a mapping on both sides -> direct (without mappings: relayed);
* symmetric with a mapping <-> cone -> direct, and no side took a birthday role (each
  logs ``birthday probing: <role> side`` when it does); the cone side's path goes to the
  mapped address that miniupnpd's lease list names;
* a router whose miniupnpd refuses (a deny rule) -> as today: symmetric <-> symmetric
  relayed, symmetric <-> cone direct by birthday probing (a router without miniupnpd is
  every other lab test: test_lab_tunnel, test_lab_hardnat);
* the mapping is deleted when `connect` or `serve` exits: at the end of its work, on
  SIGTERM, on SIGINT (miniupnpd's lease list);
* `quictun netcheck` reports the mapping (allow), a refusal (deny), nothing (none).

Paths are proven by the lab's nftables counters, data by SHA-256 (test_lab_tunnel's
client). All runs use ``-v`` so their logs show what the port mapper did.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from quictun.cli.netcheck import VERDICT_PORTMAP, VERDICT_SYMMETRIC

from .netlab import Lab, SiteSpec
from .test_lab_tunnel import (  # noqa: F401  (pytestmark and the fixture, used by name)
    NAME,
    SIZE,
    LabFactory,
    Tunnel,
    TunnelFactory,
    assert_direct,
    assert_relayed,
    pytestmark,
)
from .test_lab_tunnel import tunnel_factory as tunnel_factory  # noqa: F401

BIRTHDAY = r"birthday probing: (\w+) side"


def site(kind: str, portmap: str = "none") -> SiteSpec:
    return SiteSpec(kind, ipv6=False, portmap=portmap)


def leases(lab: Lab, name: str) -> list[tuple[int, str, int]]:
    """miniupnpd's UDP leases on ``name``'s router: (external port, internal ip, port)."""
    out = []
    for line in lab.upnp_leases(name):
        proto, eport, iaddr, iport, *_ = line.split(":")
        if proto == "UDP":
            out.append((int(eport), iaddr, int(iport)))
    return out


def wait_until(check, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def start(t: Tunnel) -> float:
    """Relay, service, serve and connect (all at -v); returns when connect started."""
    t.start_relay()
    t.start_service()
    t.serve("-v")
    t0 = time.monotonic()
    t.connect("-v")
    return t0


def test_symmetric_pair_with_mappings_goes_direct(lab_factory: LabFactory,
                                                  tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory(site("symmetric", "allow"), site("symmetric", "allow"))
    t = tunnel_factory(lab)
    t0 = start(t)
    m = t.wait_path("direct", timeout=30)
    took = time.monotonic() - t0
    print(f"\nsymmetric+portmap pair: direct after {took:.2f} s: {m.group(0)}")
    assert t.serve_proc is not None and t.connect_proc is not None
    # one mapping per side, for the tunnel socket the path runs over
    (a_ext, a_ip, _a_port), = leases(lab, "a")
    (b_ext, b_ip, _b_port), = leases(lab, "b")
    assert (a_ip, b_ip) == (lab.host_ip4("a"), lab.host_ip4("b"))
    # Each side ends on the other's mapped address (the best rank it can validate; the
    # first direct pair may be a peer-reflexive one opened by the other side's probe).
    a_mapped = re.escape(f"remote={lab.public_ip4('a')}:{a_ext} ")
    b_mapped = re.escape(f"remote={lab.public_ip4('b')}:{b_ext} ")
    t.connect_proc.wait_for_line(rf"path=direct .*{a_mapped}", timeout=15)
    t.serve_proc.wait_for_line(rf"path=direct .*{b_mapped}", timeout=15)
    for proc in (t.serve_proc, t.connect_proc):
        assert re.search(r"portmap: \w+ granted", proc.output()), proc.tail()
        assert proc.count_matches(BIRTHDAY) == 0
    before = lab.direct_udp_bytes()
    t.transfer(down=SIZE)
    t.transfer(up=SIZE)
    assert lab.direct_udp_bytes() - before >= 2 * SIZE
    assert lab.relay_tcp_bytes() < SIZE // 10
    assert t.last_path() == "direct"


@pytest.mark.parametrize("mapped", ["serve", "connect"])
def test_symmetric_with_mapping_to_cone_goes_direct_without_birthday(
        lab_factory: LabFactory, tunnel_factory: TunnelFactory, mapped: str) -> None:
    sym = site("symmetric", "allow")
    lab = lab_factory(sym, site("cone")) if mapped == "serve" else \
        lab_factory(site("cone"), sym)
    t = tunnel_factory(lab)
    t0 = start(t)
    m = t.wait_path("direct", timeout=30)
    print(f"\nsymmetric+portmap ({mapped}) <-> cone: direct after "
          f"{time.monotonic() - t0:.2f} s: {m.group(0)}")
    assert t.serve_proc is not None and t.connect_proc is not None
    sym_site, cone_proc = ("a", t.connect_proc) if mapped == "serve" else ("b", t.serve_proc)
    (ext, _ip, _port), = leases(lab, sym_site)
    # the cone side reaches the symmetric side at the mapped address
    mapped = re.escape(f"remote={lab.public_ip4(sym_site)}:{ext} ")
    cone_proc.wait_for_line(rf"path=direct .*{mapped}", timeout=15)
    t.transfer(down=SIZE)
    assert_direct(lab, SIZE, family=4)
    for proc in (t.serve_proc, t.connect_proc):
        assert proc.count_matches(BIRTHDAY) == 0, proc.tail()


def test_refusing_router_symmetric_pair_is_relayed(lab_factory: LabFactory,
                                                   tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory(site("symmetric", "deny"), site("symmetric", "deny"))
    t = tunnel_factory(lab)
    start(t)
    t.wait_path("relay", timeout=30)
    t.transfer(down=SIZE)
    assert_relayed(lab, SIZE)
    assert leases(lab, "a") == [] and leases(lab, "b") == []
    assert t.connect_proc is not None
    assert re.search(r"portmap: no mapping after .*pcp: refused: NOT_AUTHORIZED",
                     t.connect_proc.output()), t.connect_proc.tail()


def test_refusing_router_symmetric_to_cone_uses_birthday(lab_factory: LabFactory,
                                                         tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory(site("symmetric", "deny"), site("cone"))
    t = tunnel_factory(lab)
    t0 = start(t)
    t.wait_path("relay", timeout=30)
    m = t.wait_path("direct", timeout=40)
    print(f"\nsymmetric (refused) <-> cone: direct after {time.monotonic() - t0:.1f} s")
    assert t.serve_proc is not None and t.connect_proc is not None
    assert t.serve_proc.wait_for_line(BIRTHDAY, timeout=5).group(1) == "hard"
    assert t.connect_proc.wait_for_line(BIRTHDAY, timeout=5).group(1) == "easy"
    assert lab.public_ip4("a") in m.string
    t.transfer(down=SIZE)
    assert_direct(lab, SIZE, family=4)
    assert leases(lab, "a") == []


def _mapped_pair(lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> tuple[Lab, Tunnel]:
    lab = lab_factory(site("symmetric", "allow"), site("symmetric", "allow"))
    t = tunnel_factory(lab)
    start(t)
    t.wait_path("direct", timeout=30)
    assert len(leases(lab, "a")) == 1 and len(leases(lab, "b")) == 1
    return lab, t


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_mappings_deleted_when_connect_and_serve_are_stopped(
        lab_factory: LabFactory, tunnel_factory: TunnelFactory, how: str) -> None:
    lab, t = _mapped_pair(lab_factory, tunnel_factory)
    assert t.serve_proc is not None and t.connect_proc is not None
    signum = getattr(signal, how)
    status = 128 + signum if how == "SIGTERM" else 130
    os.killpg(t.connect_proc.pid, signum)
    assert t.connect_proc.wait(15) == status, t.connect_proc.tail()
    assert leases(lab, "b") == [], t.connect_proc.tail()
    # the server's session ends (the client's CONNECTION_CLOSE): its mapping goes too
    assert wait_until(lambda: leases(lab, "a") == []), t.serve_proc.tail()
    # a new session maps again; stopping serve deletes that one
    t.connect("-v")
    t.connect_proc.wait_for_line(r"path=direct", timeout=30)
    assert wait_until(lambda: len(leases(lab, "a")) == 1)
    os.killpg(t.serve_proc.pid, signum)
    assert t.serve_proc.wait(15) == status, t.serve_proc.tail()
    assert leases(lab, "a") == [], t.serve_proc.tail()
    assert "Traceback" not in t.serve_proc.output() + t.connect_proc.output()


def test_mapping_deleted_when_connect_stdio_ends(lab_factory: LabFactory,
                                                 tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory(site("symmetric", "allow"), site("symmetric", "allow"))
    t = tunnel_factory(lab)
    t.start_relay()
    t.start_service()
    t.serve("-v")
    # ECHO through the service, then stdin ends: connect finishes on its own
    r = lab.run(lab.host_b_ns, [str(t.quictun), "connect", NAME, "--stdio", "-v",
                                "--signal", t.signal],
                env=t.env("b"), input="ECHO\nhello\n", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout
    assert re.search(r"portmap: \w+ granted", r.stderr), r.stderr
    assert leases(lab, "b") == [], r.stderr
    assert wait_until(lambda: leases(lab, "a") == [])


@pytest.mark.parametrize(("portmap", "offered"), [("allow", "UPnP, NAT-PMP, PCP"),
                                                  ("deny", "UPnP, NAT-PMP, PCP"),
                                                  ("none", "none")])
def test_netcheck_reports_the_mapping(lab_factory: LabFactory, tunnel_factory: TunnelFactory,
                                      portmap: str, offered: str) -> None:
    lab = lab_factory(site("symmetric", portmap), site("cone"))
    t = tunnel_factory(lab)
    t.start_relay()
    r = lab.run(lab.host_a_ns, [str(t.quictun), "netcheck", "--json", "--signal", t.signal],
                env=t.env("a"), timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mapping"] == "endpoint-dependent"
    assert report["portmap"] == offered
    if portmap == "allow":
        ip, _, port = report["portmap_mapped"].rpartition(":")
        assert ip == lab.public_ip4("a") and int(port) > 0
        assert report["portmap_protocol"] in ("PCP", "NAT-PMP", "UPnP")
        assert report["verdict"] == VERDICT_PORTMAP.format(protocol=report["portmap_protocol"])
    else:
        assert report["portmap_mapped"] is None
        assert report["verdict"] == VERDICT_SYMMETRIC
    assert leases(lab, "a") == []  # the test mapping is gone
    text = lab.run(lab.host_a_ns, [str(t.quictun), "netcheck", "--signal", t.signal],
                   env=t.env("a"), timeout=60).stdout
    assert re.search(rf"^\s+portmap:\s+{re.escape(offered)}$", text, re.M), text
    off = lab.run(lab.host_a_ns, [str(t.quictun), "netcheck", "--json", "--no-portmap",
                                  "--signal", t.signal], env=t.env("a"), timeout=60)
    assert json.loads(off.stdout)["portmap"] == "off"
