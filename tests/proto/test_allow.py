"""serve --allow: the rule grammar and the matcher. A client can never reach a port or a
host the rules do not name: these tests try other ports, other hosts, IPv6 spellings,
numeric forms C resolvers accept, and names that resolve to forbidden addresses."""

from __future__ import annotations

import pytest

from quictun.proto.allow import (
    AllowError,
    AllowList,
    Connect,
    Refused,
    Resolve,
    parse_rule,
    parse_target_host,
)


def allow(*rules: str) -> AllowList:
    return AllowList(rules)


# -- grammar ------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind", "ports"), [
    ("10.0.0.0/8", "net", ((1, 65535),)),
    ("192.168.1.5:22", "net", ((22, 22),)),
    ("192.168.1.0/24:22,80,8000-8999", "net", ((22, 22), (80, 80), (8000, 8999))),
    ("[2001:db8::/32]:443", "net", ((443, 443),)),
    ("2001:db8::/32", "net", ((1, 65535),)),
    ("[::1]:8080", "net", ((8080, 8080),)),
    ("nas.lan:443", "name", ((443, 443),)),
    ("NAS.Lan.", "name", ((1, 65535),)),
    ("*.lan:80", "suffix", ((80, 80),)),
    ("*:443", "any", ((443, 443),)),
    ("*:*", "any", ((1, 65535),)),
])
def test_rule_grammar(text: str, kind: str, ports: tuple) -> None:
    r = parse_rule(text)
    assert (r.kind, r.ports) == (kind, ports)


@pytest.mark.parametrize("text", [
    "", ":22", "10.0.0.1/8", "10.0.0.0/33", "300.1.1.1", "nas.lan:0", "nas.lan:65536",
    "nas.lan:90-80", "nas.lan:http", "[2001:db8::/32", "[::1]22", "bad_host!:22",
    "*.:22", "10.0.0.0/8:22-", "127.1",
])
def test_malformed_rules_say_why(text: str) -> None:
    with pytest.raises(AllowError) as exc:
        parse_rule(text)
    assert "--allow" in str(exc.value) and "\n" not in str(exc.value)


def test_mapped_ipv6_rule_is_the_ipv4_network() -> None:
    r = parse_rule("[::ffff:10.0.0.0/104]:22")
    assert r.network is not None and r.network.version == 4 and str(r.network) == "10.0.0.0/8"


# -- default deny ----------------------------------------------------------------------
def test_no_rules_refuses_everything() -> None:
    for host in ("127.0.0.1", "10.0.0.1", "example.org", "::1"):
        assert isinstance(AllowList().check(host, 80), Refused)


# -- ports -----------------------------------------------------------------------------
def test_port_range_edges() -> None:
    a = allow("10.0.0.0/8:8000-8999,22")
    assert a.check("10.1.2.3", 8000) == Connect(("10.1.2.3",), 8000)
    assert a.check("10.1.2.3", 8999) == Connect(("10.1.2.3",), 8999)
    assert a.check("10.1.2.3", 22) == Connect(("10.1.2.3",), 22)
    for port in (7999, 9000, 21, 23, 0, 65536, -1, 80):
        assert isinstance(a.check("10.1.2.3", port), Refused), port


def test_other_ports_of_an_allowed_host_are_refused() -> None:
    a = allow("192.168.1.5:22")
    assert isinstance(a.check("192.168.1.5", 22), Connect)
    for port in (1, 21, 23, 80, 443, 65535):
        assert isinstance(a.check("192.168.1.5", port), Refused)


# -- hosts -----------------------------------------------------------------------------
def test_other_hosts_are_refused() -> None:
    a = allow("192.168.1.0/24:80")
    assert isinstance(a.check("192.168.1.255", 80), Connect)
    for host in ("192.168.2.1", "192.168.0.255", "10.0.0.1", "127.0.0.1", "0.0.0.0",
                 "255.255.255.255", "::1", "2001:db8::1"):
        assert isinstance(a.check(host, 80), Refused), host


@pytest.mark.parametrize("host", [
    "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1",
    "::1", "[::1]", "0:0:0:0:0:0:0:1", "::", "::127.0.0.1", "fe80::1%lo", "[fe80::1%25lo]",
])
def test_ipv6_spellings_of_loopback_stay_out(host: str) -> None:
    a = allow("10.0.0.0/8", "*.lan", "*:443")  # generous, but nothing names loopback
    assert isinstance(a.check(host, 443), Refused), host
    assert isinstance(a.check(host, 22), Refused), host


def test_ipv4_mapped_ipv6_counts_as_the_ipv4_address() -> None:
    a = allow("10.0.0.0/8:22")
    assert a.check("::ffff:10.1.2.3", 22) == Connect(("10.1.2.3",), 22)
    assert isinstance(a.check("::ffff:11.1.2.3", 22), Refused)


def test_ipv6_network_rule() -> None:
    a = allow("[2001:db8:1::/48]:22")
    assert a.check("2001:db8:1::5", 22) == Connect(("2001:db8:1::5",), 22)
    assert a.check("[2001:DB8:1:0::5]", 22) == Connect(("2001:db8:1::5",), 22)
    assert isinstance(a.check("2001:db8:2::5", 22), Refused)
    assert isinstance(a.check("10.0.0.1", 22), Refused)


