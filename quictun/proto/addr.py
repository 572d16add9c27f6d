"""Addresses: the one ``(ip, port)`` form used everywhere, and how it is written.

Every address inside quictun is a plain ``(ip, port)`` tuple of :data:`Addr`, IPv4 written
as IPv4 even when a dual-stack socket reports it as IPv4-mapped IPv6 (``::ffff:a.b.c.d``).
Sockets map back to that form at their edge (``quictun.aio.udp``) and nowhere else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

__all__ = ["Addr", "format_addr", "normalize_addr", "parse_hostport", "unmap"]

Addr = tuple[str, int]

_MAPPED = "::ffff:"


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
