"""UDP through the tunnel: flows over QUIC DATAGRAM frames (RFC 9221).

A flow is opened on a QUIC stream (an ``OP_DATAGRAM`` open request, see
:mod:`quictun.proto.control`) and lives as long as that stream; its datagrams travel in
DATAGRAM frames prefixed with the flow id. They are sent once, never retransmitted and
never queued behind stream data or each other for long, so a lost one is simply lost,
as UDP would lose it. A payload larger than one frame can carry on this connection
(:meth:`DatagramFlow.max_payload`) is dropped and counted, never fragmented.

- :class:`DatagramFlow`: the client's end of one flow (the library's datagram API).
- :class:`UdpListener`: ``connect --listen udp:…``, one flow per local source address,
  ended after ``udp_idle_timeout`` without traffic.
- :class:`ServerFlow`: the serving side's end: one UDP socket connected to the target.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import TunnelConfig
from ..proto.control import ST_FAILURE, OpenReply, encode_datagram, parse_reply, varint_size
from ..proto.flows import OPEN, OPENING, Flow, FlowStats, FlowTable
from .timer import Timer

if TYPE_CHECKING:
    from .driver import QuicDriver

log = logging.getLogger("quictun.udp")

RECV_QUEUE = 256  # datagrams a library reader may leave unread before the oldest go


class DatagramFlow:
    """The client's end of one UDP flow. Create with ``tunnel.open_datagram()``.

    :meth:`send` never blocks: it returns False (and counts) for a payload that is too
    big or does not fit QUIC's queue. Received payloads go to :attr:`on_datagram` if
    set, else to :meth:`recv`. :meth:`close` ends the flow (the server closes its
    socket).
    """

    def __init__(self, driver: QuicDriver, stream_id: int, config: TunnelConfig,
                 on_forget: Callable[[DatagramFlow], None] | None = None) -> None:
        self.stream_id = stream_id
        self.flow_id = stream_id // 4
        self._driver = driver
        self._config = config
        self._flow = Flow(self.flow_id, 0.0)
        self.stats: FlowStats = self._flow.stats
        self.on_datagram: Callable[[bytes], None] | None = None
        self.on_closed: Callable[[str], None] | None = None
        self._on_forget = on_forget
        self._reply = bytearray()
        self._recv: asyncio.Queue[bytes] = asyncio.Queue(RECV_QUEUE)
        self.opened: asyncio.Future[OpenReply] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.refused = False
        """The server refused the flow (its reason is :attr:`reason`)."""
        self.reason = ""

    @property
    def max_payload(self) -> int:
        """The largest UDP payload one datagram of this flow carries now."""
        return max(0, self._driver.datagram_limit() - varint_size(self.flow_id))

    @property
    def is_open(self) -> bool:
        return self._flow.state == OPEN and not self.closed

    def send(self, payload: bytes) -> bool:
        """Send one UDP payload (queued while the flow opens). False: dropped."""
        if self.closed:
            if self.refused:
                self.stats.dropped_refused += 1
            return False
        if self._flow.state == OPENING:
            return self._flow.hold(payload, self._config.udp_open_queue)
        if self._flow.state != OPEN:
            self.stats.dropped_refused += 1
            return False
        if len(payload) > self.max_payload:
            self.stats.dropped_too_big += 1
            if self.stats.dropped_too_big == 1:
                log.warning("udp: dropped a %d-byte datagram: the tunnel carries at most %d "
                            "bytes per datagram now (lower the application's MTU)",
                            len(payload), self.max_payload)
            return False
        if not self._driver.send_datagram(encode_datagram(self.flow_id, payload)):
            self.stats.dropped_queue += 1
            return False
        self.stats.datagrams_in += 1
        self.stats.bytes_in += len(payload)
        return True

    async def recv(self) -> bytes:
        """The next payload from the target. Raises EOFError once the flow is closed."""
        if self.closed and self._recv.empty():
            raise EOFError(self.reason or "the flow is closed")
        data = await self._recv.get()
        if data is _CLOSED:  # identity: the one sentinel object, never a payload
            raise EOFError(self.reason or "the flow is closed")
        return data

    def close(self, reason: str = "closed") -> None:
        """End the flow: FIN on its stream, so the server closes its socket."""
        if self.closed:
            return
        self._driver.send(self.stream_id, b"", end=True)
        self._end(reason)

    # -- from the handler ---------------------------------------------------------------
    def datagram(self, payload: bytes) -> None:
        if self.closed:
            return
        self.stats.datagrams_out += 1
        self.stats.bytes_out += len(payload)
        if self.on_datagram is not None:
            self.on_datagram(payload)
        elif self._recv.full():
            self.stats.dropped_queue += 1
        else:
            self._recv.put_nowait(payload)

    def stream_data(self, data: bytes, end: bool) -> None:
        """Bytes of the flow's stream: the server's reply, then nothing until its FIN."""
        self._driver.consume(self.stream_id, len(data))
        if not self.opened.done() and data:
            self._reply.extend(data)
            got = parse_reply(bytes(self._reply[:257]))
            if got is not None:
                self._answered(got[0])
        if end:
            self._end("the server ended the flow")

    def stream_reset(self, error_code: int) -> None:
        self._end(f"the server reset the flow (code {error_code:#x})")

    def _answered(self, reply: OpenReply) -> None:
        self.opened.set_result(reply)
        if reply.ok:
            for payload in self._flow.opened(self.flow_id):
                self.send(payload)
        else:
            self._flow.refused()
            self.refused = True
            self.close(reply.text)

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if not self.opened.done():
            self.opened.set_result(OpenReply(ST_FAILURE, reason))
        if self._recv.full():
            self._recv.get_nowait()
        self._recv.put_nowait(_CLOSED)
        if self._on_forget is not None:
            self._on_forget(self)
        if self.on_closed is not None:
            self.on_closed(reason)


_CLOSED = b"\x00closed"  # sentinel object in the receive queue (compared by identity)


class UdpListener(asyncio.DatagramProtocol):
    """``connect --listen udp:…``: one flow per source address, over the current tunnel.

    ``open_flow()`` returns a new :class:`DatagramFlow` on the tunnel up now, or None
    while it is down (the datagram is dropped, as a router would drop it).
    """

    def __init__(self, open_flow: Callable[[], DatagramFlow | None], config: TunnelConfig,
                 label: str) -> None:
        self._open_flow = open_flow
        self._config = config
        self.label = label
        self.table = FlowTable(config.udp_idle_timeout, config.udp_max_flows)
        self.stats = FlowStats()  # of the flows that ended
        self.flows_opened = 0
        self.dropped_no_tunnel = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer = Timer(self._loop, self._expire)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        now = self._loop.time()
        key = (addr[0], addr[1])
        entry = self.table.get(key)
        flow = entry.handle if entry is not None else None
        if (entry is not None and isinstance(flow, DatagramFlow) and flow.closed
                and not flow.refused):  # ended with its tunnel (or idle): open anew
            self._forget(key)
            entry = flow = None
        if entry is None:
            flow = self._open_flow()
            entry = self.table.add(key, now) if flow is not None else None
            if entry is None or flow is None:
                self.dropped_no_tunnel += 1
                if flow is not None:
                    flow.close("too many flows")
                return
            entry.handle = flow
            self.flows_opened += 1
            flow.on_datagram = lambda payload, key=key: self._back(key, payload)
            self._timer.set(self.table.get_timer())
        assert isinstance(flow, DatagramFlow)
        self.table.touch(entry, now)
        flow.send(data)

    def _back(self, key: tuple[str, int], payload: bytes) -> None:
        entry = self.table.get(key)
        if entry is not None:
            self.table.touch(entry, self._loop.time())
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(payload, key)

    def _forget(self, key: tuple[str, int]) -> None:
        entry = self.table.remove(key)
        if entry is not None and isinstance(entry.handle, DatagramFlow):
            self.stats.add(entry.handle.stats)

    def _expire(self) -> None:
        for entry in self.table.expire(self._loop.time()):
            flow = entry.handle
            if isinstance(flow, DatagramFlow):
                flow.close("idle")
                self.stats.add(flow.stats)
        self._timer.set(self.table.get_timer())

    def totals(self) -> FlowStats:
        """Counters of every flow so far, ended or not."""
        out = FlowStats()
        out.add(self.stats)
        for entry in self.table.flows.values():
            if isinstance(entry.handle, DatagramFlow):
                out.add(entry.handle.stats)
        return out

    def close(self) -> None:
        self._timer.cancel()
        for key in list(self.table.flows):
            entry = self.table.flows[key]
            if isinstance(entry.handle, DatagramFlow):
                entry.handle.close("listener closed")
            self._forget(key)
        if self._transport is not None:
            self._transport.close()


class ServerFlow(asyncio.DatagramProtocol):
    """The serving side of one flow: a UDP socket connected to the target. Counts into
    ``stats`` (the service's, shared by its flows)."""

    def __init__(self, driver: QuicDriver, stream_id: int, stats: FlowStats) -> None:
        self.driver = driver
        self.stream_id = stream_id
        self.flow_id = stream_id // 4
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None
        self._warned = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        limit = self.driver.datagram_limit() - varint_size(self.flow_id)
        if len(data) > limit:
            self.stats.dropped_too_big += 1
            if not self._warned:
                self._warned = True
                log.warning("udp: dropped a %d-byte datagram from the target: the tunnel "
                            "carries at most %d bytes per datagram now", len(data), limit)
            return
        if self.driver.send_datagram(encode_datagram(self.flow_id, data)):
            self.stats.datagrams_out += 1
            self.stats.bytes_out += len(data)
        else:
            self.stats.dropped_queue += 1

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable on a connected socket: the target is not up (yet)

    def from_peer(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.stats.datagrams_in += 1
            self.stats.bytes_in += len(payload)
            self.transport.sendto(payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
