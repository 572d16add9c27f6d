"""Hard NAT cases in the network lab: birthday probing and the stale-conntrack trap.

* symmetric (``masquerade random``) <-> port-restricted cone: the naive punch cannot
  work (NOTES.md section 1); birthday probing (quictun.punch.birthday: 256 extra sockets on the
  symmetric side, random-port probes from the cone side) must find a direct pair.
* both routers *accept* unsolicited wan input: a peer's early probe leaves a stale
  conntrack entry that moves our mapping (the trap). Low-TTL first probes open our own NAT
  and die before the far router. The lab's wan is one L2 bridge (the routers are adjacent),
  so :func:`emulate_internet_hops` drops packets whose TTL would not survive the four
  router hops of a real path; without it the low-TTL probes reach the far router, which
  is exactly the behaviour without low-TTL probes (the control case).

Data integrity is checked by SHA-256 (the tunnel lab's client), the path by nftables
counters. Reuses the fixtures and helpers of ``test_lab_tunnel``.
"""

from __future__ import annotations

import time

import pytest

from .netlab import Lab, SiteSpec
from .test_lab_tunnel import (  # noqa: F401  (pytestmark and the fixture, used by name)
    MB,
    SIZE,
    LabFactory,
    TunnelFactory,
    assert_direct,
    pytestmark,
)
from .test_lab_tunnel import tunnel_factory as tunnel_factory  # noqa: F401

HOPS = 4  # routers a real internet path would have between the two sites (at least)


def emulate_internet_hops(lab: Lab, hops: int = HOPS) -> None:
    """Drop, on the wan bridge, IPv4 packets whose TTL would die within ``hops`` routers."""
    ruleset = f"""
table bridge qlab_hops {{
  counter ttl_expired {{}}
  chain forward_chain {{
    type filter hook forward priority -10; policy accept;
    ether type ip ip ttl <= {hops} counter name ttl_expired drop
  }}
}}
"""
    lab.run(lab.wan_ns, ["nft", "-f", "-"], input=ruleset, check=True)


def ttl_expired(lab: Lab) -> int:
    r = lab.run(lab.wan_ns, ["nft", "list", "counter", "bridge", "qlab_hops", "ttl_expired"])
    for word, nxt in zip(r.stdout.split(), r.stdout.split()[1:], strict=False):
        if word == "packets":
            return int(nxt)
    return 0


def test_symmetric_to_cone_goes_direct_by_birthday(lab_factory: LabFactory,
                                                   tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory(SiteSpec("symmetric", ipv6=False), SiteSpec("cone", ipv6=False))
    t = tunnel_factory(lab)
    t.start_relay()
    t.start_service()
    t.serve()
    t0 = time.monotonic()
    t.connect()
    t.wait_path("relay", timeout=30)
    m = t.wait_path("direct", timeout=40)
    print(f"\nsymmetric<->cone: direct after {time.monotonic() - t0:.1f} s: {m.group(0)}")
    assert lab.public_ip4("a") in m.string  # B reaches A's symmetric NAT
    before = lab.direct_udp_bytes()
    t.transfer(down=SIZE)
    t.transfer(up=SIZE)
    assert lab.direct_udp_bytes() - before >= 2 * SIZE
    assert t.last_path() == "direct"


def test_accept_wan_input_trap(lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    """Routers that accept unsolicited wan input (NOTES §1 trap): low-TTL first probes.

    Control, measured by hand and not kept as a test (it can only observe): without the
    hop emulation the TTL-5 probes reach the adjacent far router, the stale entry
    forms, and the pair stayed relayed for 25 s.
    """
    spec = SiteSpec("cone", drop_wan_input=False, ipv6=False)
    lab = lab_factory(spec, spec)
    emulate_internet_hops(lab)
    t = tunnel_factory(lab)
    t.start_relay()
    t.start_service()
    t.serve()
    t0 = time.monotonic()
    t.connect()
    m = t.wait_path("direct", timeout=30)
    print(f"\naccept-input cone pair: direct after {time.monotonic() - t0:.1f} s")
    assert m is not None, "low-TTL first probes should avoid the stale-entry trap"
    assert ttl_expired(lab) > 0  # the low-TTL probes did die on the way
    t.transfer(down=MB * 4)
    assert_direct(lab, MB * 4, family=4)


@pytest.mark.parametrize("easy", ["cone", "firewall"])
def test_easy_side_to_symmetric_goes_direct_by_birthday(lab_factory: LabFactory,
                                                        tunnel_factory: TunnelFactory,
                                                        easy: str) -> None:
    """A stateful firewall filters like a port-restricted cone: birthday needed for both."""
    lab = lab_factory(SiteSpec(easy, ipv6=False), SiteSpec("symmetric", ipv6=False))
    t = tunnel_factory(lab)
    t.start_relay()
    t.start_service()
    t.serve()
    t0 = time.monotonic()
    t.connect()
    m = t.wait_path("direct", timeout=40)
    print(f"\n{easy}<->symmetric: direct after {time.monotonic() - t0:.1f} s: {m.group(0)}")
    t.transfer(down=SIZE)
    assert_direct(lab, SIZE, family=4)


def test_direct_only_between_symmetric_nats_fails_with_one_clear_line(
        lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    """Two symmetric NATs cannot punch; --direct-only must say so and exit non-zero."""
    lab = lab_factory(SiteSpec("symmetric", ipv6=False), SiteSpec("symmetric", ipv6=False))
    t = tunnel_factory(lab)
    t.start_relay()
    t.start_service()
    t.serve()
    r = lab.run(lab.host_b_ns,
                [str(t.quictun), "connect", "labsvc", "--stdio", "--direct-only",
                 "--signal", t.signal],
                env=t.env("b"), input="x", timeout=60)
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "punching failed" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert lab.relay_tcp_bytes() < 200_000  # nothing but signalling went through the relay
