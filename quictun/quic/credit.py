"""Per-stream send credit granted by the application: ALPN ``quictun/1+credit``.

Why it exists: qh3's native core grants QUIC receive credit (MAX_STREAM_DATA) as its
events are *popped*, and pops them in arrival order for all streams at once. A
receiver that stops popping a stream whose reader is slow therefore stops every
stream behind it; one that keeps popping grants the slow stream's sender a fresh
window with every pop, so memory grows without bound. No qh3 2.1 API grants credit
per stream. So, when both ends speak ``quictun/1+credit`` (negotiated by ALPN), each
receiver also tells the sender, in band, how far it may send each stream, and counts
as consumed only what the application released (as the aioquic engine's
MAX_STREAM_DATA does in ``flow.py``). The sender never hands QUIC more of a stream than
that; the receiver can then pop every event at once, and one slow reader holds at most
one window of its own stream.

The ALPN names the protocol *inside* the QUIC connection (streams, control messages),
version 1, plus this extension; it is not the version of the signalling protocol or of
the offer (protocol 2), which the relay and the PAKE carry (docs/protocol.md).

Wire format (inside the encrypted QUIC connection): each endpoint opens at most one
unidirectional *credit stream*, whose first byte is :data:`TAG` (0x01; other
unidirectional streams carry JSON, which starts with ``[``), followed by records of
two QUIC variable-length integers: a stream ID and the stream offset up to which
the peer may send on it. Limits only grow; a smaller one is ignored. Until a record
arrives, every stream's limit is :data:`INITIAL_CREDIT`. Bytes of the credit stream
itself are not credited (the receiver consumes them on arrival). A receiver that
gets data beyond a limit it granted closes the connection (FLOW_CONTROL_ERROR).

This module is pure bookkeeping (no I/O, no engine): :class:`SendCredit` for the
sending side, :class:`ReceiveCredit` for the receiving side, :class:`RecordReader`
and :func:`encode_record` for the records. The connection glue is
:mod:`quictun.quic.creditstream`.
"""

from __future__ import annotations

ALPN_PLAIN = "quictun/1"  # the in-connection protocol, version 1
ALPN_CREDIT = "quictun/1+credit"  # version 1 plus this credit stream
ALPNS = (ALPN_CREDIT, ALPN_PLAIN)  # offered by clients, preferred in this order by servers
TAG = b"\x01"
INITIAL_CREDIT = 2 * 1024 * 1024  # bytes of every stream a sender may send before a record
FLOW_CONTROL_ERROR = 0x3  # RFC 9000 transport error code, used when a peer overruns


def encode_varint(value: int) -> bytes:
    """A QUIC variable-length integer (RFC 9000 16). Raises ValueError if out of range."""
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value < 0x4000_0000_0000_0000:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"{value} does not fit a QUIC varint")


def encode_record(stream_id: int, limit: int) -> bytes:
    """One credit record: the peer may send ``stream_id`` up to offset ``limit``."""
    return encode_varint(stream_id) + encode_varint(limit)


