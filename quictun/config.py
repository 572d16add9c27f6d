"""Every tunable of a tunnel, in one frozen object that is passed in, never patched.

:class:`TunnelConfig` travels from :func:`quictun.connect` / :func:`quictun.serve` (or the
CLI) down to the QUIC configuration, the flow control, the stream bridges, the server's
proof gate and the path manager (:class:`~quictun.punch.types.PathConfig`). Protocol
constants (ALPN, stream numbers, error codes) are not tunables and stay with their codecs.

The defaults are what ships; the benchmark's levers build other instances. The one
environment switch is :data:`LAB_ENV` (``QUICTUN_LAB=1``), read by the CLI only
(:meth:`TunnelConfig.from_environment`): the network lab's addresses are benchmarking
ranges, not global ones, so it relaxes the checks that exist to protect real networks.
No user ever needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .punch.types import PathConfig

__all__ = ["DEFAULT_SIGNAL", "LAB_ENV", "TunnelConfig"]

DEFAULT_SIGNAL = "ws://127.0.0.1:8765/"
"""The relay URL when none is given: one on this machine (``quictun demo`` runs it)."""

LAB_ENV = "QUICTUN_LAB"


@dataclass(frozen=True)
class TunnelConfig:
    """Tunables of one tunnel (both ends read the same defaults). Sizes in bytes, times in
    seconds."""

    max_datagram: int = 1350
    """Largest UDP payload QUIC sends."""
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
    paths: PathConfig = field(default_factory=PathConfig)
    """Punching, keepalive and fallback timing (the path manager's)."""

    def replace(self, **changes: object) -> TunnelConfig:
        """A copy with ``changes`` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> TunnelConfig:
        """The defaults, with the network lab's exceptions when ``QUICTUN_LAB=1``:
        birthday probing may aim at non-global addresses (see
        :attr:`PathConfig.birthday_any_address`)."""
        cfg = cls()
        if environ.get(LAB_ENV) == "1":
            cfg = cfg.replace(paths=dataclasses.replace(cfg.paths, birthday_any_address=True))
        return cfg