@pytest.mark.parametrize("host", [
    "127.1", "0x7f000001", "0x7f.1", "017700000001", "2130706433", "127.0.0.1.",
    "1.2.3.4.5", "10.0.0.1 ", " 10.0.0.1", "a..b", "", ".", "exa mple.org", "ex\x00.org",
    "ünï.lan", "-a.lan", "a-.lan", "a" * 64 + ".lan", "127.0.0.01",
])
def test_numeric_and_odd_forms_are_neither_names_nor_addresses(host: str) -> None:
    assert parse_target_host(host) is None, host
    assert isinstance(allow("*", "0.0.0.0/0").check(host, 80), Refused), host


def test_unspecified_is_never_a_target() -> None:
    a = allow("0.0.0.0/0", "[::/0]", "*")
    for host in ("0.0.0.0", "::", "::ffff:0.0.0.0"):
        assert isinstance(a.check(host, 80), Refused), host
    assert isinstance(a.check_resolved("x.lan", 80, ["0.0.0.0", "::"]), Refused)


def test_star_means_any_remote_host_but_not_loopback() -> None:
    a = allow("*:443")
    assert isinstance(a.check("203.0.113.9", 443), Connect)
    assert isinstance(a.check("127.0.0.1", 443), Refused)
    assert isinstance(a.check("example.org", 443), Resolve)
    assert isinstance(a.check_resolved("example.org", 443, ["127.0.0.1"]), Refused)
    assert isinstance(a.check("203.0.113.9", 80), Refused)


def test_loopback_only_through_a_rule_that_names_it() -> None:
    assert isinstance(allow("127.0.0.1:8080").check("127.0.0.1", 8080), Connect)
    assert isinstance(allow("127.0.0.1:8080").check("127.0.0.2", 8080), Refused)
    a = allow("localhost:8080")
    assert a.check("localhost", 8080) == Resolve("localhost", 8080)
    assert a.check_resolved("localhost", 8080, ["127.0.0.1", "::1"]) == Connect(
        ("127.0.0.1", "::1"), 8080)


# -- names -----------------------------------------------------------------------------
def test_name_rules_match_names_exactly_or_as_suffix() -> None:
    a = allow("nas.lan:443", "*.home.arpa:80")
    assert a.check("NAS.lan.", 443) == Resolve("nas.lan", 443)
    assert a.check("cam.home.arpa", 80) == Resolve("cam.home.arpa", 80)
    assert a.check("a.b.home.arpa", 80) == Resolve("a.b.home.arpa", 80)
    for host, port in (("nas.lan", 80), ("nas.lan.evil", 443), ("xnas.lan", 443),
                       ("home.arpa", 80), ("evilhome.arpa", 80), ("cam.home.arpa", 443)):
        assert isinstance(a.check(host, port), Refused), (host, port)


def test_names_are_refused_before_dns_when_nothing_could_allow_them() -> None:
    # only name rules, none matching: no DNS query is even asked for
    assert isinstance(allow("nas.lan").check("printer.lan", 80), Refused)
    # a CIDR rule on the port: the name must be resolved to decide
    assert allow("10.0.0.0/8:80").check("printer.lan", 80) == Resolve("printer.lan", 80)
    assert isinstance(allow("10.0.0.0/8:80").check("printer.lan", 81), Refused)


def test_dns_names_resolving_to_forbidden_addresses_are_refused() -> None:
    a = allow("192.168.1.0/24:80")
    assert isinstance(a.check_resolved("evil.example", 80, ["127.0.0.1"]), Refused)
    assert isinstance(a.check_resolved("evil.example", 80, ["::ffff:127.0.0.1"]), Refused)
    assert isinstance(a.check_resolved("evil.example", 80, ["10.0.0.1", "::1"]), Refused)
    assert isinstance(a.check_resolved("evil.example", 80, []), Refused)
    # only the allowed addresses are kept, in the resolver's order, no duplicates
    got = a.check_resolved("mixed.example", 80,
                           ["127.0.0.1", "192.168.1.7", "::ffff:192.168.1.7", "192.168.1.8"])
    assert got == Connect(("192.168.1.7", "192.168.1.8"), 80)


def test_wildcard_name_rules_do_not_reach_loopback_through_dns() -> None:
    a = allow("*.lan:80")
    assert isinstance(a.check_resolved("rebind.lan", 80, ["127.0.0.1", "::1"]), Refused)
    assert a.check_resolved("nas.lan", 80, ["192.168.1.9"]) == Connect(("192.168.1.9",), 80)


def test_resolved_check_uses_the_port_rules_too() -> None:
    a = allow("nas.lan:443", "10.0.0.0/8:22")
    assert isinstance(a.check_resolved("nas.lan", 22, ["192.168.1.2"]), Refused)
    assert a.check_resolved("nas.lan", 22, ["10.0.0.2"]) == Connect(("10.0.0.2",), 22)
