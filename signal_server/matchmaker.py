"""The relay's matchmaking logic as a pure state machine (no I/O, no clock, no randomness).

Theory of operation
-------------------
The shape follows aioquic's ``QuicConnection``: the I/O shell calls

* :meth:`Matchmaker.open` when a WebSocket connection is accepted,
* :meth:`Matchmaker.receive_text` / :meth:`Matchmaker.receive_binary` per frame,
* :meth:`Matchmaker.close` when the socket is gone (idempotent),
* :meth:`Matchmaker.handle_timer` once the time returned by :meth:`Matchmaker.get_timer`
  has passed,

always passing the current time ``now`` (seconds, any monotonic origin). After *every*
call the shell must drain :meth:`Matchmaker.next_output` (or :meth:`outputs`) and
perform each item: :class:`Send` writes one frame, :class:`Disconnect` closes the
socket with the given close code. After a :class:`Disconnect` the matchmaker has
already forgotten the connection; later input for it is ignored.

Rules (see ``docs/protocol.md``):

1. A connection must send ``hello`` (version 1) within ``hello_timeout`` seconds and
   before anything else, or it is told why and disconnected.
   A configured relay token restricts who may *register* a name: a ``hello`` without a
   token (null or "") is welcomed, but each ``register`` on that connection gets
   ``error unauthorized``; a ``hello`` with a wrong token gets ``unauthorized`` and is
   disconnected (constant-time comparison). Connecting to a registered name needs no
   token (pasted tickets carry none); relayed packets still flow only within sessions
   that a registered, hence token-holding, owner answered (rule 4).
2. Names are owned: the registry keeps sha256(owner) per name. While a name is live or
   in its grace period after its holder dropped, only the same owner may claim it; the
   same owner always may, taking it over from a stale live connection.
3. ``connect`` creates a session (u32 counter) and sends ``incoming`` to the holder;
   ``answer`` sends ``answer`` to the connector and ``go`` to the holder back to back;
   ``reject`` sends ``rejected`` (``reason`` and the optional ``code`` passed through
   unchanged); no reply within ``connect_timeout`` gives the connector ``error timeout``.
   ``close`` or a dropped member sends ``closed`` to the other side.
4. Binary relay frames are forwarded unchanged between the two members of an answered
   session, subject to ``relay_enabled`` and a per-session, per-direction token bucket.
5. Client mistakes produce ``error`` replies and one log line each, never exceptions;
   ``max_errors`` counted mistakes disconnect the client.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from quictun.proto import signalling as sp

from .mmtypes import (
    Bucket,
    ConnRecord,
    Disconnect,
    MatchmakerConfig,
    Output,
    Send,
    SessionRecord,
)
from .registry import InMemoryRegistry, Registry

__all__ = [
    "Send",
    "Disconnect",
    "Output",
    "MatchmakerConfig",
    "Matchmaker",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL",
    "NEED_TOKEN_MESSAGE",
]

logger = logging.getLogger("quictun.signal")

#: The ``error unauthorized`` message for a ``register`` without the relay token.
NEED_TOKEN_MESSAGE = (
    "this relay requires a token to register a name "
    "(set QUICTUN_SIGNAL_TOKEN or pass --token)"
)

#: WebSocket close codes used in :class:`Disconnect`.
CLOSE_POLICY = 1008
CLOSE_PROTOCOL = 1002


_T_HELLO, _T_SESSION, _T_PURGE = "hello", "session", "purge"


class Matchmaker:
    """Pure signalling state machine; see the module docstring for the contract."""

    def __init__(
        self, config: MatchmakerConfig | None = None, registry: Registry | None = None
    ) -> None:
        self.config = config or MatchmakerConfig()
        self.registry: Registry = registry if registry is not None else InMemoryRegistry()
        self._conns: dict[int, ConnRecord] = {}
        self._sessions: dict[int, SessionRecord] = {}
        self._next_session = 1
        self._timers: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._out: deque[Output] = deque()
        self.relayed_bytes = 0
        self.dropped_bytes = 0
        self.sessions_total = 0
        self._handlers: dict[type, Callable[[ConnRecord, Any, float], None]] = {
            sp.Register: self._handle_register,
            sp.Unregister: self._handle_unregister,
            sp.Connect: self._handle_connect,
            sp.Answer: self._handle_answer,
            sp.Reject: self._handle_reject,
            sp.Close: self._handle_close,
            sp.Data: self._handle_data,
            sp.Ping: self._handle_ping,
        }

    # --- public API -------------------------------------------------------------------

    def open(self, conn_id: int, peer_addr: str, now: float) -> None:
        """Register a new connection; ``peer_addr`` ("ip:port") is echoed in ``welcome``.

        Raises:
            ValueError: ``conn_id`` is already open (a bug in the caller).
        """
        if conn_id in self._conns:
            raise ValueError(f"connection {conn_id} already open")
        self._conns[conn_id] = ConnRecord(conn_id, peer_addr)
        self._push_timer(now + self.config.hello_timeout, _T_HELLO, conn_id)

    def receive_text(self, conn_id: int, text: str | bytes, now: float) -> None:
        """Process one text frame from ``conn_id``. Never raises for client input."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        try:
            self._receive_text(conn, text, now)
        except Exception:  # a bug here must not take the relay down
            logger.exception("conn %d: internal error handling a text frame", conn_id)
            self._send(conn.id, sp.Error(sp.E_SERVER_ERROR, "internal error"))

    def receive_binary(self, conn_id: int, data: bytes, now: float) -> None:
        """Process one binary (relay) frame from ``conn_id``. Never raises."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        try:
            self._receive_binary(conn, data, now)
        except Exception:
            logger.exception("conn %d: internal error handling a binary frame", conn_id)
            self._send(conn.id, sp.Error(sp.E_SERVER_ERROR, "internal error"))

    def close(self, conn_id: int, now: float) -> None:
        """Forget a connection: end its sessions (the other side gets ``closed``) and
        start the grace period of its names. Idempotent."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        for sid in sorted(conn.sessions):
            session = self._sessions.get(sid)
            if session is None:
                continue
            other = session.other(conn_id)
            if other != conn_id:
                self._send(other, sp.Closed(sid, "peer disconnected"))
            self._end_session(session)
        if conn.names:
            expires = now + self.config.name_grace
            for name in conn.names:
                record = self.registry.get(name)
                if record is not None and record.conn_id == conn_id:
                    self.registry.release(name, expires)
            self._push_timer(expires, _T_PURGE, None)

    def handle_timer(self, now: float) -> None:
        """Run every deadline that is due at ``now`` (hello, connect, name grace)."""
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, key = heapq.heappop(self._timers)
            if kind == _T_HELLO:
                conn = self._conns.get(key)
                if conn is not None and not conn.hello:
                    self._fatal(
                        conn,
                        sp.E_TIMEOUT,
                        f"no hello within {self.config.hello_timeout:g}s",
                        CLOSE_POLICY,
                        now,
                    )
            elif kind == _T_SESSION:
                session = self._sessions.get(key)
                if session is not None and not session.answered and session.deadline <= now:
                    self._expire_session(session)
            elif kind == _T_PURGE:
                self.registry.purge(now)

    def get_timer(self) -> float | None:
        """The earliest time :meth:`handle_timer` should be called, or None.

        May be earlier than necessary (cancelled deadlines are skipped lazily).
        """
        return self._timers[0][0] if self._timers else None

    def next_output(self) -> Output | None:
        """Pop the next pending :class:`Send`/:class:`Disconnect`, or None."""
        return self._out.popleft() if self._out else None

    def outputs(self) -> list[Output]:
        """Pop and return every pending output, in order."""
        items = list(self._out)
        self._out.clear()
        return items

    @property
    def stats(self) -> dict[str, int]:
        """Counters: live connections/sessions/names and relayed/dropped bytes."""
        return {
            "connections": len(self._conns),
            "sessions": len(self._sessions),
            "sessions_total": self.sessions_total,
            "names": len(self.registry.list_names()),
            "relayed_bytes": self.relayed_bytes,
            "dropped_bytes": self.dropped_bytes,
        }

    def session_relayed_bytes(self, session_id: int) -> int | None:
        """Bytes relayed so far in a live session, or None if it does not exist."""
        session = self._sessions.get(session_id)
        return None if session is None else session.relayed_bytes

    # --- plumbing ---------------------------------------------------------------------

    def _send(self, conn_id: int, msg: sp.Message) -> None:
        if conn_id in self._conns:
            self._out.append(Send(conn_id, sp.encode(msg)))

    def _push_timer(self, when: float, kind: str, key: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, key))

    def _client_error(
        self,
        conn: ConnRecord,
        code: str,
        message: str,
        now: float,
        *,
        session: int | None = None,
        count: bool = True,
    ) -> None:
        """Reply ``error``, log one line, and disconnect after ``max_errors`` mistakes."""
        logger.info("conn %d (%s): %s: %s", conn.id, conn.addr, code, message)
        self._send(conn.id, sp.Error(code, message[:1000], session))
        if count:
            conn.errors += 1
            if conn.errors >= self.config.max_errors:
                logger.info("conn %d (%s): too many errors, disconnecting", conn.id, conn.addr)
                self._disconnect(conn, CLOSE_POLICY, "too many errors", now)

    def _fatal(self, conn: ConnRecord, code: str, message: str, close_code: int,
               now: float) -> None:
        logger.info("conn %d (%s): %s: %s", conn.id, conn.addr, code, message)
        self._send(conn.id, sp.Error(code, message))
        self._disconnect(conn, close_code, message, now)

    def _disconnect(self, conn: ConnRecord, code: int, reason: str, now: float) -> None:
        self._out.append(Disconnect(conn.id, code, reason.encode()[:120].decode("utf-8", "ignore")))
        self.close(conn.id, now)

    def _end_session(self, session: SessionRecord) -> None:
        self._sessions.pop(session.id, None)
        for member in (session.connector, session.owner):
            conn = self._conns.get(member)
            if conn is not None:
                conn.sessions.discard(session.id)

    def _expire_session(self, session: SessionRecord) -> None:
        logger.info("session %d (%s): not answered in time", session.id, session.name)
        self._send(
            session.connector,
            sp.Error(
                sp.E_TIMEOUT,
                f"{session.name!r} did not answer within {self.config.connect_timeout:g}s",
                session.id,
            ),
        )
        if session.owner != session.connector:
            self._send(session.owner, sp.Closed(session.id, "timeout"))
        self._end_session(session)

    def _allocate_session_id(self) -> int:
        while True:
            sid = self._next_session
            self._next_session = sid + 1 if sid < sp.MAX_SESSION else 1
            if sid not in self._sessions:
                return sid

    # --- text frames ------------------------------------------------------------------

    def _receive_text(self, conn: ConnRecord, text: str | bytes, now: float) -> None:
        try:
            msg = sp.decode(text)
        except sp.ProtocolError as exc:
            if not conn.hello:
                self._fatal(conn, sp.E_HELLO_REQUIRED, exc.message, CLOSE_PROTOCOL, now)
            else:
                self._client_error(conn, exc.code, exc.message, now)
            return
        if not conn.hello:
            if isinstance(msg, sp.Hello):
                self._handle_hello(conn, msg, now)
            else:
                self._fatal(
                    conn,
                    sp.E_HELLO_REQUIRED,
                    f"first message must be 'hello', got {msg.T!r}",
                    CLOSE_POLICY,
                    now,
                )
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._client_error(
                conn, sp.E_BAD_MESSAGE, f"unexpected message {msg.T!r} from a client", now
            )
            return
        handler(conn, msg, now)

    def _handle_hello(self, conn: ConnRecord, msg: sp.Hello, now: float) -> None:
        if msg.v not in sp.SUPPORTED_VERSIONS:
            newest = max(sp.SUPPORTED_VERSIONS)
            self._fatal(
                conn,
                sp.E_UNSUPPORTED_VERSION,
                f"relay speaks protocol version {newest}, client sent {msg.v}"
                + ("; upgrade quictun-signal" if msg.v > newest else "; upgrade quictun"),
                CLOSE_PROTOCOL,
                now,
            )
            return
        token = self.config.token
        if token is None:
            conn.may_register = True
        elif msg.token:  # a token was given: it must be right (constant-time compare)
            if not hmac.compare_digest(msg.token.encode("utf-8"), token.encode("utf-8")):
                self._fatal(
                    conn,
                    sp.E_UNAUTHORIZED,
                    "wrong relay token (check QUICTUN_SIGNAL_TOKEN / --token)",
                    CLOSE_POLICY,
                    now,
                )
                return
            conn.may_register = True
        # else: no token given; welcome it, but it may only connect, not register
        conn.hello = True
        self._send(
            conn.id,
            sp.Welcome(
                v=msg.v,  # the client's version: a version-1 client sees what it expects
                stun=list(self.config.stun_ports),
                relay=self.config.relay_enabled,
                addr=conn.addr,
            ),
        )

    def _handle_register(self, conn: ConnRecord, msg: sp.Register, now: float) -> None:
        if not conn.may_register:
            self._client_error(conn, sp.E_UNAUTHORIZED, NEED_TOKEN_MESSAGE, now)
            return
        owner_hash = hashlib.sha256(msg.owner.lower().encode("ascii")).digest()
        record = self.registry.get(msg.name)
        if record is not None and not hmac.compare_digest(record.owner_hash, owner_hash):
            held = record.conn_id is not None or (
                record.expires is not None and record.expires > now
            )
            if held:
                self._client_error(
                    conn,
                    sp.E_NAME_TAKEN,
                    f"name {msg.name!r} is registered by another owner",
                    now,
                    count=False,
                )
                return
        if msg.name not in conn.names and len(conn.names) >= self.config.max_names_per_conn:
            self._client_error(
                conn,
                sp.E_RATE_LIMITED,
                f"at most {self.config.max_names_per_conn} names per connection",
                now,
            )
            return
        if record is not None and record.conn_id is not None and record.conn_id != conn.id:
            old = self._conns.get(record.conn_id)
            if old is not None:
                old.names.discard(msg.name)
                logger.info("name %r taken over by conn %d from conn %d", msg.name, conn.id, old.id)
        self.registry.claim(msg.name, owner_hash, conn.id)
        conn.names.add(msg.name)
        self._send(conn.id, sp.Registered(msg.name))

    def _handle_unregister(self, conn: ConnRecord, msg: sp.Unregister, now: float) -> None:
        if msg.name not in conn.names:
            self._client_error(
                conn, sp.E_NOT_REGISTERED, f"name {msg.name!r} is not registered here", now
            )
            return
        conn.names.discard(msg.name)
        record = self.registry.get(msg.name)
        if record is not None and record.conn_id == conn.id:
            self.registry.release(msg.name, None)

    def _handle_connect(self, conn: ConnRecord, msg: sp.Connect, now: float) -> None:
        record = self.registry.get(msg.name)
        owner = (
            None if record is None or record.conn_id is None else self._conns.get(record.conn_id)
        )
        if owner is None:
            self._client_error(
                conn,
                sp.E_NO_SUCH_NAME,
                f"no peer is registered as {msg.name!r}",
                now,
                count=False,
            )
            return
        mine = [self._sessions[s] for s in conn.sessions if s in self._sessions]
        pending = sum(1 for s in mine if s.connector == conn.id and not s.answered)
        if (
            pending >= self.config.max_pending_per_conn
            or len(mine) >= self.config.max_sessions_per_conn
        ):
            self._client_error(conn, sp.E_RATE_LIMITED, "too many sessions", now)
            return
        sid = self._allocate_session_id()
        deadline = now + self.config.connect_timeout
        session = SessionRecord(sid, conn.id, owner.id, msg.name, deadline)
        self._sessions[sid] = session
        self.sessions_total += 1
        conn.sessions.add(sid)
        owner.sessions.add(sid)
        self._push_timer(deadline, _T_SESSION, sid)
        self._send(owner.id, sp.Incoming(sid, msg.name, msg.offer))

    def _owned_session(self, conn: ConnRecord, sid: int, verb: str,
                       now: float) -> SessionRecord | None:
        session = self._sessions.get(sid)
        if session is None or session.owner != conn.id:
            self._client_error(
                conn,
                sp.E_NO_SUCH_SESSION,
                f"cannot {verb} session {sid}: no such session offered to you",
                now,
                session=sid,
            )
            return None
        if session.answered:
            self._client_error(
                conn, sp.E_BAD_MESSAGE, f"session {sid} was already answered", now, session=sid
            )
            return None
        return session

    def _handle_answer(self, conn: ConnRecord, msg: sp.Answer, now: float) -> None:
        session = self._owned_session(conn, msg.session, "answer", now)
        if session is None:
            return
        session.answered = True
        self._send(session.connector, sp.Answer(session.id, msg.answer))
        self._send(session.owner, sp.Go(session.id))

    def _handle_reject(self, conn: ConnRecord, msg: sp.Reject, now: float) -> None:
        session = self._owned_session(conn, msg.session, "reject", now)
        if session is None:
            return
        self._send(session.connector, sp.Rejected(session.id, msg.reason, msg.code))
        self._end_session(session)

    def _handle_close(self, conn: ConnRecord, msg: sp.Close, now: float) -> None:
        session = self._sessions.get(msg.session)
        if session is None or conn.id not in (session.owner, session.connector):
            self._client_error(
                conn,
                sp.E_NO_SUCH_SESSION,
                f"cannot close session {msg.session}: you are not part of it",
                now,
                session=msg.session,
            )
            return
        other = session.other(conn.id)
        if other != conn.id:
            self._send(other, sp.Closed(session.id, msg.reason))
        self._end_session(session)

    def _handle_data(self, conn: ConnRecord, msg: sp.Data, now: float) -> None:
        """Forward a sealed message to the other member of an answered session (even
        when relaying packets is off); at most ``max_data_per_session`` per sender."""
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
        self._send(session.other(conn.id), sp.Data(session.id, msg.data))

    def _handle_ping(self, conn: ConnRecord, msg: sp.Ping, now: float) -> None:
        self._send(conn.id, sp.Pong(msg.id))

    # --- binary frames ----------------------------------------------------------------

    def _receive_binary(self, conn: ConnRecord, data: bytes, now: float) -> None:
        if not conn.hello:
            self._fatal(
                conn,
                sp.E_HELLO_REQUIRED,
                "first message must be 'hello', got a binary frame",
                CLOSE_POLICY,
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
        self._out.append(Send(session.other(conn.id), bytes(data)))

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
