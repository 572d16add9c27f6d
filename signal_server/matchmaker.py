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

In a cluster (``MatchmakerConfig.instance`` set; see :mod:`signal_server.federation`)
the outputs also include effects on the shared registry and on other instances
(:class:`~signal_server.types.Claim`, ``Release``, ``Lookup``, ``ToPeer``); the shell
performs them and feeds the answers back through the federation methods. Without an
instance id none of these is ever emitted and the in-memory registry is the truth.

Rules (see ``docs/protocol.md``):

1. A connection must send ``hello`` (version 1 or 2) within ``hello_timeout`` seconds
   and before anything else, or it is told why and disconnected.
   A configured relay token restricts who may *register* a name: a ``hello`` without a
   token (null or "") is welcomed, but each ``register`` on that connection gets
   ``error unauthorized``; a ``hello`` with a wrong token gets ``unauthorized`` and is
   disconnected (constant-time comparison). Connecting to a registered name needs no
   token (pasted tickets carry none); relayed packets still flow only within sessions
   that a registered, hence token-holding, owner answered (rule 4).
2. Names are owned: the registry keeps an owner id (a hash of the key that signed the
   ``register``, see :mod:`signal_server.admission`) per name. While a name is live or in
   its grace period after its holder dropped, only the same owner may claim it; the same
   owner always may, taking it over from an older live connection (which is told).
3. ``connect`` creates a session (u32 counter) and sends ``incoming`` to the holder;
   ``answer`` sends ``answer`` to the connector and ``go`` to the holder back to back;
   ``reject`` sends ``rejected`` (``reason`` and the optional ``code`` passed through
   unchanged); no reply within ``connect_timeout`` gives the connector ``error timeout``.
   ``close`` or a dropped member sends ``closed`` to the other side. A holder has at most
   ``max_pending_per_holder`` unanswered sessions; more connects get ``busy``. ``data``
   goes between the two members of an answered session (see :mod:`.relaying`).
4. Binary relay frames are forwarded unchanged between the two members of an answered
   session, subject to ``relay_enabled`` and a per-session, per-direction token bucket.
5. Client mistakes produce ``error`` replies and one log line each, never exceptions;
   ``max_errors`` counted mistakes disconnect the client.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from quictun.proto import signalling as sp

from . import peerwire as pw
from .admission import NEED_TOKEN_MESSAGE, AddressRates, Admitting, decayed_errors, ip_of
from .federation import Federation
from .registry import InMemoryRegistry, Registry
from .relaying import Relaying
from .resuming import Resuming
from .types import (
    ConnRecord,
    Disconnect,
    Lookup,
    MatchmakerConfig,
    Output,
    Release,
    Send,
    SessionRecord,
)

__all__ = ["Send", "Disconnect", "Output", "MatchmakerConfig", "Matchmaker", "CLOSE_POLICY",
           "CLOSE_PROTOCOL", "NEED_TOKEN_MESSAGE"]

logger = logging.getLogger("quictun.signal")


#: WebSocket close codes used in :class:`Disconnect`.
CLOSE_POLICY = 1008
CLOSE_PROTOCOL = 1002


_T_HELLO, _T_SESSION, _T_PURGE, _T_RESUME = "hello", "session", "purge", "resume"


def reject_label(code: str | None) -> str:
    """A bounded metrics label for a client-chosen reject code."""
    if code is None:
        return "none"
    return code if code in sp.REJECT_CODES else "other"


