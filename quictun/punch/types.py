"""Public data types of the path manager: candidates, paths, events and timing knobs.

Kept apart from :mod:`quictun.punch.manager` (which re-exports everything here) so that the state
machine module stays small. Pure data: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ..proto.addr import CANDIDATE_KINDS, Addr, Candidate, format_addr, normalize_addr

__all__ = [
    "Addr",
    "IPNetwork",
    "Candidate",
    "NetPath",
    "PathChanged",
    "PunchFailed",
    "SuspectChanged",
    "GatherWanted",
    "DatagramSizeChanged",
    "Event",
    "PathConfig",
    "normalize_addr",
    "rank_of",
    "CANDIDATE_KINDS",
    "RELAY_PATH",
    "Mode",
    "describe",
    "RANK_LAN",
    "RANK_IPV6",
    "RANK_HOST_IPV4",
    "RANK_PORTMAP",
    "RANK_REFLEXIVE",
    "RANK_RELAY",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(StrEnum):
    """How a tunnel may carry its data (``--direct-only``, ``--relay-only``)."""

    AUTO = "auto"
    """Direct when a path punches, the relay as a fallback."""
    DIRECT = "direct"
    """Never the relay: no path means failure."""
    RELAY = "relay"
    """Always the relay: no UDP at all (no probes, no answers)."""

RANK_LAN = 0
RANK_IPV6 = 1
RANK_HOST_IPV4 = 2
RANK_PORTMAP = 3
RANK_REFLEXIVE = 4
RANK_RELAY = 9

KIND_PREFERENCE = {"host": 0, "portmap": 1, "srflx": 2, "prflx": 3}
"""Lower is better when one address is signalled as several kinds."""


def rank_of(addr: Addr, kind: str, local_networks: Sequence[IPNetwork]) -> int:
    """The rank of a normalised remote address (lower is better, see :attr:`NetPath.rank`):
    LAN for loopback, link-local or inside ``local_networks``; then IPv6; then a host
    IPv4 address; then a port mapping the peer's gateway granted; then any other
    reflexive IPv4 address.

    A mapped address ranks above a reflexive one because the gateway forwards
    unsolicited packets to it: the path depends neither on the NAT's mapping and
    filtering behaviour nor on both sides sending at once. It is still behind a NAT, so
    a routed host address stays better."""
    ip = ipaddress.ip_address(addr[0])
    if ip.is_loopback or ip.is_link_local or any(ip in net for net in local_networks):
        return RANK_LAN
    if ip.version == 6:
        return RANK_IPV6
    if kind == "host":
        return RANK_HOST_IPV4
    if kind == "portmap":
        return RANK_PORTMAP
    return RANK_REFLEXIVE


@dataclass(frozen=True)
class NetPath:
    """A path QUIC datagrams can take."""

    kind: str
    """``"direct"`` or ``"relay"``."""
    remote: Addr | None
    """The peer's address for a direct path (normalised); None for the relay."""
    local: Addr | None
    """Our address as the peer sees it (XOR-MAPPED-ADDRESS of the last response), if known."""
    rtt: float | None
    """Last measured probe round-trip time in seconds, if any."""
    rank: int
    """0 LAN/loopback/link-local, 1 IPv6, 2 routed host IPv4, 3 port mapping, 4 other
    reflexive, 9 relay."""
    slot: int = 0
    """Which of our sockets the path uses: 0 the main one, k > 0 the shell's birthday
    socket k (see :meth:`quictun.punch.manager.PathManager.datagrams_to_send_slots`)."""


RELAY_PATH = NetPath(kind="relay", remote=None, local=None, rtt=None, rank=RANK_RELAY)


def describe(path: NetPath | None) -> str:
    """The stable one-line description of a path used in logs (tests and the lab parse it).

    ``path=direct local=IP:PORT remote=IP:PORT rtt=1.2ms``, ``path=relay rtt=-`` or
    ``path=none``.
    """
    if path is None:
        return "path=none"
    rtt = f"{path.rtt * 1000:.1f}ms" if path.rtt is not None else "-"
    if path.kind == "relay":
        return f"path=relay rtt={rtt}"
    local = format_addr(*path.local) if path.local else "-"
    remote = format_addr(*path.remote) if path.remote else "-"
    return f"path=direct local={local} remote={remote} rtt={rtt}"


