"""UDP flows: one per client source address, each with an idle timeout (pure: time in).

The client side of a ``--listen udp:…`` keeps a :class:`FlowTable`: the first datagram
from a new source address creates an entry (the shell then opens a flow, that is a QUIC
stream, see :mod:`quictun.proto.control`); a :class:`Flow`'s payloads wait in its small
queue until the server accepted it (none is lost to the one round trip of setup), and a flow that
neither sent nor received for ``idle_timeout`` seconds is handed back by :meth:`expire`
for the shell to close. Counters live in :class:`FlowStats` (what arrived, what left,
what was dropped and why), summed per service for the logs.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["Flow", "FlowStats", "FlowTable"]

OPENING, OPEN, REFUSED = "opening", "open", "refused"


@dataclass
class FlowStats:
    """Datagram counters of one flow (or a service's sum). ``in`` is toward the target
    (client -> server), ``out`` back toward the client."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_too_big: int = 0
    """Larger than one QUIC DATAGRAM frame can carry on this connection: never fragmented."""
    dropped_queue: int = 0
    """The flow was still opening (queue full) or QUIC's datagram queue was full."""
    dropped_refused: int = 0
    """The server refused the flow (unknown service, ...)."""

    def add(self, other: FlowStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def dropped(self) -> int:
        return self.dropped_too_big + self.dropped_queue + self.dropped_refused


@dataclass
class Flow:
    """One flow: its key (the client's address), state and counters."""

    key: Hashable
    last: float
    state: str = OPENING
    flow_id: int | None = None
    queue: list[bytes] = field(default_factory=list)
    stats: FlowStats = field(default_factory=FlowStats)
    handle: object = None
    """The shell's object for this flow."""

    def hold(self, payload: bytes, limit: int) -> bool:
        """Queue a payload while the flow opens; False (and counted) beyond ``limit``."""
        if len(self.queue) >= limit:
            self.stats.dropped_queue += 1
            return False
        self.queue.append(payload)
        return True

    def opened(self, flow_id: int) -> list[bytes]:
        """The server accepted the flow: returns the queued payloads, to send now."""
        self.state, self.flow_id = OPEN, flow_id
        queued, self.queue = self.queue, []
        return queued

    def refused(self) -> None:
        """The server refused it: its queue is dropped (counted), and so is what follows."""
        self.state = REFUSED
        self.stats.dropped_refused += len(self.queue)
        self.queue = []


class FlowTable:
    """Flows by key. ``idle_timeout`` seconds without traffic ends one; at most
    ``max_flows`` at once (:meth:`add` returns None beyond)."""

    def __init__(self, idle_timeout: float, max_flows: int) -> None:
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.flows: dict[Hashable, Flow] = {}

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, key: Hashable) -> Flow | None:
        return self.flows.get(key)

    def add(self, key: Hashable, now: float) -> Flow | None:
        if key in self.flows:
            return self.flows[key]
        if len(self.flows) >= self.max_flows:
            return None
        flow = self.flows[key] = Flow(key, now)
        return flow

    def touch(self, flow: Flow, now: float) -> None:
        flow.last = now

    def remove(self, key: Hashable) -> Flow | None:
        return self.flows.pop(key, None)

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows idle for ``idle_timeout`` or more."""
        gone = [f for f in self.flows.values() if now - f.last >= self.idle_timeout]
        for f in gone:
            del self.flows[f.key]
        return gone

    def get_timer(self) -> float | None:
        """When :meth:`expire` next has something to do (None: no flows)."""
        if not self.flows:
            return None
        return min(f.last for f in self.flows.values()) + self.idle_timeout
