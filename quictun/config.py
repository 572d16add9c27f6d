"""Every tunable of a tunnel, in one frozen object that is passed in, never patched.

:class:`TunnelConfig` travels from :func:`quictun.connect` / :func:`quictun.serve` (or the
CLI) down to the QUIC configuration, the flow control, the stream bridges, the server's
proof gate and the path manager (:class:`~quictun.punch.types.PathConfig`). Protocol
constants (ALPN, stream numbers, error codes) are not tunables and stay with their codecs.

The defaults are what ships; the benchmark's levers build other instances. Three
environment switches are read, by the CLI only (:meth:`TunnelConfig.from_environment`):

* :data:`PORTMAP_ENV` (``QUICTUN_PORTMAP=0``): ask the router for no port mapping. The
  CLI asks by default; a bare ``TunnelConfig()`` (the library's default) does not: a
  program embedding quictun changes the router's state only when it says so
  (``portmap=PortmapConfig(enabled=True)``, or ``from_environment``).
* :data:`LAB_ENV` (``QUICTUN_LAB=1``): the network lab's addresses are benchmarking
  ranges, not global ones, so it relaxes the checks that exist to protect real networks
  (birthday targets, port mappings whose external address is not global). No user ever
  needs it.
* :data:`OFFLOAD_ENV` (``QUICTUN_UDP_OFFLOAD=off|gso|gro|auto``): which Linux UDP offloads
  the tunnel socket may use (:attr:`TunnelConfig.udp_offload`; the benchmark's lever).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .punch.pmtu import PmtuConfig
from .punch.types import PathConfig

__all__ = ["DEFAULT_SIGNAL", "LAB_ENV", "OFFLOAD_ENV", "OFFLOADS", "PORTMAP_ENV",
           "PORTMAP_PROTOCOLS", "PmtuConfig", "PortmapConfig", "TunnelConfig"]

DEFAULT_SIGNAL = "ws://127.0.0.1:8765/"
"""The relay URL when none is given: one on this machine (``quictun demo`` runs it)."""

LAB_ENV = "QUICTUN_LAB"
PORTMAP_ENV = "QUICTUN_PORTMAP"
OFFLOAD_ENV = "QUICTUN_UDP_OFFLOAD"
OFFLOADS = ("auto", "off", "gso", "gro")
"""The choices of :attr:`TunnelConfig.udp_offload`."""
_OFF = ("0", "no", "off", "false")

PORTMAP_PROTOCOLS = ("pcp", "natpmp", "upnp")
"""The port-mapping protocols :class:`PortmapConfig` may race."""


@dataclass(frozen=True)
class PortmapConfig:
    """Tunables of the port mapper (:mod:`quictun.aio.portmap`), seconds unless stated."""

    enabled: bool = False
    """Ask the gateway for a mapping of each tunnel socket (relay-only tunnels never
    ask). On in :meth:`TunnelConfig.from_environment` (the CLI) unless
    ``QUICTUN_PORTMAP=0`` or ``--no-portmap``; off in a bare ``TunnelConfig()``."""
    protocols: tuple[str, ...] = PORTMAP_PROTOCOLS
    """Which protocols race (any of ``"pcp"``, ``"natpmp"``, ``"upnp"``)."""
    lifetime: int = 300
    """Lifetime asked for; renewed at half of what the gateway grants."""
    retransmits: tuple[float, ...] = (0.0, 0.25, 0.75)
    """When PCP and NAT-PMP requests are (re)sent, from the attempt's start."""
    udp_wait: float = 1.5
    """A PCP or NAT-PMP exchange gives up this long after its first send."""
    ssdp_wait: float = 1.0
    """UPnP discovery takes SSDP answers this long."""
    http_timeout: float = 2.0
    """Each UPnP HTTP exchange (description, SOAP action)."""
    close_timeout: float = 1.0
    """Closing waits at most this long for a gateway that answered to confirm the
    deletions (one that never answered gets them without waiting)."""
    retry_after: float = 5.0
    """After a failed renewal, try again this often (while the mapping lasts)."""
    description: str = "quictun"
    """Mapping description shown by the router (UPnP)."""
    gateway: str | None = None
    """The gateway's IPv4 address; None reads the default route."""
    local_ip: str | None = None
    """Our own address toward the gateway; None lets the kernel pick (the tunnel socket
    is unbound too). Set it when the tunnel socket is bound to one address."""
    require_global: bool = True
    """Ignore (and delete) a mapping whose external address is not globally routable: a
    second NAT upstream (CGNAT, a provider's box) makes it useless to peers. Off only
    with the lab switch (:data:`LAB_ENV`)."""
    ssdp_addr: tuple[str, int] = ("239.255.255.250", 1900)
    """Where UPnP M-SEARCHes go: the SSDP multicast group, or one device's unicast
    address (tests; an IGD known in advance)."""