@dataclass(frozen=True)
class PathChanged:
    """The path used for sending changed (emitted exactly once per change of ``current``)."""

    path: NetPath | None
    """The new path; None means nowhere to send (queue or drop)."""


@dataclass(frozen=True)
class SuspectChanged:
    """The selected direct path went quiet (``suspect``: True) or answers again (False).

    While suspect, and the relay could carry datagrams, the shell may send each QUIC
    datagram over the relay as well (see :meth:`PathManager.uncertain`)."""

    suspect: bool


@dataclass(frozen=True)
class GatherWanted:
    """Re-learn our own candidates now and send them to the peer in-band; then call
    :meth:`PathManager.gathered` (see :mod:`quictun.punch.gather`)."""


@dataclass(frozen=True)
class DatagramSizeChanged:
    """The largest UDP payload QUIC may send on the current path changed (path MTU
    discovery, :mod:`quictun.punch.pathmtu`; emitted after the PathChanged that caused
    it, and whenever the current path's proven size moves)."""

    size: int
    """Bytes of UDP payload, never below 1200; the relay path's own size on the relay."""


@dataclass(frozen=True)
class PunchFailed:
    """No path at all by the punch deadline (direct-only mode, or no relay)."""

    reason: str
    """Human-readable explanation."""

    @classmethod
    def at_deadline(cls, mode: str, timeout: float) -> PunchFailed:
        """The failure when punching ends with no path in ``mode`` (``timeout``: the
        punch timeout in seconds, for the reason)."""
        if mode == "direct":
            return cls(f"no direct path within {timeout:g} s (direct mode)")
        if mode == "relay":
            return cls("relay unavailable")
        return cls(f"no direct path within {timeout:g} s and no relay")


@dataclass
class PathConfig:
    """Timing knobs (in seconds unless stated) and the birthday limits."""

    probe_interval: float = 0.05
    """Probe interval during the first second of punching (and of triggered checks)."""
    probe_interval_slow: float = 0.25
    """Probe interval for the rest of a burst, and on a suspect selected path."""
    punch_timeout: float = 6.0
    """Initial punching stops after this; PunchFailed then if there is no path at all."""
    relay_after: float = 0.0
    """Auto mode: use the relay once this long after start() passed with no direct path."""
    heartbeat: float = 2.0
    """Probe interval on the selected direct path (keeps 5 s NAT mappings alive)."""
    dead_after: float = 6.5
    """No signed response or traffic from the selected path for this long => dead."""
    data_silence: float = 35.0
    """No authenticated QUIC from the selected path for this long, while its probes are
    answered => distrusted (:mod:`quictun.punch.recovery`; 0: off). Must exceed the
    QUIC keepalive period (15 s), which makes even an idle tunnel send."""
    distrust: float = 30.0
    """A distrusted path is not selected again for this long (doubling, up to 8x)."""
    repunch_interval: float = 10.0
    """While on relay (or pathless), re-probe all unvalidated candidates this often."""
    repunch_burst: float = 2.0
    """Length of one re-punch burst (at probe_interval_slow)."""
    upgrade_interval: float = 60.0
    """While direct, re-probe unvalidated candidates of a better rank this often."""
    low_ttl: int = 5
    """IP TTL of a candidate's first probes: enough to open our own NAT(s), too little to
    reach the far one (so a router that accepts unsolicited input keeps no stale entry)."""
    low_ttl_probes: int = 3
    """How many of a candidate's first probes go out with ``low_ttl`` (0 disables)."""
    birthday_after: float = 3.0
    """Birthday probing starts this long after start() if nothing validated by then."""
    birthday_duration: float = 15.0
    """Birthday probing stops this long after it started (or at the first validation)."""
    birthday_rate: float = 100.0
    """Birthday probes per second (each side, all sockets together)."""
    birthday_sockets: int = 256
    """Extra sockets the hard (endpoint-dependent) side asks the shell for."""
    birthday_any_address: bool = False
    """Allow birthday targets that are not globally routable (private, CGNAT, loopback,
    link-local, benchmarking 198.18.0.0/15, documentation ranges). Off by default: the
    targets come from unauthenticated reflexive candidates, so a lying relay could aim
    the spray at a victim's internal network. Only for labs and simulations."""


Event = PathChanged | PunchFailed | SuspectChanged | GatherWanted | DatagramSizeChanged
"""Everything :meth:`PathManager.next_event` returns."""
