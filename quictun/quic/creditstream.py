"""The credit stream inside a QUIC connection (ALPN ``quictun/1+credit``), sans-I/O.

:class:`CreditedStreams` is a mixin of :mod:`quictun.quic.flow`'s connection classes: it
carries :mod:`quictun.quic.credit`'s pure bookkeeping over an engine's
``QuicConnection``. Each method documents the hook it fills:

* sending: :meth:`send_stream_data` hands QUIC at most the credit the peer granted a
  stream and holds the rest (:meth:`held_back` counts it, so the caller's backpressure
  sees it); the peer's records release it.
* receiving: :meth:`next_event` takes the peer's credit stream out of the event stream
  (the application never sees it); consumption reported by the flow-control layer
  (:meth:`_credit_consumed`) becomes records on our own credit stream, written in
  :meth:`datagrams_to_send`; data beyond a granted limit closes the connection with
  FLOW_CONTROL_ERROR.
* negotiation: limits apply from the first byte (waiting for the handshake would race
  the receiver); when ``HandshakeCompleted`` names another ALPN than
  :data:`~quictun.quic.credit.ALPN_CREDIT` (a plain ``quictun/1`` peer), whatever was
  held goes out and the connection has QUIC's flow control only, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from .credit import (
    ALPN_CREDIT,
    FLOW_CONTROL_ERROR,
    TAG,
    ReceiveCredit,
    RecordReader,
    SendCredit,
    encode_record,
)
from .engines import Engine

log = logging.getLogger("quictun.quic")

__all__ = ["CreditedStreams"]


class CreditedStreams:
    """The credit extension over one connection (see the module docstring).

    The flow-control class that mixes this in calls :meth:`_init_credit` once, and
    :meth:`_credit_delivered`, :meth:`_credit_consumed` and :meth:`_credit_forget` from
    its own ``delivered``, ``consume`` and ``forget_stream``. The engine's
    ``QuicConnection`` must come after it in the method resolution order.
    """

    engine: Engine
    stream_window: int
    _consumed: dict[int, int]

    def _init_credit(self) -> None:
        # the send side until the handshake shows a plain quictun/1 peer (then None)
        self._send_credit: SendCredit | None = SendCredit()
        self._recv_credit: ReceiveCredit | None = None  # set once the extension is agreed
        self._records = bytearray()  # our records, for the next datagrams_to_send
        self._my_credit_sid: int | None = None
        self._peer_credit_sid: int | None = None
        self._record_reader = RecordReader()
        self._app_uni: set[int] = set()  # the peer's unidirectional streams of the application
        self._overrun = 0  # 1: the peer sent beyond its credit; 2: connection closed
        self._data_event = self.engine.events.StreamDataReceived
        self._handshake_event = self.engine.events.HandshakeCompleted

    @property
    def credit_agreed(self) -> bool:
        """Whether the peer speaks ``quictun/1+credit`` (known once the handshake is done)."""
        return self._recv_credit is not None

    # -- hooks of the flow-control layer ------------------------------------------------
    def _credit_delivered(self, stream_id: int, pending: int) -> None:
        """``pending`` bytes of ``stream_id`` are now delivered and not consumed."""
        rc = self._recv_credit
        # an overrun leaves more than 3/4 of a window unconsumed (grants keep the limit
        # above consumed + 3/4 window), so most deliveries skip the exact check
        if rc is not None and pending > rc.window // 2 and stream_id != self._peer_credit_sid \
                and self._consumed.get(stream_id, 0) + pending > rc.limit(stream_id):
            self._overrun = self._overrun or 1

    def _credit_consumed(self, stream_id: int, consumed: int) -> None:
        """The application has consumed ``consumed`` bytes of ``stream_id`` in all."""
        rc = self._recv_credit
        if rc is not None and consumed >= rc.due.get(stream_id, rc.first_due) \
                and stream_id != self._peer_credit_sid:
            self._grant(stream_id)

    def _credit_forget(self, stream_id: int) -> None:
        """The application is done with ``stream_id``."""
        if self._recv_credit is not None:
            self._recv_credit.forget(stream_id)
        if self._send_credit is not None:
            self._send_credit.forget(stream_id)

    def held_back(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` written but waiting for the peer's credit."""
        return self._send_credit.held(stream_id) if self._send_credit is not None else 0

    # -- receiving ------------------------------------------------------------------------
    def _grant(self, stream_id: int) -> None:
        limit = self._recv_credit.consumed(  # type: ignore[union-attr]
            stream_id, self._consumed.get(stream_id, 0))
        if limit is not None:
            self._records += encode_record(stream_id, limit)

    def _negotiated(self, alpn: str | None) -> None:
        """The handshake is done: use the credit if the peer speaks the extension."""
        if alpn != ALPN_CREDIT or self._send_credit is None:
            send, self._send_credit = self._send_credit, None
            for stream_id, data, fin in send.release_all() if send is not None else []:
                try:  # a plain quictun/1 peer: QUIC flow control only, from now on
                    super().send_stream_data(stream_id, data, end_stream=fin)  # type: ignore[misc]
                except self.engine.errors:
                    pass
            return
        self._recv_credit = ReceiveCredit(self.stream_window)
        for stream_id in list(self._consumed):  # consumption before the handshake
            self._grant(stream_id)

    def next_event(self) -> Any:
        """The engine's next event, with the peer's credit stream taken out."""
        while True:
            ev = super().next_event()  # type: ignore[misc]
            kind = type(ev)
            if kind is self._data_event:
                if ev.stream_id & 2 and self._recv_credit is not None and self._credit_data(ev):
                    continue  # the credit stream is not the application's
            elif kind is self._handshake_event:
                self._negotiated(ev.alpn_protocol)
            return ev

    def _credit_data(self, ev: Any) -> bool:
        """Take the peer's credit stream out of the event stream; True if it was that."""
        sid, data = ev.stream_id, ev.data
        if sid != self._peer_credit_sid:
            ours = (sid & 1) == (0 if self._is_client else 1)  # type: ignore[attr-defined]
            if ours or sid in self._app_uni or not data:
                if ev.end_stream:
                    self._app_uni.discard(sid)
                return False
            if data[:1] != TAG or self._peer_credit_sid is not None:
                if not ev.end_stream:
                    self._app_uni.add(sid)  # e.g. candidates (JSON), until their FIN
                return False
            self._peer_credit_sid = sid
            data = data[1:]
        if ev.data:
            self.consume(sid, len(ev.data))  # type: ignore[attr-defined]  # never held
        send = self._send_credit
        for stream_id, limit in self._record_reader.feed(data):
            released = send.raise_limit(stream_id, limit) if send is not None else None
            if released is not None:
                try:
                    super().send_stream_data(stream_id, released[0],  # type: ignore[misc]
                                             end_stream=released[1])
                except self.engine.errors:
                    send.drop(stream_id)  # type: ignore[union-attr]
        return True

    # -- sending --------------------------------------------------------------------------
    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Hand QUIC what the peer's credit allows now; hold the rest, in order."""
        credit = self._send_credit
        if credit is None or stream_id == self._my_credit_sid:
            super().send_stream_data(stream_id, data, end_stream)  # type: ignore[misc]
            return
        now, fin = credit.send(stream_id, data, end_stream)
        if now or fin or not (data or end_stream):  # b"": opens the stream
            super().send_stream_data(stream_id, now, fin)  # type: ignore[misc]

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Reset the stream; bytes held for credit are dropped."""
        if self._send_credit is not None:
            self._send_credit.drop(stream_id)
        super().reset_stream(stream_id, error_code)  # type: ignore[misc]

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """Write pending records (and close on an overrun), then the engine's datagrams."""
        if self._records:
            if self._my_credit_sid is None:
                self._my_credit_sid = self.get_next_available_stream_id(  # type: ignore[attr-defined]
                    is_unidirectional=True)
                self._records[:0] = TAG
            records, self._records = bytes(self._records), bytearray()
            try:
                super().send_stream_data(self._my_credit_sid, records)  # type: ignore[misc]
            except self.engine.errors as exc:
                log.debug("credit stream: %s", exc)
        if self._overrun == 1:
            self._overrun = 2
            log.warning("the peer sent more than its stream credit: closing")
            self.close(error_code=FLOW_CONTROL_ERROR,  # type: ignore[attr-defined]
                       reason_phrase="stream credit exceeded")
        return super().datagrams_to_send(now)  # type: ignore[misc,no-any-return]
