"""The asyncio driver of one QUIC connection (aioquic's ``asyncio/protocol.py`` role).

:class:`QuicDriver` feeds datagrams into a :class:`~quictun.quic.flow.FlowControlled`
connection, flushes ``datagrams_to_send`` once per loop turn (so a burst of input makes
one batch of output), keeps the connection's timer armed (:class:`~quictun.aio.timer.Timer`),
sends keepalive PINGs, and hands events to an :class:`EventHandler`. It decides nothing.

QUIC always talks to :data:`VIRTUAL_PEER`; which physical path a datagram takes is the
path manager's business (:mod:`quictun.punch.manager`), so path switches are invisible
to QUIC. The datagram size follows the path too (:meth:`QuicDriver.set_max_datagram_size`,
applied once the handshake is complete).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config import TunnelConfig
from ..quic.flow import MIN_DATAGRAM_SIZE, FlowControlled
from .timer import Timer

if TYPE_CHECKING:
    from aioquic.quic import events

__all__ = ["VIRTUAL_PEER", "EventHandler", "QuicDriver"]

log = logging.getLogger("quictun.quic")

VIRTUAL_PEER = ("198.51.100.1", 1)  # never sent to: a label for "the peer", whatever the path


class EventHandler(Protocol):
    """What the driver tells the layer above it (forwarders, authentication)."""

    def on_handshake(self, event: events.HandshakeCompleted) -> None: ...
    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None: ...
    def on_stream_reset(self, stream_id: int, error_code: int) -> None: ...
    def on_stop_sending(self, stream_id: int, error_code: int) -> None: ...
    def on_acked(self) -> None: ...
    def on_terminated(self, error_code: int, reason: str) -> None: ...
    def on_datagram(self, data: bytes) -> None: ...


class QuicDriver:
    """Drive a :class:`FlowControlledConnection` from asyncio.

    ``send_datagram(data)`` is called for every datagram QUIC wants sent to the peer,
    or, if given, ``send_datagrams(list)`` once per flush with all of them (in order: a
    shell can then hand a run of same-sized datagrams to the kernel in one call).
    Input: :meth:`datagram_received`. All mutating calls schedule one flush on the
    loop, so a burst of input produces one batch of output.
    """

    def __init__(
        self,
        quic: FlowControlled,
        send_datagram: Callable[[bytes], None],
        handler: EventHandler | None = None,
        *,
        keepalive: float = TunnelConfig.keepalive,
        send_datagrams: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self.quic = quic
        self._events = quic.engine.events
        self._errors = quic.engine.errors
        self._send = send_datagram
        self._send_many = send_datagrams
        self.on_stall: Callable[[], None] | None = None
        """Called when a probe timeout fired (QUIC heard no ACK for a while)."""
        self.max_datagram_size = MIN_DATAGRAM_SIZE  # in effect
        self._wanted_size = MIN_DATAGRAM_SIZE
        self._handshake_done = False
        self._handler: EventHandler = handler or _NullHandler()
        self.on_closed: Callable[[], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._timer = Timer(self._loop, self._on_timer)
        self._keepalive = keepalive
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._ping_uid = 0
        self.terminated = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0
        self.datagram_backlog_limit = TunnelConfig.udp_backlog
        self._closed = False
        if keepalive:
            self._keepalive_handle = self._loop.call_later(keepalive, self._send_keepalive)

    def set_handler(self, handler: EventHandler) -> None:
        """Install the handler that receives this engine's events."""
        self._handler = handler

    # -- input ---------------------------------------------------------------------
    def datagram_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.bytes_in += len(data)
        self.quic.receive_datagram(data, VIRTUAL_PEER, self._loop.time())
        self._process_events()
        self.schedule_flush()

    # -- streams -------------------------------------------------------------------
    def open_stream(self) -> int:
        """Allocate a new bidirectional stream (reserved at once, even before data)."""
        stream_id = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(stream_id, b"")  # creates it, so the id is taken
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if self._closed:
            return
        try:
            self.quic.send_stream_data(stream_id, data, end_stream=end)
        except self._errors:
            # the peer closed the connection (or reset the stream) and its event is not
            # handled yet: nothing can be delivered now; the bridge ends with the stream
            return
        self.schedule_flush()

    def reset(self, stream_id: int, error_code: int = 0) -> None:
        """Abort both directions of a stream (RESET_STREAM + STOP_SENDING)."""
        if self._closed:
            return
        try:
            self.quic.reset_stream(stream_id, error_code)
        except self._errors:
            pass
        try:
            self.quic.stop_stream(stream_id, error_code)
        except self._errors:
            pass
        self.schedule_flush()

    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM frame (RFC 9221: sent once, never retransmitted). False,
        and nothing queued, when it is larger than :meth:`datagram_limit` or QUIC's
        queue holds ``backlog`` frames already (the caller counts the drop)."""
        if self._closed or len(data) > self.quic.datagram_limit():
            return False
        if self.quic.datagram_backlog() >= self.datagram_backlog_limit:
            return False
        try:
            self.quic.send_datagram_frame(data)
        except self._errors:
            return False  # the peer just closed the connection
        self.schedule_flush()
        return True

    def datagram_limit(self) -> int:
        """The largest DATAGRAM frame payload that fits a packet now (0: no DATAGRAMs)."""
        return 0 if self._closed else self.quic.datagram_limit()

    def consume(self, stream_id: int, n: int) -> None:
        self.quic.consume(stream_id, n)
        self.schedule_flush()

    def set_max_datagram_size(self, size: int) -> None:
        """Use datagrams of up to ``size`` bytes (the current path's, from path MTU
        discovery). Applied once the handshake is complete (Initials stay at the
        configured size); the last size asked for wins. The connection may cap it (the
        peer's max_udp_payload_size; qh3 keeps its size, see quic/flow.py)."""
        self._wanted_size = size
        if self._handshake_done and not self._closed:
            self._apply_size()

    def _apply_size(self) -> None:
        before = self.max_datagram_size
        self.max_datagram_size = self.quic.set_max_datagram_size(self._wanted_size)
        if self.max_datagram_size != before:
            log.debug("QUIC datagram size %d -> %d bytes (asked %d)", before,
                      self.max_datagram_size, self._wanted_size)

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Send CONNECTION_CLOSE and end at once (no draining period: the socket goes)."""
        if self._closed:
            return
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self._terminate(error_code, reason)

    # -- machinery -----------------------------------------------------------------
    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        now = self._loop.time()
        datagrams = [data for data, _addr in self.quic.datagrams_to_send(now)]
        if datagrams:
            self.bytes_out += sum(map(len, datagrams))
            if self._send_many is not None:
                self._send_many(datagrams)
            else:
                for data in datagrams:
                    self._send(data)
        self._process_events()
        self._arm_timer()

    def _arm_timer(self) -> None:
        self._timer.set(self.quic.get_timer())

    def _on_timer(self) -> None:
        ptos = self.quic.pto_count()
        self.quic.handle_timer(self._loop.time())
        if self.on_stall is not None and self.quic.pto_count() > ptos:
            self.on_stall()
        self._process_events()
        self._flush()

    def ping(self) -> None:
        """Send a PING now. After a path change its ACK makes QUIC declare the packets
        lost on the old path at once, instead of waiting for a backed-off PTO."""
        if self._closed:
            return
        self._ping_uid += 1
        try:
            self.quic.send_ping(self._ping_uid)
        except self._errors:
            return  # the peer just closed the connection (its event is not handled yet)
        self.schedule_flush()

    def _send_keepalive(self) -> None:
        if self._closed:
            return
        self.ping()
        self._keepalive_handle = self._loop.call_later(self._keepalive, self._send_keepalive)

    def _process_events(self) -> None:
        h = self._handler
        events = self._events
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                if ev.data:
                    self.quic.delivered(ev.stream_id, len(ev.data))
                h.on_stream_data(ev.stream_id, ev.data, ev.end_stream)
            elif isinstance(ev, events.DatagramFrameReceived):
                h.on_datagram(ev.data)
            elif isinstance(ev, events.StreamReset):
                h.on_stream_reset(ev.stream_id, ev.error_code)
            elif isinstance(ev, events.StopSendingReceived):
                h.on_stop_sending(ev.stream_id, ev.error_code)
            elif isinstance(ev, events.HandshakeCompleted):
                self._handshake_done = True
                self._apply_size()
                h.on_handshake(ev)
            elif isinstance(ev, events.ConnectionTerminated):
                self._terminate(ev.error_code, ev.reason_phrase)
                return
        if self.quic.is_terminated():
            self._terminate(0, "terminated")
            return
        # acknowledgements may have freed send buffers: let paused readers resume
        h.on_acked()

    def _terminate(self, code: int, reason: str) -> None:
        if self._closed:
            return
        # flush a final CONNECTION_CLOSE if aioquic queued one
        for data, _addr in self.quic.datagrams_to_send(self._loop.time()):
            self._send(data)
        self._closed = True
        self._timer.cancel()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        self.terminated.set()
        self._handler.on_terminated(code, reason)
        if self.on_closed is not None:
            self.on_closed()

    @property
    def closed(self) -> bool:
        return self._closed


class _NullHandler:
    """Discards events until the real handler is installed."""

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        pass

    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        pass

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        pass

    def on_stop_sending(self, stream_id: int, error_code: int) -> None:
        pass

    def on_acked(self) -> None:
        pass

    def on_terminated(self, error_code: int, reason: str) -> None:
        pass

    def on_datagram(self, data: bytes) -> None:
        pass