class RecordReader:
    """Reassembles records from the chunks of a credit stream (after its tag byte)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Records completed by ``data``, in order; a partial one is kept for later."""
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, int]] = []
        pos, n = 0, len(buf)
        while pos < n:
            first = _read_varint(buf, pos)
            if first is None:
                break
            second = _read_varint(buf, first[1])
            if second is None:
                break
            out.append((first[0], second[0]))
            pos = second[1]
        self._buf = bytes(buf[pos:])
        return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if ``buf`` ends inside it."""
    if pos >= len(buf):
        return None
    length = 1 << (buf[pos] >> 6)
    if pos + length > len(buf):
        return None
    value = buf[pos] & 0x3F
    for b in buf[pos + 1:pos + length]:
        value = (value << 8) | b
    return value, pos + length


class SendCredit:
    """The sending side: how much of each stream may be handed to QUIC now.

    A stream's bytes beyond its limit are held here, in order, with its FIN, until
    :meth:`raise_limit` releases them. The caller bounds what it writes (via
    :meth:`held`), so holding is bounded too. A stream's state ends with its FIN handed
    on, or with :meth:`drop`. Limits apply from the start, before the handshake tells
    whether the peer speaks quictun/1+credit at all (a sender that waited for that
    would race the receiver); for a plain quictun/1 peer, :meth:`release_all` hands
    everything on.
    """

    def __init__(self, initial: int = INITIAL_CREDIT) -> None:
        self.initial = initial
        self._sent: dict[int, int] = {}
        self._limit: dict[int, int] = {}
        self._held: dict[int, bytearray] = {}
        self._fin: set[int] = set()  # streams whose FIN waits behind held bytes

    def release_all(self) -> list[tuple[int, bytes, bool]]:
        """(stream, bytes, FIN) of everything held, in stream order; state is cleared."""
        out = [(sid, bytes(held), sid in self._fin) for sid, held in sorted(self._held.items())]
        self._sent.clear()
        self._limit.clear()
        self._held.clear()
        self._fin.clear()
        return out

    def send(self, stream_id: int, data: bytes, end: bool) -> tuple[bytes, bool]:
        """Bytes and FIN of ``stream_id`` to hand to QUIC now; the rest is held."""
        held = self._held.get(stream_id)
        if held is not None:  # order: new bytes queue behind held ones
            held += data
            if end:
                self._fin.add(stream_id)
            return b"", False
        sent = self._sent.get(stream_id, 0)
        room = max(0, self._limit.get(stream_id, self.initial) - sent)
        if room >= len(data):
            now, rest = data, b""
        else:
            now, rest = data[:room], data[room:]
        if rest:
            self._held[stream_id] = bytearray(rest)
            if end:
                self._fin.add(stream_id)
            end = False
        self._advance(stream_id, sent + len(now), end)
        return bytes(now), end

    def raise_limit(self, stream_id: int, limit: int) -> tuple[bytes, bool] | None:
        """Apply a record; returns held bytes (and FIN) now allowed, or None."""
        if stream_id not in self._sent or limit <= self._limit.get(stream_id, self.initial):
            return None  # a stream we never sent on, one already done, or no news
        self._limit[stream_id] = limit
        held = self._held.get(stream_id)
        if held is None:
            return None
        sent = self._sent[stream_id]
        room = limit - sent
        if room <= 0:
            return None
        if room >= len(held):
            now = bytes(held)
            del self._held[stream_id]
            end = stream_id in self._fin
            self._fin.discard(stream_id)
        else:
            now = bytes(held[:room])
            del held[:room]
            end = False
        self._advance(stream_id, sent + len(now), end)
        return now, end

    def held(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` waiting for credit."""
        held = self._held.get(stream_id)
        return len(held) if held is not None else 0

    def forget(self, stream_id: int) -> None:
        """The application is done with the stream: drop its state unless bytes wait."""
        if stream_id not in self._held:
            self.drop(stream_id)

    def drop(self, stream_id: int) -> None:
        """The stream was reset: forget it, held bytes included."""
        self._sent.pop(stream_id, None)
        self._limit.pop(stream_id, None)
        self._held.pop(stream_id, None)
        self._fin.discard(stream_id)

    def _advance(self, stream_id: int, sent: int, end: bool) -> None:
        if end:  # nothing more will be sent on it: no state to keep
            self._sent.pop(stream_id, None)
            self._limit.pop(stream_id, None)
        else:
            self._sent[stream_id] = sent


class ReceiveCredit:
    """The receiving side: the limit granted per stream, and when to grant more.

    A new limit is ``consumed + window``, announced once it exceeds the last one by a
    quarter window (the hysteresis of the aioquic engine's MAX_STREAM_DATA in ``flow.py``).
    """

    def __init__(self, window: int, initial: int = INITIAL_CREDIT) -> None:
        self.window = window
        self.initial = initial
        self._granted: dict[int, int] = {}
        # consumed total at which a stream's next record is due (a cheap test per byte
        # count for the caller): before any grant, when consumed + window passes the
        # initial credit by a quarter window
        self.first_due = initial - window + window // 4
        self.due: dict[int, int] = {}

    def limit(self, stream_id: int) -> int:
        """The highest offset the peer may have sent on ``stream_id``."""
        return self._granted.get(stream_id, self.initial)

    def consumed(self, stream_id: int, total: int) -> int | None:
        """``total`` bytes of the stream are consumed: a new limit to announce, or None."""
        target = total + self.window
        if target - self._granted.get(stream_id, self.initial) < self.window // 4:
            return None
        self._granted[stream_id] = target
        self.due[stream_id] = total + self.window // 4
        return target

    def forget(self, stream_id: int) -> None:
        self._granted.pop(stream_id, None)
        self.due.pop(stream_id, None)
