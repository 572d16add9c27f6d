"""QUIC connections whose flow control follows the application (sans-I/O).

:func:`connection_class` gives the chosen engine's ``QuicConnection`` (aioquic or qh3, see
:mod:`quictun.quic.engines`) with receive windows (MAX_STREAM_DATA / MAX_DATA) that
advance only as the application reports bytes *consumed* (:meth:`FlowControlled.consume`).
Stock aioquic doubles its windows whenever data arrives, and qh3 grants credit as soon as
data is handed out, whether or not anyone read it, so a fast sender and a slow reader
would grow memory without bound. The windows are the configuration's ``max_stream_data``
and ``max_data`` (the initial credit), so one number sets both. Per stream, qh3 needs
more: the ``quictun/1+credit`` extension (:mod:`quictun.quic.creditstream`).

The datagram size follows the path (:meth:`FlowControlled.set_max_datagram_size`, from
path MTU discovery, :mod:`quictun.punch.pathmtu`): aioquic builds bigger packets from the
next one on, up to :data:`AIOQUIC_MAX_DATAGRAM` and the peer's ``max_udp_payload_size``;
qh3 2.1 fixes the size when its core is made, so it stays at the configured one.
:meth:`FlowControlled.datagram_limit` follows the size in effect.

The asyncio driver that feeds such a connection is :mod:`quictun.aio.driver`.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Protocol

from ..config import TunnelConfig
from . import engines
from .creditstream import CreditedStreams
from .engines import Engine

_MAX_STREAM_DATA_CAPACITY = 1 + 8 + 8
_MAX_DATA_CAPACITY = 1 + 8
# a 1-RTT packet around one DATAGRAM frame: first byte, packet number (2, as aioquic
# sends it), AEAD tag; then the frame's type and a 2-byte length
_SHORT_HEADER = 1 + 2 + 16
_DATAGRAM_FRAME = 1 + 2
CID_LENGTH = 8  # both engines' connection ids (qh3 builds bigger packets than this needs)
MIN_DATAGRAM_SIZE = 1200  # QUIC's floor (RFC 9000 §14); every connection starts there
MAX_UDP_PAYLOAD = 65527  # max_udp_payload_size when the peer announces none (RFC 9000 §18.2)
AIOQUIC_MAX_DATAGRAM = 16383  # aioquic writes STREAM/CRYPTO lengths as 2-byte varints


class _FlowControl(CreditedStreams):
    """Consumption bookkeeping shared by both engines (see FlowControlledConnection),
    and the per-stream credit of ``quictun/1+credit`` (see CreditedStreams)."""

    engine: Engine
    authenticated_packets: int  # grows with every packet that decrypted

    def _init_flow_control(self) -> None:
        cfg = self._configuration  # type: ignore[attr-defined]
        self.stream_window: int = cfg.max_stream_data
        self.connection_window: int = cfg.max_data
        self._consumed: dict[int, int] = {}
        self._pending: dict[int, int] = {}  # delivered but not consumed, per live stream
        self._pending_total = 0
        self.authenticated_packets = 0
        self._init_credit()
        self.peer_max_udp_payload = MAX_UDP_PAYLOAD

    def delivered(self, stream_id: int, n: int) -> None:
        """Record ``n`` bytes handed to the application for ``stream_id``."""
        pending = self._pending[stream_id] = self._pending.get(stream_id, 0) + n
        self._pending_total += n
        self._credit_delivered(stream_id, pending)

    def consume(self, stream_id: int, n: int) -> None:
        """Record that the application released ``n`` bytes of ``stream_id``."""
        consumed = self._consumed[stream_id] = self._consumed.get(stream_id, 0) + n
        if stream_id in self._pending:
            take = min(n, self._pending[stream_id])
            self._pending[stream_id] -= take
            self._pending_total -= take
            self._credit_consumed(stream_id, consumed)

    def forget_stream(self, stream_id: int) -> None:
        """The application is done with a stream: its unconsumed bytes are released."""
        self._pending_total -= self._pending.pop(stream_id, 0)
        self._consumed.pop(stream_id, None)
        self._credit_forget(stream_id)

    def datagram_limit(self) -> int:
        """The largest DATAGRAM frame payload (RFC 9221) one packet carries now; 0 when the
        peer accepts none (an older quictun). Larger ones must not be queued: aioquic
        would keep one that never fits at the head of its queue forever, and qh3 closes
        the connection."""
        remote = self._remote_max_datagram_frame_size  # type: ignore[attr-defined]
        if not remote:
            return 0
        room = self._packet_size() - _SHORT_HEADER - self._peer_cid_length() - _DATAGRAM_FRAME
        return max(0, min(room, remote - _DATAGRAM_FRAME))

    def _packet_size(self) -> int:
        return int(self._configuration.max_datagram_size)  # type: ignore[attr-defined]

    def _peer_cid_length(self) -> int:
        return CID_LENGTH

    def datagram_backlog(self) -> int:
        """DATAGRAM frames queued and not yet sent (0 where the engine does not tell)."""
        return 0


class _AioquicFlowControl(_FlowControl):
    """aioquic: the connection is Python; replace its window writers.

    Stock aioquic doubles a window whenever data arrives; here MAX_STREAM_DATA is
    ``consumed + stream_window`` and MAX_DATA ``used - unconsumed + connection_window``.
    The peer's advertised ``max_ack_delay`` is capped at :attr:`peer_max_ack_delay`
    (see :attr:`quictun.config.TunnelConfig.peer_max_ack_delay`).
    """

    peer_max_ack_delay: float = TunnelConfig.peer_max_ack_delay

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
        loss.max_ack_delay = min(loss.max_ack_delay, self.peer_max_ack_delay)
        from aioquic.buffer import Buffer
        from aioquic.quic.packet import pull_quic_transport_parameters

        # aioquic checks the peer's max_udp_payload_size but never obeys it (a qh3 client
        # announces 1472): remember it, set_max_datagram_size() stays below it
        params = pull_quic_transport_parameters(Buffer(data=data))
        if params.max_udp_payload_size is not None:
            self.peer_max_udp_payload = params.max_udp_payload_size

    def set_max_datagram_size(self, size: int) -> int:
        """Build datagrams of up to ``size`` bytes from now on (at least 1200, at most
        what the peer accepts); returns the size in effect. Packets already sent keep
        their size; what they carried is re-framed at the new size if they are lost."""
        size = max(MIN_DATAGRAM_SIZE, min(size, self.peer_max_udp_payload,
                                          AIOQUIC_MAX_DATAGRAM))
        self._max_datagram_size = size  # read by every new packet builder
        loss = self._loss  # type: ignore[attr-defined]
        loss._pacer._max_datagram_size = size
        cc = loss._cc  # reno and cubic grow and floor their window in datagrams
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):
            cc.additive_increase_factor = size
        return size

    def pto_count(self) -> int:
        """Probe timeouts in a row (0 once an ACK arrives): a stall indicator."""
        return int(self._loss._pto_count)  # type: ignore[attr-defined]

    def unacked(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged by the peer (or held
        for the peer's credit)."""
        held = self.held_back(stream_id)
        stream = self._streams.get(stream_id)  # type: ignore[attr-defined]
        if stream is None:
            return held
        s = stream.sender
        return s._buffer_stop - s._buffer_start + held  # type: ignore[no-any-return]

    def stream_alive(self, stream_id: int) -> bool:
        """Whether the connection still keeps state for ``stream_id``."""
        return stream_id in self._streams  # type: ignore[attr-defined]

    def _packet_size(self) -> int:
        return int(self._max_datagram_size)  # type: ignore[attr-defined]  # may grow (PMTU)

    def _peer_cid_length(self) -> int:
        return len(self._peer_cid.cid)  # type: ignore[attr-defined]

    def datagram_backlog(self) -> int:
        return len(self._datagrams_pending)  # type: ignore[attr-defined]

    def is_terminated(self) -> bool:
        return self._state.name == "TERMINATED"  # type: ignore[attr-defined,no-any-return]

    def _write_connection_limits(self, builder: Any, space: object) -> None:
        max_data = self._local_max_data  # type: ignore[attr-defined]
        window = self.connection_window
        target = max_data.used - self._pending_total + window
        if target - max_data.value >= window // 4:
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
        window = self.stream_window
        target = self._consumed.get(stream.stream_id, 0) + window
        if target - stream.max_stream_data_local >= window // 4:
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
    connection) as its events are popped, in arrival order, and has no other hook. So
    received stream data is counted as it is popped, and while the connection holds
    ``connection_window`` unconsumed bytes the core's events stay in the core: the
    sender stops at the credit already granted. Per stream, with a ``quictun/1+credit``
    peer the in-band credit (:mod:`quictun.quic.credit`) bounds each stream to one
    window while every event is popped, so one slow reader does not hold back the
    others; with a plain ``quictun/1`` peer the core is also held while any stream holds
    ``stream_window`` unconsumed bytes (and then that stream stalls the connection).
    Memory per stalled stream is at most about two windows (one with the application,
    one in the core).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._init_flow_control()
        self._over: set[int] = set()  # streams at or above stream_window unconsumed
        self._datagram: bytes | None = None  # the datagram being received

    # accounting happens as events leave the core (_GatedCore), not when the engine
    # hands them on: the gate must close in the middle of one drain
    def delivered(self, stream_id: int, n: int) -> None:
        pass

    def _popped(self, stream_id: int, n: int) -> None:
        super().delivered(stream_id, n)
        if self._recv_credit is None and self._pending[stream_id] >= self.stream_window:
            self._over.add(stream_id)

    def _negotiated(self, alpn: str | None) -> None:
        super()._negotiated(alpn)
        if self._recv_credit is not None and self._over:
            self._over.clear()  # the peer's credit bounds each stream from now on
            self._release()

    def consume(self, stream_id: int, n: int) -> None:
        super().consume(stream_id, n)
        if stream_id in self._over and self._pending.get(stream_id, 0) < self.stream_window:
            self._over.discard(stream_id)
        self._release()

    def forget_stream(self, stream_id: int) -> None:
        super().forget_stream(stream_id)
        self._over.discard(stream_id)
        self._release()

    def _held(self) -> bool:
        return bool(self._over) or self._pending_total >= self.connection_window or (
            self._overrun != 0)

    def _release(self) -> None:
        """Pop what the core held back, now that the application made room."""
        if self._core is not None and not self._held():  # type: ignore[attr-defined]
            self._drain_core()  # type: ignore[attr-defined]

    def _create_core(self, *args: object) -> None:
        super()._create_core(*args)  # type: ignore[misc]
        self._core = _GatedCore(self._core, self)  # type: ignore[has-type]

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        self._datagram = data  # the whole UDP payload, for _GatedCore.receive_datagram
        try:
            super().receive_datagram(data, addr, now)  # type: ignore[misc]
        finally:
            self._datagram = None

    def set_max_datagram_size(self, size: int) -> int:
        """qh3 2.1 fixes the datagram size when its core is made (no binding changes it
        later): the size stays the configured one (1200 by default, see
        :attr:`quictun.config.TunnelConfig.max_datagram`)."""
        return int(self._configuration.max_datagram_size)  # type: ignore[attr-defined]

    def pto_count(self) -> int:
        """Probe timeouts in a row (0 once an ACK arrives): a stall indicator."""
        core = self._core  # type: ignore[attr-defined]
        return int(core.pto_count) if core is not None else 0

    def _learn_remote_source_cid(self, data: bytes) -> None:
        self.authenticated_packets += 1  # called for every packet the core accepted
        super()._learn_remote_source_cid(data)  # type: ignore[misc]

    def unacked(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet sent (in-flight ones are bounded
        by the peer's window; qh3 does not expose them per stream), or held for the
        peer's credit."""
        try:
            queued = int(self.get_send_buffer_size(stream_id))  # type: ignore[attr-defined]
        except self.engine.errors:
            queued = 0
        return queued + self.held_back(stream_id)

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

    def receive_datagram(self, packet: bytes, addr: Any, now: float,
                         size: int | None = None) -> Any:
        """Feed one packet; a first packet followed only by zero padding goes in whole.

        qh3's facade hands its core one packet at a time, and qh3 2.1's core credits
        only those bytes against its anti-amplification limit (RFC 9000 section 8.1
        counts the whole datagram). aioquic pads its Initial with zeros *after* the
        packet (about 500 bytes of packet in a 1350-byte datagram), so a qh3 server
        could send only three times the packet, less than its first flight, and its
        packet builder then failed ("packet builder capacity exhausted") instead of
        waiting. The core skips the padding itself (it parses no packet there), as it
        would off the wire.
        """
        full = self._owner._datagram
        if (full is not None and len(packet) < len(full) and full.startswith(packet)
                and full.count(0, len(packet)) == len(full) - len(packet)):
            packet = full
        return self._core.receive_datagram(packet, addr, now, size)

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
    def datagram_limit(self) -> int: ...
    def datagram_backlog(self) -> int: ...
    def is_terminated(self) -> bool: ...
    def set_max_datagram_size(self, size: int) -> int: ...
    def pto_count(self) -> int: ...
    def __getattr__(self, name: str) -> Any: ...


def __getattr__(name: str) -> Any:
    """``FlowControlledConnection``: the class for the engine chosen by $QUICTUN_ENGINE
    (see engines.py), made on first use, so importing this module does not import the
    QUIC engine (a connect needs it only once the relay answered its hello)."""
    if name == "FlowControlledConnection":
        return connection_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
