"""QUIC over a virtual peer address, with flow control that follows the application.

Two pieces:

- :class:`FlowControlledConnection`, the chosen engine's ``QuicConnection`` (aioquic or
  qh3, see ``engines.py``) whose receive windows (MAX_STREAM_DATA / MAX_DATA) advance
  only as the application reports bytes *consumed* (:meth:`consume`). Stock aioquic
  doubles its windows whenever data arrives, and qh3 grants credit as soon as data is
  handed out, whether or not anyone read it, so a fast sender and a slow reader would
  grow memory without bound.
- :class:`QuicEngine`, the thin asyncio driver: feeds datagrams in, flushes
  ``datagrams_to_send`` once per loop iteration, keeps the timer armed, sends keepalive
  PINGs, and hands events to a :class:`EngineHandler`.

QUIC always talks to :data:`VIRTUAL_PEER`; which physical path a datagram takes is the
path manager's business (see ``paths.py``), so path switches are invisible to QUIC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from . import engines
from .engines import Engine

if TYPE_CHECKING:
    from aioquic.quic import events

log = logging.getLogger("quictun.quic")

VIRTUAL_PEER = ("198.51.100.1", 1)  # never sent to: a label for "the peer", whatever the path

STREAM_WINDOW = 2 * 1024 * 1024
CONNECTION_WINDOW = 8 * 1024 * 1024
KEEPALIVE_INTERVAL = 15.0
PEER_MAX_ACK_DELAY = 0.005
"""The peer's ACK delay assumed in the probe timeout (aioquic engine). aioquic acks 1 ms
after an ack-eliciting packet but advertises ``max_ack_delay`` 25 ms, so each tail loss
idled the sender for 25 ms more than needed; the peer is always quictun (ALPN), 5 ms
leaves room for a busy event loop. Measured in the lab with 10% random loss: 0.86 ->
1.45 MB/s (1 ms: 1.78, 2 ms: 1.58); loopback throughput unchanged within its noise."""

_MAX_STREAM_DATA_CAPACITY = 1 + 8 + 8
_MAX_DATA_CAPACITY = 1 + 8


class _FlowControl:
    """Consumption bookkeeping shared by both engines (see FlowControlledConnection)."""

    engine: Engine
    authenticated_packets: int  # grows with every packet that decrypted

    def _init_flow_control(self) -> None:
        self._consumed: dict[int, int] = {}
        self._pending: dict[int, int] = {}  # delivered but not consumed, per live stream
        self._pending_total = 0
        self.authenticated_packets = 0

    def delivered(self, stream_id: int, n: int) -> None:
        """Record ``n`` bytes handed to the application for ``stream_id``."""
        self._pending[stream_id] = self._pending.get(stream_id, 0) + n
        self._pending_total += n

    def consume(self, stream_id: int, n: int) -> None:
        """Record that the application released ``n`` bytes of ``stream_id``."""
        self._consumed[stream_id] = self._consumed.get(stream_id, 0) + n
        if stream_id in self._pending:
            take = min(n, self._pending[stream_id])
            self._pending[stream_id] -= take
            self._pending_total -= take

    def forget_stream(self, stream_id: int) -> None:
        """The application is done with a stream: its unconsumed bytes are released."""
        self._pending_total -= self._pending.pop(stream_id, 0)
        self._consumed.pop(stream_id, None)


class _AioquicFlowControl(_FlowControl):
    """aioquic: the connection is Python; replace its window writers.

    Stock aioquic doubles a window whenever data arrives; here MAX_STREAM_DATA is
    ``consumed + STREAM_WINDOW`` and MAX_DATA ``used - unconsumed + CONNECTION_WINDOW``.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._init_flow_control()

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        before = self._close_at  # type: ignore[attr-defined]
        super().receive_datagram(data, addr, now)  # type: ignore[misc]
        if self._close_at != before:  # type: ignore[attr-defined]
            # aioquic re-arms its idle timer only for a packet it decrypted
            self.authenticated_packets += 1

    def _parse_transport_parameters(self, data: bytes,
                                    from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)  # type: ignore[misc]
        loss = self._loss  # type: ignore[attr-defined]
        loss.max_ack_delay = min(loss.max_ack_delay, PEER_MAX_ACK_DELAY)

    def unacked(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)  # type: ignore[attr-defined]
        if stream is None:
            return 0
        s = stream.sender
        return s._buffer_stop - s._buffer_start  # type: ignore[no-any-return]

    def stream_alive(self, stream_id: int) -> bool:
        """Whether the connection still keeps state for ``stream_id``."""
        return stream_id in self._streams  # type: ignore[attr-defined]

    def is_terminated(self) -> bool:
        return self._state.name == "TERMINATED"  # type: ignore[attr-defined,no-any-return]

    def _write_connection_limits(self, builder: Any, space: object) -> None:
        max_data = self._local_max_data  # type: ignore[attr-defined]
        target = max_data.used - self._pending_total + CONNECTION_WINDOW
        if target - max_data.value >= CONNECTION_WINDOW // 4:
            max_data.value = target
        for limit in (
            self._local_max_data,  # type: ignore[attr-defined]
            self._local_max_streams_bidi,  # type: ignore[attr-defined]
            self._local_max_streams_uni,  # type: ignore[attr-defined]
        ):
            if limit is not max_data and (
                limit.sent - limit.used >= limit.value - limit.sent
            ):
                continue
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type,
                    capacity=_MAX_DATA_CAPACITY,
                    handler=self._on_connection_limit_delivery,  # type: ignore[attr-defined]
                    handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(self, builder: Any, space: object, stream: Any) -> None:
        if not stream.max_stream_data_local:
            return
        target = self._consumed.get(stream.stream_id, 0) + STREAM_WINDOW
        if target - stream.max_stream_data_local >= STREAM_WINDOW // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            from aioquic.quic.packet import QuicFrameType

            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=_MAX_STREAM_DATA_CAPACITY,
                handler=self._on_max_stream_data_delivery,  # type: ignore[attr-defined]
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class _NativeFlowControl(_FlowControl):
    """qh3 2.x: frames, streams and credit live in the native core.

    The core grants receive credit (``popped + window``, per stream and for the
    connection) as its events are popped, and has no other hook. So received stream
    data is counted as it is popped, and while any stream holds ``STREAM_WINDOW`` or
    the connection ``CONNECTION_WINDOW`` unconsumed bytes, the core's events stay in
    the core: the sender stops at the credit already granted. Memory per stalled stream
    is thus at most about two windows (one with the application, one in the core), and,
    unlike aioquic, a stalled stream holds back the whole connection until it drains
    or is forgotten (events of other streams wait in the core behind it).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._init_flow_control()
        self._over: set[int] = set()  # streams at or above STREAM_WINDOW unconsumed

    # accounting happens as events leave the core (_GatedCore), not when the engine
    # hands them on: the gate must close in the middle of one drain
    def delivered(self, stream_id: int, n: int) -> None:
        pass

    def _popped(self, stream_id: int, n: int) -> None:
        super().delivered(stream_id, n)
        if self._pending[stream_id] >= STREAM_WINDOW:
            self._over.add(stream_id)

    def consume(self, stream_id: int, n: int) -> None:
        super().consume(stream_id, n)
        if stream_id in self._over and self._pending.get(stream_id, 0) < STREAM_WINDOW:
            self._over.discard(stream_id)
        self._release()

    def forget_stream(self, stream_id: int) -> None:
        super().forget_stream(stream_id)
        self._over.discard(stream_id)
        self._release()

    def _held(self) -> bool:
        return bool(self._over) or self._pending_total >= CONNECTION_WINDOW

    def _release(self) -> None:
        """Pop what the core held back, now that the application made room."""
        if self._core is not None and not self._held():  # type: ignore[attr-defined]
            self._drain_core()  # type: ignore[attr-defined]

    def _create_core(self, *args: object) -> None:
        super()._create_core(*args)  # type: ignore[misc]
        self._core = _GatedCore(self._core, self)  # type: ignore[has-type]

    def _learn_remote_source_cid(self, data: bytes) -> None:
        self.authenticated_packets += 1  # called for every packet the core accepted
        super()._learn_remote_source_cid(data)  # type: ignore[misc]

    def unacked(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet sent (in-flight ones are bounded
        by the peer's window; qh3 does not expose them per stream)."""
        try:
            return int(self.get_send_buffer_size(stream_id))  # type: ignore[attr-defined]
        except self.engine.errors:
            return 0

    def stream_alive(self, stream_id: int) -> bool:
        """Whether the stream is still open for sending on our side."""
        core = self._core  # type: ignore[attr-defined]
        return core is not None and bool(core.can_send_stream(stream_id))

    def is_terminated(self) -> bool:
        return self._state.name == "TERMINATED"  # type: ignore[attr-defined,no-any-return]


