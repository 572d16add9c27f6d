"""Forward byte streams (TCP sockets, stdio pipes) over QUIC streams, with backpressure.

One :class:`StreamBridge` joins one local byte stream to one bidirectional QUIC stream:

- local → QUIC: bytes read are written to the stream; reading pauses while more than
  ``send_high`` bytes are unacknowledged and resumes below ``send_low``
  (:class:`~quictun.config.TunnelConfig`).
- QUIC → local: bytes are written to the local transport; they count as *consumed*
  (so the peer gets more credit) only once the transport's buffer has drained, so the
  receive window, not memory, absorbs a slow reader.
- EOF (TCP half-close) ↔ stream FIN, both ways; a local error ↔ RESET_STREAM +
  STOP_SENDING; the target refusing a connection resets the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import TunnelConfig
from ..proto.control import (
    ERR_LOCAL_RESET,
    ERR_NO_DEFAULT,
    ERR_TARGET_UNREACHABLE,
    ST_FAILURE,
    OpenReply,
    parse_reply,
)

if TYPE_CHECKING:
    from .driver import QuicDriver

log = logging.getLogger("quictun.forward")

CONSUMED_POLL = 0.05  # s between looks at a local write buffer that is draining


class StreamBridge(asyncio.Protocol):
    """Join one local byte stream to QUIC stream ``stream_id`` of ``engine``.

    Acts as the asyncio protocol of the local read side (and, for sockets, the write
    side too). For pipes, pass the write transport with :meth:`attach_writer`.
    The owner routes the stream's QUIC events to :meth:`quic_data`,
    :meth:`quic_reset` and :meth:`quic_stop_sending`, and calls :meth:`acked` when
    acknowledgements may have freed send buffer.
    """

    def __init__(self, driver: QuicDriver, stream_id: int, *,
                 config: TunnelConfig | None = None,
                 on_done: Callable[[StreamBridge], None] | None = None) -> None:
        config = config or TunnelConfig()
        self.driver = driver
        self.stream_id = stream_id
        self._send_high = config.send_high
        self._send_low = config.send_low
        self._write_high = config.write_high
        self.on_done = on_done
        self._reader: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._pending: list[bytes] = []  # QUIC data that arrived before the writer
        self._pending_fin = False
        self._written = 0
        self._reported = 0
        self._reading_paused = False
        self._local_eof = False  # local side sent EOF (we sent FIN)
        self._remote_eof = False  # QUIC FIN received (we wrote EOF locally)
        self._done = False
        self.bytes_up = 0
        self.bytes_down = 0
        self._batch: list[bytes] = []  # QUIC data for the writer, flushed once per loop turn
        self._polling = False
        self.send_first = b""  # written to the stream before any local byte (a reply)
        self._reply: bytearray | None = None  # the server's reply, while expected
        self.on_reply: Callable[[OpenReply], None] | None = None
        self.reply: OpenReply | None = None
        self.reset_code: int | None = None  # the peer's RESET_STREAM code, if it reset

    # -- local transport -------------------------------------------------------------
    @property
    def clean(self) -> bool:
        """True once both directions ended with a FIN (nothing was reset)."""
        return self._local_eof and self._remote_eof

    #: False when the read side is a pipe and the writer comes via :meth:`attach_writer`
    duplex = True

    def expect_reply(self, on_reply: Callable[[OpenReply], None] | None = None) -> None:
        """The stream starts with the server's :class:`OpenReply`: strip it, call
        ``on_reply`` with it before any target byte reaches the local side, and, for a
        refusal, end the stream (closing the local side gracefully, so a reply the
        callback wrote still leaves)."""
        self._reply = bytearray()
        self.on_reply = on_reply

    def _reply_data(self, data: bytes) -> bytes | None:
        """Feed the expected reply; returns what follows it, or None (more needed, or
        refused and finished)."""
        assert self._reply is not None
        self._reply.extend(data)
        got = parse_reply(bytes(self._reply[:257]))
        if got is None:
            self.driver.consume(self.stream_id, len(data))
            return None
        reply, used = got
        rest = bytes(self._reply[used:])
        self.driver.consume(self.stream_id, len(data) - len(rest))
        self._reply = None
        self.reply = reply
        if not reply.ok:
            self.driver.consume(self.stream_id, len(rest))
            self._refused(reply)
            return None
        if self.on_reply is not None:
            self.on_reply(reply)
        return rest

    def _refused(self, reply: OpenReply) -> None:
        self._reply = None
        self.reply = reply
        if self.on_reply is not None:
            self.on_reply(reply)
        self.driver.reset(self.stream_id, ERR_LOCAL_RESET)
        for t in {id(x): x for x in (self._reader, self._writer) if x is not None}.values():
            t.close()
        self._finish()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader = transport
        if self.send_first:
            self.driver.send(self.stream_id, self.send_first)
            self.send_first = b""
        # not isinstance(WriteTransport): uvloop's socket transports do not subclass it
        if self._done:  # the stream ended while the target (or stdin) was being connected
            # sockets abort; a read pipe (connect --stdio's stdin) has only close()
            getattr(transport, "abort", transport.close)()
            return
        if self.duplex and self._writer is None:
            self.attach_writer(transport)  # type: ignore[arg-type]

    def attach_writer(self, transport: asyncio.WriteTransport) -> None:
        self._writer = transport
        transport.set_write_buffer_limits(high=self._write_high)
        pending, self._pending = self._pending, []
        for chunk in pending:
            self._write(chunk)
        if self._pending_fin:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        if self._done or self._local_eof:
            return
        self.bytes_up += len(data)
        self.driver.send(self.stream_id, data)
        if not self._reading_paused and self.driver.quic.unacked(self.stream_id) > self._send_high:
            self._reading_paused = True
            self._reader.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if not self._done and not self._local_eof:
            self._local_eof = True
            self.driver.send(self.stream_id, b"", end=True)
            self._maybe_done()
        return True  # keep the write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        w = self._writer
        if exc is None and self._local_eof and w is not None and w is not self._reader:
            return  # a read pipe (stdin) ended after its EOF: the write side goes on
        if not (self._local_eof and self._remote_eof):
            self.driver.reset(self.stream_id, ERR_LOCAL_RESET)
        self._finish()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self._report_consumed()

    # -- QUIC side ---------------------------------------------------------------------
    def quic_data(self, data: bytes, end: bool) -> None:
        if self._done:
            if data:
                self.driver.consume(self.stream_id, len(data))
            return
        if self._reply is not None:
            rest = self._reply_data(data) if data else None
            if self._reply is not None:  # still waiting for it
                if end:
                    self._refused(OpenReply(ST_FAILURE, "the server ended the stream"))
                return
            if rest is None:  # refused
                return
            data = rest
        if data:
            self.bytes_down += len(data)
            if self._writer is None:
                self._pending.append(data)
            else:
                self._write(data)
        if end:
            if self._writer is None:
                self._pending_fin = True
            else:
                self._write_eof()

    def quic_reset(self, error_code: int) -> None:
        """Peer reset its sending side: abort the local connection."""
        self.reset_code = error_code
        if self._reply is not None and not self._done:
            self._reply = None
            self.reply = OpenReply(ST_FAILURE, reset_reason(error_code))
            if self.on_reply is not None:
                self.on_reply(self.reply)
        self._abort_local()

    def quic_stop_sending(self, error_code: int) -> None:
        """Peer will not read any more: stop reading locally and abort."""
        if self.reset_code is None:
            self.reset_code = error_code
        self.driver.reset(self.stream_id, error_code)
        self._abort_local()

    def acked(self) -> None:
        if self._reading_paused and self.driver.quic.unacked(self.stream_id) < self._send_low:
            self._reading_paused = False
            if self._reader is not None and not self._reader.is_closing():
                self._reader.resume_reading()  # type: ignore[attr-defined]

    # -- helpers ----------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        """Queue data for the writer; one write per event-loop turn, not per packet."""
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush_batch)
        self._batch.append(data)

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        n = sum(map(len, batch))
        w = self._writer
        if w is None or w.is_closing():
            self.driver.consume(self.stream_id, n)
            return
        w.write(batch[0] if len(batch) == 1 else b"".join(batch))
        self._written += n
        self._report_consumed()

    def _write_eof(self) -> None:
        self._flush_batch()
        self._remote_eof = True
        w = self._writer
        if w is not None and not w.is_closing():
            try:
                if w.can_write_eof():
                    w.write_eof()
                elif w is not self._reader:
                    w.close()  # a pipe: closing it is its EOF
            except OSError:
                # the local side already hung up (ENOTCONN): nobody left to tell
                self._abort_local()
                return
        self._maybe_done()

    def _report_consumed(self) -> None:
        w = self._writer
        if w is None:
            return
        buffered = w.get_write_buffer_size()
        consumed = self._written - buffered
        if consumed > self._reported:
            self.driver.consume(self.stream_id, consumed - self._reported)
            self._reported = consumed
        if buffered and not self._polling and not self._done:
            # asyncio says nothing when a buffer drains below the high-water mark: look
            # again shortly, or those bytes would stay "unconsumed" and, summed over many
            # idle streams, could pin the connection window
            self._polling = True
            asyncio.get_running_loop().call_later(CONSUMED_POLL, self._poll_consumed)

    def _poll_consumed(self) -> None:
        self._polling = False
        if not self._done:
            self._report_consumed()

    def _maybe_done(self) -> None:
        if self._local_eof and self._remote_eof:
            for t in {id(x): x for x in (self._reader, self._writer) if x is not None}.values():
                t.close()
            self._finish()

    def _abort_local(self) -> None:
        for t in {id(x): x for x in (self._reader, self._writer) if x is not None}.values():
            if not t.is_closing():
                t.abort() if hasattr(t, "abort") else t.close()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self.driver.quic.forget_stream(self.stream_id)
        if self.on_done is not None:
            self.on_done(self)


def reset_reason(error_code: int) -> str:
    """What a RESET_STREAM from the serving side means, for a person."""
    if error_code == ERR_NO_DEFAULT:
        return ("the server offers several services and none is the default: name one "
                "with --service (`quictun connect NAME --list` shows them)")
    if error_code == ERR_TARGET_UNREACHABLE:
        return "the server could not connect its target (or it is an older quictun)"
    return f"the server reset the stream (code {error_code:#x})"


class WriteSide(asyncio.Protocol):
    """Protocol for a write-only pipe (stdout) whose flow control feeds a bridge."""

    def __init__(self, bridge: StreamBridge) -> None:
        self.bridge = bridge

    def resume_writing(self) -> None:
        self.bridge.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.bridge.connection_lost(exc)
