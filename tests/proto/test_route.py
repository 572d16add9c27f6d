"""Default-gateway parsers (quictun.proto.route) on real /proc text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from quictun.proto import route

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010113C6\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000113C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
tun0\t00000000\t00000000\t0001\t0\t0\t50\t00000000\t0\t0\t0
"""

IPV6_ROUTE = (
    "20010db8000100000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
)


def test_ipv4_default_gateways_by_metric() -> None:
    gws = route.default_gateways_v4(ROUTE)
    assert [(g.ip, g.iface, g.metric) for g in gws] == [
        ("198.19.1.1", "eth0", 100), ("192.168.2.1", "wlan0", 600)]


def test_big_endian_hosts() -> None:
    text = ROUTE.splitlines()[0] + "\neth0\t00000000\tC6130101\t0003\t0\t0\t0\t00000000\n"
    assert route.default_gateways_v4(text, little_endian=False)[0].ip == "198.19.1.1"


def test_ipv6_default_gateway() -> None:
    gws = route.default_gateways_v6(IPV6_ROUTE)
    assert [(g.ip, g.iface) for g in gws] == [("fe80::1", "eth0")]


def test_no_default_route() -> None:
    assert route.default_gateways_v4(ROUTE.splitlines()[0] + "\n") == []
    assert route.default_gateways_v6("") == []


@given(st.text(max_size=400))
def test_garbage_never_raises(text: str) -> None:
    route.default_gateways_v4(text)
    route.default_gateways_v6(text)
