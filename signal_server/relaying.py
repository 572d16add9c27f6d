"""Relay frames in the matchmaker: forwarding QUIC packets between the two members of
an answered session (pure: no I/O, time passed in).

Mixed into :class:`~signal_server.matchmaker.Matchmaker` (rule 4 of its docstring): a
binary frame is checked (hello done, relaying enabled, a session of the sender, answered),
rate-limited per session and direction by a token bucket, counted (bytes and QUIC
packets, where the frame enters the relay), and forwarded unchanged to the other member,
or, when that member is on another instance, as a :class:`~signal_server.peerwire.PeerRelay`
with the session id rewritten to the other instance's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quictun.proto import signalling as sp

from . import peerwire as pw
from .types import Bucket, ConnRecord, Send, SessionRecord, ToPeer

if TYPE_CHECKING:
    from collections import deque

    from .types import MatchmakerConfig, Output

__all__ = ["Relaying"]

_CLOSE_POLICY = 1008


def _packet_count(frame: bytes) -> int:
    """QUIC packets in a valid relay frame (kind 0x01: one; 0x02: walk the lengths)."""
    if frame[0] == sp.RELAY_KIND:
        return 1
    count, i, n = 0, 5, len(frame)
    while i + 2 <= n:
        i += 2 + int.from_bytes(frame[i : i + 2], "big")
        count += 1
    return count


class Relaying:
    """Binary-frame methods of the matchmaker (see the module docstring)."""

    config: MatchmakerConfig
    _sessions: dict[int, SessionRecord]
    _out: deque[Output]
    relayed_bytes: int
    relayed_packets: int
    dropped_bytes: int

    if TYPE_CHECKING:
        def _fatal(self, conn: ConnRecord, code: str, message: str, close_code: int,
                   now: float) -> None: ...
        def _client_error(self, conn: ConnRecord, code: str, message: str, now: float, *,
                          session: int | None = None, count: bool = True) -> None: ...
        def _send(self, conn_id: int, msg: sp.Message) -> None: ...
        def _to_peer(self, instance: str, msg: pw.PeerMessage) -> None: ...

    # --- binary frames ----------------------------------------------------------------

    def _receive_binary(self, conn: ConnRecord, data: bytes, now: float) -> None:
        if not conn.hello:
            self._fatal(
                conn,
                sp.E_HELLO_REQUIRED,
                "first message must be 'hello', got a binary frame",
                _CLOSE_POLICY,
                now,
            )
            return
        try:
            sid, payload = sp.decode_relay(data)
        except sp.ProtocolError as exc:
            self._client_error(conn, exc.code, exc.message, now)
            return
        if not self.config.relay_enabled:
            self.dropped_bytes += len(payload)
            if not conn.relay_warned:
                conn.relay_warned = True
                self._client_error(
                    conn,
                    sp.E_RELAY_DISABLED,
                    "this relay does not forward packets",
                    now,
                    session=sid,
                    count=False,
                )
            return
        session = self._sessions.get(sid)
        if session is None or conn.id not in (session.owner, session.connector):
            self._drop_relay(conn, sid, len(payload), "no such session", now)
            return
        if not session.answered:
            self._drop_relay(conn, sid, len(payload), "session not answered yet", now)
            return
        if self.config.relay_rate is not None and not self._take_tokens(
            session, conn.id, len(payload), now
        ):
            self.dropped_bytes += len(payload)
            return
        session.relayed_bytes += len(payload)
        self.relayed_bytes += len(payload)
        self.relayed_packets += _packet_count(data)
        other = session.other(conn.id)
        if other is not None:
            self._out.append(Send(other, bytes(data)))
        elif session.peer is not None and session.peer_sid is not None:
            frame = pw.relay_frame(session.id, session.peer_sid, data)
            self._out.append(ToPeer(session.peer, frame, True))

    def _drop_relay(self, conn: ConnRecord, sid: int, size: int, why: str, now: float) -> None:
        """Drop a relay frame; reply once per run of frames for the same bad session
        (packets in flight after a close are normal, so these do not count as errors)."""
        self.dropped_bytes += size
        if conn.last_bad_relay != sid:
            conn.last_bad_relay = sid
            self._client_error(
                conn,
                sp.E_NO_SUCH_SESSION,
                f"cannot relay for session {sid}: {why}",
                now,
                session=sid,
                count=False,
            )

    def _take_tokens(self, session: SessionRecord, conn_id: int, size: int, now: float) -> bool:
        rate = float(self.config.relay_rate or 0.0)
        # a burst of at least one maximal frame, or a batched frame could never pass
        burst = self.config.relay_burst or max(rate, 65536.0)
        bucket = session.buckets.get(conn_id)
        if bucket is None:
            bucket = session.buckets[conn_id] = Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.last) * rate)
        bucket.last = now
        if bucket.tokens < size:
            return False
        bucket.tokens -= size
        return True

    # --- sealed data between the members ----------------------------------------------

    def _handle_data(self, conn: ConnRecord, msg: sp.Data, now: float) -> None:
        """Forward a sealed ``data`` message to the other member of an answered session
        (even when relaying packets is off; across instances too), at most
        ``max_data_per_session`` per sender."""
        session = self._sessions.get(msg.session)
        if session is None or conn.id not in (session.owner, session.connector) \
                or not session.answered:
            # often a late message for a session that just ended: not the sender's fault
            self._client_error(conn, sp.E_NO_SUCH_SESSION,
                               f"no answered session {msg.session} of yours", now,
                               session=msg.session, count=False)
            return
        sent = session.data_sent.get(conn.id, 0)
        if sent >= self.config.max_data_per_session:
            self._client_error(conn, sp.E_RATE_LIMITED, "too many data messages in one "
                               "session", now, session=msg.session, count=False)
            return
        session.data_sent[conn.id] = sent + 1
        other = session.other(conn.id)
        if other is not None:
            self._send(other, sp.Data(session.id, msg.data))
        elif session.peer is not None and session.peer_sid is not None:
            self._to_peer(session.peer, pw.PeerData(session.peer_sid, session.id, msg.data))
