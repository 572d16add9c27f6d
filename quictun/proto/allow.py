"""Which proxy (SOCKS / HTTP CONNECT) targets ``serve --allow`` permits (pure).

Theory of operation
-------------------
A client names any ``host:port``; the serving side decides, **before any connection or
DNS query**, with :meth:`AllowList.check`, and after resolving a name, with
:meth:`AllowList.check_resolved` (the addresses to connect to are exactly the ones it
returns: nothing is resolved twice, so a DNS answer that changes cannot slip past). No
rule, no proxying: an empty list refuses everything.

Rule grammar (one per ``--allow``)::

    rule   := hosts [":" ports]            (no ports: every port, 1-65535)
    hosts  := "*" | CIDR | ADDRESS | NAME | "*." DOMAIN
              IPv6 in brackets when ports follow: [2001:db8::/32]:443
    ports  := "*" | item ("," item)*       item := PORT | PORT "-" PORT (both ends included)

Meaning, for a target whose port a rule permits:

- an address (IPv4, IPv6; an IPv4-mapped IPv6 address counts as the IPv4 one) is
  allowed when a CIDR/address rule contains it;
- a name is resolved on the serving side; each resolved address is kept when a CIDR
  rule contains it, or when an exact name rule names the target (it trusts the DNS
  answer for that name), or when ``*`` / ``*.domain`` matches it and the address is
  not loopback;
- ``*`` and ``*.domain`` never reach loopback (127.0.0.0/8, ::1, and the deprecated
  IPv4-compatible ``::a.b.c.d``): only a rule that names it does (``127.0.0.1:8080``,
  ``localhost:8080``); the unspecified addresses (0.0.0.0, ::, which mean "this host")
  are never reached;
- hosts that are not plain addresses or DNS names are refused: numeric forms that
  C resolvers read as addresses (``127.1``, ``0x7f000001``, ``017700000001``), zone
  ids (``fe80::1%eth0``), empty labels, non-ASCII text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["AllowError", "AllowList", "Connect", "Refused", "Resolve", "Rule",
           "parse_rule", "parse_target_host"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
ALL_PORTS = ((1, 65535),)


class AllowError(ValueError):
    """A malformed ``--allow`` rule; the text is for a person."""


@dataclass(frozen=True)
class Connect:
    """Allowed: connect to these addresses (in order), at ``port``."""

    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class Resolve:
    """Resolve ``name`` on the serving side, then call :meth:`AllowList.check_resolved`."""

    name: str
    port: int


@dataclass(frozen=True)
class Refused:
    """Not allowed; ``reason`` is for the log line."""

    reason: str


@dataclass(frozen=True)
class Rule:
    """One ``--allow`` rule (see the module docstring)."""

    text: str
    kind: str
    """``any`` (``*``), ``net`` (a CIDR or an address), ``name`` (exact) or ``suffix``."""
    ports: tuple[tuple[int, int], ...]
    network: IPNetwork | None = None
    name: str = ""
    """For ``name``: the name; for ``suffix``: the domain with its dot (``.lan``)."""

    def port_ok(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ports)

    def contains(self, ip: IPAddress) -> bool:
        """Whether this rule allows the address ``ip`` itself (not through a name)."""
        if self.kind == "net":
            assert self.network is not None
            return ip.version == self.network.version and ip in self.network
        return self.kind == "any" and not _local_like(ip)

    def matches_name(self, name: str) -> bool:
        if self.kind == "name":
            return name == self.name
        if self.kind == "suffix":
            return name.endswith(self.name)
        return self.kind == "any"


_COMPAT = ipaddress.IPv6Network("::/96")  # ::, ::1 and the deprecated IPv4-compatible ones


def _local_like(ip: IPAddress) -> bool:
    """Loopback, or an IPv6 address that embeds an IPv4 one the old way (::a.b.c.d)."""
    return ip.is_loopback or (ip.version == 6 and ip in _COMPAT)


def _unmap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parse_ports(text: str, rule: str) -> tuple[tuple[int, int], ...]:
    if text == "*":
        return ALL_PORTS
    out = []
    for item in text.split(","):
        lo_s, sep, hi_s = item.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise AllowError(f"--allow {rule!r}: {item!r} is not a port or a range "
                             "(22, 80,443, 8000-8999, *)") from None
        if not (1 <= lo <= hi <= 65535):
            raise AllowError(f"--allow {rule!r}: ports go from 1 to 65535, low-high ({item!r})")
        out.append((lo, hi))
    return tuple(out)


def _split_rule(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AllowError(f"--allow {text!r}: missing ']'")
        rest = text[end + 1:]
        if rest and not rest.startswith(":"):
            raise AllowError(f"--allow {text!r}: write [IPV6/LEN]:PORTS")
        return text[1:end], (rest[1:] if rest else None)
    if text.count(":") >= 2:
        return text, None  # an IPv6 network without brackets: no ports
    host, sep, ports = text.partition(":")
    return host, (ports if sep else None)


def _host_rule(host: str, rule: str, ports: tuple[tuple[int, int], ...]) -> Rule:
    if host == "*":
        return Rule(rule, "any", ports)
    if host.startswith("*."):
        domain = normalize_name(host[2:])
        if domain is None:
            raise AllowError(f"--allow {rule!r}: {host[2:]!r} is not a domain name")
        return Rule(rule, "suffix", ports, name="." + domain)
    if any(c in host for c in ":/") or host.replace(".", "").isdigit():
        try:
            net = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            raise AllowError(f"--allow {rule!r}: {exc}") from None
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(
                ipaddress.IPv6Network("::ffff:0:0/96")) and net.prefixlen >= 96:
            net = ipaddress.IPv4Network(
                (int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        return Rule(rule, "net", ports, network=net)
    name = normalize_name(host)
    if name is None:
        raise AllowError(f"--allow {rule!r}: {host!r} is not an address, a CIDR, a host "
                         "name or *.domain")
    return Rule(rule, "name", ports, name=name)


def parse_rule(text: str) -> Rule:
    """One ``--allow`` rule. Raises :class:`AllowError` with a one-line reason."""
    text = text.strip()
    if not text:
        raise AllowError("--allow: empty rule (e.g. 192.168.1.0/24:22,80 or nas.lan:443)")
    host, ports = _split_rule(text)
    if not host:
        raise AllowError(f"--allow {text!r}: no host (use * for any host)")
    return _host_rule(host, text, _parse_ports(ports, text) if ports is not None else ALL_PORTS)


def normalize_name(text: str) -> str | None:
    """``text`` as a DNS name (lower case, no trailing dot), or None if it is not one: also
    None for numeric forms a C resolver would read as an address (``127.1``, ``0x7f.1``)."""
    if not text.isascii():
        return None
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if _NUMERIC.fullmatch(labels[-1]):
        return None  # inet_aton reads these as numbers: "127.1", "0x7f000001", "1.2.3.4"
    return name.lower()


def parse_target_host(host: str) -> IPAddress | str | None:
    """A requested host as an address (unmapped) or a normalised name; None when it is
    neither (the request is refused as malformed)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:
        return None  # zone ids pick an interface: never
    try:
        return _unmap(ipaddress.ip_address(host))
    except ValueError:
        pass
    return normalize_name(host)


