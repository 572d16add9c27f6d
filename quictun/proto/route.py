"""Pure parsers of Linux's routing tables (``/proc/net/route``, ``/proc/net/ipv6_route``).

The port mapper asks the default gateway (PCP, NAT-PMP): these functions find it in the
text of those files, which the shell reads. Malformed lines are skipped, never fatal (the
kernel's format is stable, but the text is whatever the caller passes).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["Gateway", "default_gateways_v4", "default_gateways_v6"]

_RTF_UP = 0x0001
_RTF_GATEWAY = 0x0002
_RTF_REJECT = 0x0200


@dataclass(frozen=True)
class Gateway:
    """A default route's next hop."""

    ip: str
    """The gateway's address (IPv6 ones are usually link-local: use ``iface``)."""
    iface: str
    """The interface the route leaves by."""
    metric: int
    """The route's metric (lower is preferred)."""


def _hex(text: str, width: int) -> int | None:
    if len(text) != width or any(c not in "0123456789abcdefABCDEF" for c in text):
        return None
    return int(text, 16)


def default_gateways_v4(text: str, *, little_endian: bool = True) -> list[Gateway]:
    """Default IPv4 gateways in ``/proc/net/route`` text, best (lowest metric) first.

    Args:
        text: the file's content (header line included).
        little_endian: the addresses are printed in the host's byte order; pass
            ``sys.byteorder == "little"``.
    """
    out: list[Gateway] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, gw, flags, metric, mask = (fields[0], _hex(fields[1], 8),
                                                _hex(fields[2], 8), _hex(fields[3], 4),
                                                fields[6], _hex(fields[7], 8))
        if dest != 0 or mask != 0 or gw is None or flags is None or not metric.isdigit():
            continue
        if flags & (_RTF_UP | _RTF_GATEWAY) != (_RTF_UP | _RTF_GATEWAY) or gw == 0:
            continue
        raw = gw.to_bytes(4, "little" if little_endian else "big")
        out.append(Gateway(str(ipaddress.IPv4Address(raw)), iface, int(metric)))
    return sorted(out, key=lambda g: g.metric)


def default_gateways_v6(text: str) -> list[Gateway]:
    """Default IPv6 gateways in ``/proc/net/ipv6_route`` text, best first (reject routes
    and the loopback interface skipped)."""
    out: list[Gateway] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        dest, plen, nexthop = _hex(fields[0], 32), _hex(fields[1], 2), _hex(fields[4], 32)
        metric, flags, iface = _hex(fields[5], 8), _hex(fields[8], 8), fields[9]
        if dest != 0 or plen != 0 or not nexthop or metric is None or flags is None:
            continue
        if flags & _RTF_REJECT or not flags & _RTF_UP or not flags & _RTF_GATEWAY:
            continue
        if iface == "lo":
            continue
        ip = ipaddress.IPv6Address(nexthop.to_bytes(16, "big"))
        out.append(Gateway(str(ip), iface, metric))
    return sorted(out, key=lambda g: g.metric)