class _GatedCore:
    """Wraps qh3's native core: ``next_event`` returns None while the owner holds."""

    __slots__ = ("_core", "_owner")

    def __init__(self, core: Any, owner: _NativeFlowControl) -> None:
        self._core = core
        self._owner = owner

    def next_event(self) -> tuple[Any, ...] | None:
        owner = self._owner
        if owner._held() and self._core.state == "connected":
            return None
        ev = self._core.next_event()
        if ev is not None and ev[0] == "stream_data" and ev[2]:
            owner._popped(ev[1], len(ev[2]))
        return ev  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


@cache
def connection_class(engine: Engine | None = None) -> type[Any]:
    """The :class:`FlowControlledConnection` class for ``engine`` (default: the
    process's engine, :func:`quictun.quic.engines.current`)."""
    engine = engine or engines.current()
    mixin = _NativeFlowControl if engine.native_core else _AioquicFlowControl
    return type(  # type: ignore[return-value]
        f"FlowControlledConnection_{engine.name}",
        (mixin, engine.QuicConnection),
        {"engine": engine, "__module__": __name__},
    )


class FlowControlled(Protocol):
    """A QUIC connection whose receive credit is granted as the application consumes.

    :func:`connection_class` builds one from an engine's ``QuicConnection``;
    :data:`FlowControlledConnection` is the one of the process's engine.
    Contract: for every byte delivered in ``StreamDataReceived`` the application calls
    :meth:`delivered`, then :meth:`consume` once it no longer holds that byte (written
    to a socket that drained, or discarded). Streams the application has finished with
    must be passed to :meth:`forget_stream` so their unconsumed bytes stop counting.
    Besides, everything of the engine's ``QuicConnection`` is there.
    """

    engine: Engine
    authenticated_packets: int

    def delivered(self, stream_id: int, n: int) -> None: ...
    def consume(self, stream_id: int, n: int) -> None: ...
    def forget_stream(self, stream_id: int) -> None: ...
    def unacked(self, stream_id: int) -> int: ...
    def stream_alive(self, stream_id: int) -> bool: ...
    def is_terminated(self) -> bool: ...
    def __getattr__(self, name: str) -> Any: ...


