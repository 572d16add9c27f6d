"""Addresses and candidates: the one ``(ip, port)`` form used everywhere, and their texts.

Every address inside quictun is a plain ``(ip, port)`` tuple of :data:`Addr`, IPv4 written
as IPv4 even when a dual-stack socket reports it as IPv4-mapped IPv6 (``::ffff:a.b.c.d``).
Sockets map back to that form at their edge (``quictun.aio.udp``) and nowhere else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import TunnelError, printable

__all__ = ["CANDIDATE_KINDS", "Addr", "Candidate", "decode_candidates", "format_addr",
           "normalize_addr", "parse_hostport", "parse_relay_url", "unmap"]

Addr = tuple[str, int]

_MAPPED = "::ffff:"
CANDIDATE_KINDS = ("host", "srflx", "prflx", "portmap")
"""Known kinds. A peer skips a kind it does not know (:func:`decode_candidates` drops it),
so a new kind reaches older peers as nothing rather than as an error."""
_MAX_CANDIDATE_TEXT = 128
MAX_SIGNALLED = 32


def unmap(ip: str) -> str:
    """``ip`` without an IPv4-mapped IPv6 prefix (``::ffff:192.0.2.1`` -> ``192.0.2.1``).

    A cheap string test, for hot paths (every received datagram); it does not validate.
    """
    return ip[7:] if ip.startswith(_MAPPED) and "." in ip else ip


def format_addr(ip: str, port: int) -> str:
    """``ip:port`` for IPv4 (an IPv4-mapped address is shown as IPv4), ``[ip]:port``
    for IPv6."""
    ip = unmap(ip)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def normalize_addr(addr: Sequence[Any]) -> Addr:
    """Return ``(ip, port)`` in canonical form.

    Accepts socket address tuples of any length (IPv6 ones carry flowinfo and scope id);
    unmaps IPv4-mapped IPv6 (``::ffff:192.0.2.1`` -> ``192.0.2.1``) and compresses IPv6.

    Raises:
        ValueError: not an IP address, or the port is not in 1..65535.
    """
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"bad address: {addr!r}")
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return (str(ip), port)


def parse_hostport(
    text: str, default_host: str = "127.0.0.1", *, allow_zero: bool = False
) -> Addr:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (the host may be a name).

    Raises:
        ValueError: with a text for a person, also for an IPv6 address without brackets
            (which would be ambiguous) and a port out of range (0 only with
            ``allow_zero``).
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{text!r} is not HOST:PORT or [IPV6]:PORT")
        host = host[1:-1]
    elif ":" in host or "]" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:22")
    host = host or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not HOST:PORT") from None
    if not (0 if allow_zero else 1) <= p < 65536:
        raise ValueError(f"port {p} out of range in {text!r}")
    return host, p


@dataclass(frozen=True)
class Candidate:
    """A transport address at which the peer may be reachable.

    Construction validates and normalises (see :func:`normalize_addr`); raises
    ValueError for an unknown kind or an unusable address (unspecified, multicast).
    """

    addr: Addr
    """The address, normalised."""
    kind: str
    """``"host"`` (an interface address), ``"srflx"`` (learned from a STUN reflector),
    ``"prflx"`` (learned from the source of a signed probe) or ``"portmap"`` (a port
    mapping the gateway granted: UPnP IGD, NAT-PMP or PCP)."""

    def __post_init__(self) -> None:
        if self.kind not in CANDIDATE_KINDS:
            raise ValueError(f"unknown candidate kind: {self.kind!r}")
        addr = normalize_addr(self.addr)
        ip = ipaddress.ip_address(addr[0])
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"unusable candidate address: {addr[0]}")
        object.__setattr__(self, "addr", addr)

    def encode(self) -> str:
        """Return the wire form ``"<kind> <ip> <port>"``, e.g. ``"host 198.19.1.2 40000"``."""
        return f"{self.kind} {self.addr[0]} {self.addr[1]}"

    @classmethod
    def decode(cls, text: str) -> Candidate:
        """Parse the wire form produced by :meth:`encode`.

        The text comes from the network: anything but exactly ``kind ip port`` (ASCII
        decimal port, at most 128 characters) raises ValueError.
        """
        if not isinstance(text, str) or len(text) > _MAX_CANDIDATE_TEXT:
            raise ValueError("candidate text too long or not a string")
        parts = text.split(" ")
        if len(parts) != 3:
            raise ValueError(f"malformed candidate: {text!r}")
        kind, host, port_text = parts
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
            raise ValueError(f"malformed candidate port: {port_text!r}")
        return cls((host, int(port_text)), kind)


def decode_candidates(raw: object, limit: int = MAX_SIGNALLED) -> list[Candidate]:
    """The valid candidates of a list of wire texts from the peer (the others are
    skipped: one bad entry must not cost the good ones), at most ``limit``."""
    out = []
    for c in raw if isinstance(raw, list) else []:
        try:
            out.append(Candidate.decode(c))
        except (ValueError, TypeError):
            continue
    return out[:limit]


def parse_relay_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a relay URL; :class:`TunnelError` (one line) if it is
    not ``ws://HOST[:PORT]/`` or ``wss://HOST[:PORT]/`` with a port in 1..65535."""
    hint = "expected ws://HOST:PORT/ or wss://HOST:PORT/"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise TunnelError(f"bad relay URL {printable(url)!r}: it contains a space or a control "
                          "character (pasted with a trailing space or newline?); remove it")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # e.g. port 99999, an unclosed [IPv6 bracket
        raise TunnelError(f"bad relay URL {printable(url)!r} ({exc}): {hint}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise TunnelError(f"bad relay URL {printable(url)!r}: {hint}")
    if port == 0:
        raise TunnelError(f"bad relay URL {printable(url)!r} (port 0): {hint}")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "wss" else 80)
