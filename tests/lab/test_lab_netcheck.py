"""`quictun netcheck` behind each kind of router in the lab: the reported UDP
reachability, NAT mapping and public address must match what the lab built."""

from __future__ import annotations

import json

import pytest

from .netlab import SiteSpec
from .test_lab_tunnel import (  # noqa: F401  (pytestmark and the fixture, used by name)
    LabFactory,
    TunnelFactory,
    pytestmark,
)
from .test_lab_tunnel import tunnel_factory as tunnel_factory  # noqa: F401

CASES = [
    # kind, udp, mapping, public address is the router's (NAT) or the host's own
    ("firewall", True, "endpoint-independent"),
    ("cone", True, "endpoint-independent"),
    ("symmetric", True, "endpoint-dependent"),
    ("udp-blocked", False, None),
]


@pytest.mark.parametrize(("kind", "udp", "mapping"), CASES, ids=[c[0] for c in CASES])
def test_netcheck_reports_what_the_router_does(lab_factory: LabFactory,
                                               tunnel_factory: TunnelFactory, kind: str,
                                               udp: bool, mapping: str | None) -> None:
    lab = lab_factory(SiteSpec(kind, ipv6=False), SiteSpec("cone", ipv6=False))
    t = tunnel_factory(lab)
    t.start_relay()
    r = lab.run(lab.host_a_ns, [str(t.quictun), "netcheck", "--json", "--signal", t.signal],
                env=t.env("a"), timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["udp"] is udp
    assert report["mapping"] == mapping
    if udp:
        ip, _, port = report["public_addr"].rpartition(":")
        assert ip == lab.public_ip4("a") and int(port) > 0
    else:
        assert report["public_addr"] is None
        assert "relayed" in report["verdict"]