@dataclass(frozen=True)
class TunnelConfig:
    """Tunables of one tunnel (both ends read the same defaults). Sizes in bytes, times in
    seconds."""

    max_datagram: int = 1200
    """QUIC's datagram size at the start (its Initials are padded to it): the 1200 bytes
    every QUIC path must carry. Above that only what path MTU discovery proved on the
    current path is used (:attr:`pmtu`); a fixed 1350 black-holed every full datagram on
    a 1280-MTU path that filters ICMP. With ``pmtu=None`` every direct path uses it."""
    pmtu: PmtuConfig | None = field(default_factory=PmtuConfig)
    """Path MTU discovery on the selected direct path (:mod:`quictun.punch.pmtu`); None:
    never probe, a direct path keeps :attr:`max_datagram`."""
    relay_datagram_size: int = 16380
    """The datagram size used on the relay path: a WebSocket carries any size up to the
    relay's 64 KiB frame limit (batches stay well below), and aioquic's 2-byte frame
    lengths stop at 16383. Big datagrams cut the relay path's CPU per byte five-fold."""
    udp_offload: str = "auto"
    """Linux UDP offloads of the tunnel socket (:mod:`quictun.aio.udpio`): ``auto`` (GSO
    and GRO where the kernel has them), ``off``, ``gso`` or ``gro`` (only that one)."""
    stream_window: int = 2 * 1024 * 1024
    """Receive window per stream: credit beyond what the application consumed."""
    connection_window: int = 8 * 1024 * 1024
    """Receive window of the whole connection."""
    peer_max_ack_delay: float = 0.005
    """The peer's ACK delay assumed in the probe timeout (aioquic engine). aioquic acks
    1 ms after an ack-eliciting packet but advertises ``max_ack_delay`` 25 ms, so each
    tail loss idled the sender for 25 ms more than needed; the peer is always quictun
    (ALPN), and 5 ms leaves room for a busy event loop. Measured in the lab with 10 %
    random loss: 0.86 -> 1.45 MB/s (1 ms: 1.78, 2 ms: 1.58); loopback unchanged."""
    congestion_control: str | None = None
    """The engine's congestion controller by name (None: its default, Reno)."""
    idle_timeout: float = 60.0
    """QUIC idle timeout."""
    keepalive: float = 15.0
    """Seconds between keepalive PINGs (0: none)."""
    send_high: int = 1024 * 1024
    """A bridge stops reading its local socket above this many unacknowledged bytes..."""
    send_low: int = 256 * 1024
    """... and reads again below this many."""
    write_high: int = 512 * 1024
    """High-water mark of a bridge's local write buffer."""
    connect_timeout: float = 20.0
    """How long a connect waits for the answer, and then for a working path."""
    stun_wait: float = 0.5
    """How long gathering waits for the relay's reflectors before the offer (late
    reflexive candidates follow in-band)."""
    max_sessions: int = 256
    """Sessions one ``serve`` runs at once; more get ``busy``."""
    nonce_memory: float = 600.0
    """Seconds a client nonce is remembered (a replayed offer is refused)."""
    proof_deadline: float = 10.0
    """Seconds from a session's first QUIC packet to a verified client proof."""
    pre_auth_limit: int = 256 * 1024
    """Stream data held before the client proof; more closes the connection."""
    queue_before_path: int = 64
    """QUIC datagrams kept while there is no path yet."""
    max_datagram_frame: int = 65535
    """Largest QUIC DATAGRAM frame (RFC 9221) accepted from the peer; 0: none (no UDP)."""
    udp_idle_timeout: float = 60.0
    """Seconds without a datagram, either way, after which a UDP flow ends."""
    udp_max_flows: int = 256
    """UDP flows one tunnel carries at once (per client on ``serve``)."""
    udp_open_queue: int = 32
    """Datagrams kept per flow while the serving side opens it (one round trip)."""
    udp_backlog: int = 256
    """DATAGRAM frames waiting for congestion window; more are dropped (and counted),
    never queued behind each other for long: UDP traffic wants fresh packets."""
    target_timeout: float = 10.0
    """Seconds ``serve`` waits for a target (or a proxy target's DNS) to connect."""
    relay_ping_interval: float = 10.0
    """Seconds between WebSocket pings to the relay (an idle link's keepalive)..."""
    relay_ping_timeout: float = 5.0
    """... and how long a pong may take before the link counts as dead (a NAT that
    forgot the mapping breaks TCP too, silently): then it is re-opened and the
    sessions resume on the new link."""
    relay_check_timeout: float = 3.0
    """When a direct path goes quiet, the relay link is pinged at once and must answer
    within this (else re-opened), so a NAT reset costs seconds, not a ping period."""
    tunnel_wait: float = 30.0
    """``connect --listen``: how long a local connection made while the tunnel is down
    (or not up yet) waits for it before it is closed."""
    paths: PathConfig = field(default_factory=PathConfig)
    """Punching, keepalive and fallback timing (the path manager's)."""
    portmap: PortmapConfig = field(default_factory=PortmapConfig)
    """Asking the gateway for port mappings (UPnP IGD, NAT-PMP, PCP)."""

    def __post_init__(self) -> None:
        if self.udp_offload not in OFFLOADS:
            raise ValueError(f"unknown UDP offload {self.udp_offload!r}; choose one of "
                             f"{', '.join(OFFLOADS)} ({OFFLOAD_ENV})")

    def replace(self, **changes: object) -> TunnelConfig:
        """A copy with ``changes`` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> TunnelConfig:
        """The CLI's tunables: the defaults with port mapping on (unless
        ``QUICTUN_PORTMAP`` is ``0``, ``no``, ``off`` or ``false``), and the network lab's
        exceptions when ``QUICTUN_LAB=1``: birthday probing may aim at non-global
        addresses (see :attr:`PathConfig.birthday_any_address`), and a port mapping whose
        external address is not global is used (see
        :attr:`PortmapConfig.require_global`). ``QUICTUN_UDP_OFFLOAD`` sets
        :attr:`udp_offload`. Raises ValueError (one line) for an unknown offload."""
        portmap = environ.get(PORTMAP_ENV, "").strip().lower() not in _OFF
        offload = environ.get(OFFLOAD_ENV, "").strip().lower() or "auto"
        cfg = cls(portmap=PortmapConfig(enabled=portmap), udp_offload=offload)
        if environ.get(LAB_ENV) == "1":
            cfg = cfg.replace(
                paths=dataclasses.replace(cfg.paths, birthday_any_address=True),
                portmap=dataclasses.replace(cfg.portmap, require_global=False))
        return cfg