# the class for the engine chosen by $QUICTUN_ENGINE (see engines.py)
FlowControlledConnection: type[Any] = connection_class()


class EngineHandler(Protocol):
    """What the engine tells the layer above it (forwarders, authentication)."""

    def on_handshake(self, event: events.HandshakeCompleted) -> None: ...
    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None: ...
    def on_stream_reset(self, stream_id: int, error_code: int) -> None: ...
    def on_stop_sending(self, stream_id: int, error_code: int) -> None: ...
    def on_acked(self) -> None: ...
    def on_terminated(self, error_code: int, reason: str) -> None: ...


class QuicEngine:
    """Drive a :class:`FlowControlledConnection` from asyncio.

    ``send_datagram(data)`` is called for every datagram QUIC wants sent to the peer.
    Input: :meth:`datagram_received`. All mutating calls schedule one flush on the
    loop, so a burst of input produces one batch of output.
    """

    def __init__(
        self,
        quic: FlowControlled,
        send_datagram: Callable[[bytes], None],
        handler: EngineHandler | None = None,
        *,
        keepalive: float = KEEPALIVE_INTERVAL,
    ) -> None:
        self.quic = quic
        self._events = quic.engine.events
        self._errors = quic.engine.errors
        self._send = send_datagram
        self._handler: EngineHandler = handler or _NullHandler()
        self.on_closed: Callable[[], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._keepalive = keepalive
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._ping_uid = 0
        self.terminated = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0
        self._closed = False
        if keepalive:
            self._keepalive_handle = self._loop.call_later(keepalive, self._send_keepalive)

    def set_handler(self, handler: EngineHandler) -> None:
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
        self.quic.send_stream_data(stream_id, data, end_stream=end)
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

    def consume(self, stream_id: int, n: int) -> None:
        self.quic.consume(stream_id, n)
        self.schedule_flush()

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
        for data, _addr in self.quic.datagrams_to_send(now):
            self.bytes_out += len(data)
            self._send(data)
        self._process_events()
        self._arm_timer()

    def _arm_timer(self) -> None:
        at = self.quic.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer) if at is not None else None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(self._loop.time())
        self._process_events()
        self._flush()

    def ping(self) -> None:
        """Send a PING now. After a path change its ACK makes QUIC declare the packets
        lost on the old path at once, instead of waiting for a backed-off PTO."""
        if self._closed:
            return
        self._ping_uid += 1
        self.quic.send_ping(self._ping_uid)
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
            elif isinstance(ev, events.StreamReset):
                h.on_stream_reset(ev.stream_id, ev.error_code)
            elif isinstance(ev, events.StopSendingReceived):
                h.on_stop_sending(ev.stream_id, ev.error_code)
            elif isinstance(ev, events.HandshakeCompleted):
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
        for handle in (self._timer, self._keepalive_handle):
            if handle is not None:
                handle.cancel()
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