class Matchmaker(Admitting, Relaying, Resuming, Federation):
    """Pure signalling state machine; see the module docstring for the contract."""

    def __init__(
        self, config: MatchmakerConfig | None = None, registry: Registry | None = None, *,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self.config = config or MatchmakerConfig()
        self.registry: Registry = registry if registry is not None else InMemoryRegistry()
        self._random_bytes = random_bytes  # the welcomes' challenges
        cfg = self.config
        self._connect_rates = AddressRates(cfg.connect_rate)
        self._register_rates = AddressRates(cfg.register_rate)
        self._conns: dict[int, ConnRecord] = {}
        self._sessions: dict[int, SessionRecord] = {}
        #: (other instance, its session id) -> our session id, for cluster sessions
        self._remote: dict[tuple[str, int], int] = {}
        self._next_session = 1
        self._timers: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._out: deque[Output] = deque()
        self.relayed_bytes = 0
        self.relayed_packets = 0
        self.dropped_bytes = 0
        self.sessions_total = 0
        self.pairings_total = 0
        #: rejects by (bounded) reject code, and error replies by error code
        self.rejects: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._handlers: dict[type, Callable[[ConnRecord, Any, float], None]] = {
            sp.Register: self._handle_register,
            sp.Unregister: self._handle_unregister,
            sp.Connect: self._handle_connect,
            sp.Answer: self._handle_answer,
            sp.Reject: self._handle_reject,
            sp.Close: self._handle_close,
            sp.Data: self._handle_data,
            sp.Ping: self._handle_ping,
            sp.Resumable: self._handle_resumable,
            sp.Resume: self._handle_resume,
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
            self.errors["internal"] += 1
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
            self.errors["internal"] += 1
            self._send(conn.id, sp.Error(sp.E_SERVER_ERROR, "internal error"))

    def close(self, conn_id: int, now: float) -> None:
        """Forget a connection: end its sessions (the other side gets ``closed``) unless
        they wait for it to resume (see :mod:`signal_server.resuming`), and start the
        grace period of its names. Idempotent."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        for sid in sorted(conn.sessions):
            session = self._sessions.get(sid)
            if session is None or self._detach(session, conn_id, now):
                continue
            other = session.other(conn_id)
            if other is not None and other != conn_id:
                self._send(other, sp.Closed(sid, "peer disconnected"))
            elif other is None and session.peer is not None:
                self._peer_closed(session, "peer disconnected")
            self._end_session(session)
        if conn.names:
            expires = now + self.config.name_grace
            for name in conn.names:
                record = self.registry.get(name)
                if record is not None and record.conn_id == conn_id:
                    self.registry.release(name, expires)
                    if self.cluster:
                        self._out.append(
                            Release(conn_id, name, record.owner, self.config.name_grace))
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
            elif kind == _T_RESUME:
                self._resume_expired(key, now)

    def get_timer(self) -> float | None:
        """The earliest time :meth:`handle_timer` should be called, or None.

        May be earlier than necessary (cancelled deadlines are skipped lazily).
        """
        return self._timers[0][0] if self._timers else None

    def next_output(self) -> Output | None:
        """Pop the next pending output (:class:`Send`, :class:`Disconnect`, or a cluster
        effect), or None."""
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
            "names_live": sum(len(c.names) for c in self._conns.values()),
            "relayed_bytes": self.relayed_bytes,
            "relayed_packets": self.relayed_packets,
            "dropped_bytes": self.dropped_bytes,
            "pairings_total": self.pairings_total,
            "peer_sessions": sum(1 for s in self._sessions.values() if s.peer is not None),
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
        """Reply ``error``, log one line, and disconnect after ``max_errors`` mistakes (one
        is forgiven every ``error_decay`` seconds; ``count=False`` for what is not the
        client's fault, such as a reply to a session that just ended)."""
        logger.info("conn %d (%s): %s: %s", conn.id, conn.addr, code, message)
        self.errors[code] += 1
        self._send(conn.id, sp.Error(code, message[:1000], session))
        if count:
            errors, conn.errors_at = decayed_errors(conn.errors, conn.errors_at, now,
                                                    self.config.error_decay)
            conn.errors = errors + 1
            if conn.errors >= self.config.max_errors:
                logger.info("conn %d (%s): too many errors, disconnecting", conn.id, conn.addr)
                self._disconnect(conn, CLOSE_POLICY, "too many errors", now)

    def _fatal(self, conn: ConnRecord, code: str, message: str, close_code: int,
               now: float) -> None:
        logger.info("conn %d (%s): %s: %s", conn.id, conn.addr, code, message)
        self.errors[code] += 1
        self._send(conn.id, sp.Error(code, message))
        self._disconnect(conn, close_code, message, now)

    def _disconnect(self, conn: ConnRecord, code: int, reason: str, now: float) -> None:
        self._out.append(Disconnect(conn.id, code, reason.encode()[:120].decode("utf-8", "ignore")))
        self.close(conn.id, now)

    def _new_session(self, connector: int | None, owner: int | None, name: str, now: float,
                     *, slack: float = 0.0) -> SessionRecord:
        """Allocate a session between local members (None: on another instance)."""
        sid = self._allocate_session_id()
        deadline = now + self.config.connect_timeout + slack
        session = SessionRecord(sid, connector, owner, name, deadline)
        self._sessions[sid] = session
        for member in session.local_members():
            self._conns[member].sessions.add(sid)
        self._push_timer(deadline, _T_SESSION, sid)
        return session

    def _end_session(self, session: SessionRecord) -> None:
        self._sessions.pop(session.id, None)
        if session.peer is not None and session.peer_sid is not None:
            self._remote.pop((session.peer, session.peer_sid), None)
        for member in (session.connector, session.owner):
            conn = self._conns.get(member) if member is not None else None
            if conn is not None:
                conn.sessions.discard(session.id)

    def _expire_session(self, session: SessionRecord) -> None:
        logger.info("session %d (%s): not answered in time", session.id, session.name)
        if session.connector is not None:
            self.errors[sp.E_TIMEOUT] += 1
            self._send(
                session.connector,
                sp.Error(
                    sp.E_TIMEOUT,
                    f"{session.name!r} did not answer within {self.config.connect_timeout:g}s",
                    session.id,
                ),
            )
        if session.owner is not None and session.owner != session.connector:
            self._send(session.owner, sp.Closed(session.id, "timeout"))
        if session.peer is not None:
            self._peer_closed(session, "timeout")
        self._end_session(session)

    def _allocate_session_id(self) -> int:
        while True:
            sid = self._next_session
            self._next_session = sid + 1 if sid < sp.MAX_SESSION else 1
            if sid not in self._sessions:
                return sid

    def _holder_busy(self, owner: ConnRecord) -> bool:
        """Whether the holder already has ``max_pending_per_holder`` unanswered sessions
        (local and remote connectors alike)."""
        pending = 0
        for sid in owner.sessions:
            s = self._sessions.get(sid)
            if s is not None and s.owner == owner.id and not s.answered:
                pending += 1
        return pending >= self.config.max_pending_per_holder

    def _offer_incoming(self, session: SessionRecord, owner: ConnRecord,
                        offer: dict[str, Any]) -> None:
        """Make the local ``owner`` the holder side of ``session`` and tell it."""
        session.owner = owner.id
        owner.sessions.add(session.id)
        self._send(owner.id, sp.Incoming(session.id, session.name, offer))

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

    def _handle_connect(self, conn: ConnRecord, msg: sp.Connect, now: float) -> None:
        if not self._connect_rates.allow(ip_of(conn.addr), now):
            self._client_error(conn, sp.E_RATE_LIMITED, "too many connects from this "
                               "address; try again shortly", now, count=False)
            return
        record = self.registry.get(msg.name)
        owner = (
            None if record is None or record.conn_id is None else self._conns.get(record.conn_id)
        )
        if owner is None and not self.cluster:
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
        if owner is not None and self._holder_busy(owner):
            self._busy(conn, msg.name, now)
            return
        session = self._new_session(conn.id, None, msg.name, now)
        self.sessions_total += 1
        if owner is not None:
            self._offer_incoming(session, owner, msg.offer)
            return
        session.offer = msg.offer  # held until lookup_result() finds the holder
        self._out.append(Lookup(session.id, msg.name))

    def _owned_session(self, conn: ConnRecord, sid: int, verb: str,
                       now: float) -> SessionRecord | None:
        session = self._sessions.get(sid)
        if session is None or session.owner != conn.id:
            # mostly a late reply to a session its connector already closed (a
            # hit-and-run connector): not a mistake to count against the holder
            self._client_error(
                conn,
                sp.E_NO_SUCH_SESSION,
                f"cannot {verb} session {sid}: no such session offered to you",
                now,
                session=sid,
                count=False,
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
        self.pairings_total += 1
        if session.connector is not None:
            self._send(session.connector, sp.Answer(session.id, msg.answer))
        elif session.peer is not None and session.peer_sid is not None:
            self._to_peer(session.peer, pw.PeerAnswer(session.peer_sid, session.id, msg.answer))
        self._send(conn.id, sp.Go(session.id))

    def _handle_reject(self, conn: ConnRecord, msg: sp.Reject, now: float) -> None:
        session = self._owned_session(conn, msg.session, "reject", now)
        if session is None:
            return
        self.rejects[reject_label(msg.code)] += 1
        if session.connector is not None:
            self._send(session.connector, sp.Rejected(session.id, msg.reason, msg.code))
        elif session.peer is not None and session.peer_sid is not None:
            self._to_peer(session.peer, pw.PeerRejected(session.peer_sid, session.id,
                                                        msg.reason, msg.code))
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
                count=False,
            )
            return
        other = session.other(conn.id)
        if other is not None and other != conn.id:
            self._send(other, sp.Closed(session.id, msg.reason))
        elif other is None and session.peer is not None:
            self._peer_closed(session, msg.reason)
        self._end_session(session)

    def _handle_ping(self, conn: ConnRecord, msg: sp.Ping, now: float) -> None:
        self._send(conn.id, sp.Pong(msg.id))