class AllowList:
    """The rules of one ``serve``; see the module docstring for what they mean."""

    def __init__(self, rules: Iterable[Rule | str] = ()) -> None:
        self.rules = tuple(r if isinstance(r, Rule) else parse_rule(r) for r in rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def texts(self) -> list[str]:
        return [r.text for r in self.rules]

    def check(self, host: str, port: int) -> Connect | Resolve | Refused:
        """The first decision on a request, made before any DNS query or connection."""
        if not self.rules:
            return Refused("this server allows no proxy targets (serve --allow)")
        if not 1 <= port <= 65535:
            return Refused(f"port {port} is out of range")
        rules = [r for r in self.rules if r.port_ok(port)]
        if not rules:
            return Refused(f"port {port} is not allowed")
        target = parse_target_host(host)
        if target is None:
            return Refused(f"{host[:80]!r} is neither an IP address nor a host name")
        if isinstance(target, str):
            if any(r.kind == "net" or r.matches_name(target) for r in rules):
                return Resolve(target, port)
            return Refused(f"{target}:{port} is not allowed")
        if target.is_unspecified:
            return Refused(f"{target} (this host, unspecified) is never a target")
        if any(r.contains(target) for r in rules):
            return Connect((str(target),), port)
        return Refused(f"{_hostport(str(target), port)} is not allowed")

    def check_resolved(self, name: str, port: int, addresses: Iterable[str]) -> Connect | Refused:
        """The addresses of ``name`` (as the resolver gave them) that may be connected
        to; Refused when none may."""
        rules = [r for r in self.rules if r.port_ok(port)]
        exact = any(r.kind == "name" and r.matches_name(name) for r in rules)
        loose = any(r.kind in ("any", "suffix") and r.matches_name(name) for r in rules)
        keep: list[str] = []
        seen: list[str] = []
        for text in addresses:
            try:
                ip = _unmap(ipaddress.ip_address(text.split("%")[0]))
            except ValueError:
                continue
            seen.append(str(ip))
            if ip.is_unspecified or str(ip) in keep:
                continue
            if (exact or (loose and not _local_like(ip))
                    or any(r.kind == "net" and r.contains(ip) for r in rules)):
                keep.append(str(ip))
        if keep:
            return Connect(tuple(keep), port)
        if not seen:
            return Refused(f"{name} has no address")
        return Refused(f"{name}:{port} resolves to {', '.join(seen[:4])}, which is not allowed")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
