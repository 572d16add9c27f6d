"""The relay's metrics (``GET /metrics``): what one instance knows, as Prometheus
families. Every counter is per instance; sum them over the instances of a cluster.
Relayed bytes and packets are counted where they enter the relay (so a packet crossing
two instances counts once); pairings where the holder answered. No metric carries a name,
an address or any client-chosen string (reject codes outside the known set are "other").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .metrics import Family


class RelayServer(Protocol):
    """What the metrics read of a started :class:`~signal_server.server.RelayServer`."""

    matchmaker: Any
    cluster: Any
    instance: str | None
    connections_total: int
    send_dropped_total: int
    errors: Mapping[str, int]

    @property
    def stats(self) -> dict[str, int]: ...

__all__ = ["metric_families", "PREFIX"]

PREFIX = "quictun_signal_"


def _fam(name: str, kind: str, help_text: str) -> Family:
    return Family(PREFIX + name, kind, help_text)


def metric_families(server: RelayServer) -> list[Family]:
    """Every family for ``server`` (a started :class:`~signal_server.server.RelayServer`)."""
    mm = server.matchmaker
    stats = server.stats
    out = [
        _fam("peers_connected", "gauge", "WebSocket connections open at this instance.")
        .add(stats.get("connections", 0)),
        _fam("connections_total", "counter", "WebSocket connections accepted.")
        .add(server.connections_total),
        _fam("names_held", "gauge", "Names held live by peers connected here.")
        .add(stats.get("names_live", 0)),
        _fam("sessions", "gauge", "Sessions with a member connected here.")
        .add(stats.get("sessions", 0)),
        _fam("cross_instance_sessions", "gauge",
             "Sessions whose other member is on another instance.")
        .add(stats.get("peer_sessions", 0)),
        _fam("sessions_total", "counter", "connect requests that opened a session here.")
        .add(stats.get("sessions_total", 0)),
        _fam("pairings_total", "counter", "Sessions answered by a holder connected here.")
        .add(stats.get("pairings_total", 0)),
        _fam("relayed_bytes_total", "counter", "Relayed QUIC bytes that entered here.")
        .add(stats.get("relayed_bytes", 0)),
        _fam("relayed_packets_total", "counter", "Relayed QUIC packets that entered here.")
        .add(stats.get("relayed_packets", 0)),
        _fam("relay_dropped_bytes_total", "counter",
             "Relayed bytes dropped (no session, rate limit, relay disabled).")
        .add(stats.get("dropped_bytes", 0)),
        _fam("send_dropped_frames_total", "counter",
             "Relayed frames dropped because a receiver's queue was full.")
        .add(server.send_dropped_total + stats.get("send_dropped", 0)),
    ]
    rejects = _fam("rejects_total", "counter", "Sessions refused by their holder, by code.")
    for code, n in sorted((mm.rejects if mm is not None else {}).items()):
        rejects.add(n, code=code)
    errors = _fam("errors_total", "counter",
                  "Errors by kind: error codes sent to clients, and relay-side problems.")
    kinds: dict[str, int] = dict(mm.errors) if mm is not None else {}
    for kind, n in server.errors.items():
        kinds[kind] = kinds.get(kind, 0) + n
    cluster = server.cluster
    if cluster is not None:
        for kind, n in cluster.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    for kind, n in sorted(kinds.items()):
        errors.add(n, kind=kind)
    out += [rejects, errors]
    if cluster is not None:
        out += _cluster_families(server)
    return out


def _cluster_families(server: RelayServer) -> list[Family]:
    cluster = server.cluster
    assert cluster is not None
    out = [
        _fam("instance_info", "gauge", "This instance's id in the cluster.")
        .add(1, instance=server.instance or ""),
        _fam("redis_up", "gauge", "1 while Redis answers, 0 during an outage.")
        .add(1 if cluster.up else 0),
    ]
    if cluster.rtt is not None:
        out.append(_fam("redis_rtt_seconds", "gauge",
                        "Round-trip time of the last heartbeat to Redis.").add(cluster.rtt))
    reg = cluster.registry
    if reg is not None:
        out += [
            _fam("redis_roundtrips_total", "counter", "Pipelined round trips to Redis.")
            .add(reg.batches),
            _fam("redis_operations_total", "counter", "Operations sent to Redis.")
            .add(reg.ops),
            _fam("redis_roundtrip_seconds_total", "counter",
                 "Seconds spent in round trips to Redis (divide by the round trips).")
            .add(reg.batch_seconds),
        ]
    out += [
        _fam("pubsub_messages_total", "counter", "Messages to other instances over pub/sub.")
        .add(cluster.counters["published"], direction="out")
        .add(cluster.counters["pubsub_received"], direction="in"),
        _fam("pubsub_dropped_frames_total", "counter",
             "Relayed frames dropped because Redis was behind (pub/sub path).")
        .add(cluster.counters["pubsub_dropped"]),
    ]
    links = cluster.links
    if links is not None:
        out += [
            _fam("peer_links", "gauge", "Open links to other instances.").add(links.count),
            _fam("peer_link_bytes_total", "counter", "Bytes over peer links.")
            .add(links.bytes_out, direction="out").add(links.bytes_in, direction="in"),
            _fam("peer_link_frames_total", "counter", "Frames over peer links.")
            .add(links.frames_out, direction="out").add(links.frames_in, direction="in"),
            _fam("peer_link_dropped_frames_total", "counter",
                 "Relayed frames dropped because a peer link was backed up.")
            .add(links.dropped),
        ]
    return out
