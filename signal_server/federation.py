"""The cluster half of the matchmaker: names in a shared registry, sessions whose two
members sit on different relay instances (pure: no I/O, time passed in).

Theory of operation
-------------------
Mixed into :class:`~signal_server.matchmaker.Matchmaker`, active only when
``MatchmakerConfig.instance`` is set. The shell performs the effects the matchmaker
emits and feeds the answers back, always followed by draining the outputs:

* :class:`~signal_server.types.Claim` -> :meth:`Federation.claim_result`. A ``register``
  is answered only once the shared registry gave the name (atomically; see
  ``signal_server.redis_registry``). If it cannot be reached, a name this relay
  already knows for the same owner is re-granted locally (reconciled later by the
  refresh); any other claim gets ``server-error`` (not counted as a client mistake).
* :class:`~signal_server.types.Lookup` -> :meth:`Federation.lookup_result`. A ``connect``
  to a name with no local holder creates a half-session (connector here, holder None)
  and asks where the name lives; then ``incoming`` goes to the holder's instance.
* :class:`~signal_server.types.ToPeer`: a :mod:`signal_server.peerwire` message for
  another instance; what arrives from one goes to :meth:`Federation.receive_peer`.
* :meth:`Federation.peer_down`: the shell saw an instance die (its link closed, or its
  heartbeat expired): every session with it ends as if its members had disconnected.
* :meth:`Federation.held_names` / :meth:`Federation.names_lost`: the shell refreshes the
  leases of the names held here and reports those the shared registry gives to someone
  else now (``moved``: the same owner re-registered elsewhere, dropped silently, as a
  local takeover is; ``taken``: another owner got it during an outage, the holder is
  disconnected so that its ``serve`` learns it).

A cross-instance session has one record on each side with the same name, each with its
own local id; ``peer``/``peer_sid`` name the other half. The holder's side checks the
holder's pending limit (so a connect flood spread over instances meets one bound), the
connector's side runs the connect timeout; relayed frames are counted and rate-limited
where they enter the cluster and forwarded once.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from quictun.proto import signalling as sp

from . import peerwire as pw
from .types import (
    UNAVAILABLE,
    Claim,
    ClaimResult,
    ConnRecord,
    HeldName,
    Holder,
    Lookup,
    LostName,
    Output,
    Release,
    Send,
    SessionRecord,
    ToPeer,
)

if TYPE_CHECKING:
    from .registry import Registry
    from .types import MatchmakerConfig

logger = logging.getLogger("quictun.signal")

#: What a client is told when the shared registry cannot be reached.
REGISTRY_DOWN_MESSAGE = ("this relay cannot reach its shared registry (Redis) right now; "
                         "try again shortly")

_CLOSE_POLICY = 1008


class Federation:
    """Cluster methods of the matchmaker (see the module docstring)."""

    # provided by Matchmaker
    config: MatchmakerConfig
    registry: Registry
    _conns: dict[int, ConnRecord]
    _sessions: dict[int, SessionRecord]
    _remote: dict[tuple[str, int], int]
    _out: deque[Output]
    errors: Counter[str]
    dropped_bytes: int

    if TYPE_CHECKING:
        def _send(self, conn_id: int, msg: sp.Message) -> None: ...
        def _client_error(self, conn: ConnRecord, code: str, message: str, now: float, *,
                          session: int | None = None, count: bool = True) -> None: ...
        def _grant(self, conn: ConnRecord, name: str, owner: bytes) -> None: ...
        def _tell_taken_over(self, old: ConnRecord, name: str) -> None: ...
        def _end_session(self, session: SessionRecord) -> None: ...
        def _new_session(self, connector: int | None, owner: int | None, name: str,
                         now: float, *, slack: float = 0.0) -> SessionRecord: ...
        def _holder_busy(self, owner: ConnRecord) -> bool: ...
        def _offer_incoming(self, session: SessionRecord, owner: ConnRecord,
                            offer: dict[str, Any]) -> None: ...
        def _disconnect(self, conn: ConnRecord, code: int, reason: str, now: float) -> None: ...

    @property
    def cluster(self) -> bool:
        """True when this matchmaker is one instance of a cluster."""
        return self.config.instance is not None

    # --- answers from the shared registry ---------------------------------------------

    def claim_result(self, claim: Claim, result: ClaimResult, now: float) -> None:
        """Finish a ``register`` (see the module docstring). Never raises."""
        conn = self._conns.get(claim.conn_id)
        if conn is None or claim.name not in conn.claiming:
            if result.status == "ok":  # the holder left meanwhile: start the grace period
                self._out.append(Release(claim.conn_id, claim.name, claim.owner,
                                         self.config.name_grace))
            return
        conn.claiming.discard(claim.name)
        if result.status == "taken":
            self._client_error(conn, sp.E_NAME_TAKEN,
                               f"name {claim.name!r} is registered by another owner", now,
                               count=False)
            return
        if result.status == UNAVAILABLE:
            record = self.registry.get(claim.name)
            if record is not None and hmac.compare_digest(record.owner, claim.owner):
                logger.info("name %r re-granted locally to conn %d while the shared registry "
                            "is unreachable", claim.name, conn.id)
                self._grant(conn, claim.name, claim.owner)
                return
            self._client_error(conn, sp.E_SERVER_ERROR, REGISTRY_DOWN_MESSAGE, now, count=False)
            return
        prev = result.previous
        if prev is not None and prev.instance != self.config.instance:
            logger.info("name %r moved to conn %d from instance %s", claim.name, conn.id,
                        prev.instance)
            self._to_peer(prev.instance, pw.PeerMoved(claim.name, prev.conn_id))
        elif prev is not None and prev.conn_id != conn.id:
            old = self._conns.get(prev.conn_id)
            if old is not None:
                old.names.discard(claim.name)
        self._grant(conn, claim.name, claim.owner)

    def lookup_result(self, lookup: Lookup, result: Holder | None | str, now: float) -> None:
        """Continue a ``connect`` whose name has no local holder: ``result`` is the
        holder, None (nobody holds it live) or ``UNAVAILABLE``. Never raises."""
        session = self._sessions.get(lookup.session_id)
        if session is None or session.offer is None or session.connector is None:
            return  # the connector left, or the session timed out
        conn = self._conns[session.connector]
        offer, session.offer = session.offer, None
        if result == UNAVAILABLE or not isinstance(result, Holder):
            if result == UNAVAILABLE:
                self._client_error(conn, sp.E_SERVER_ERROR, REGISTRY_DOWN_MESSAGE, now,
                                   count=False)
            else:
                self._no_such_name(conn, lookup.name, now)
            self._end_session(session)
            return
        if result.instance == self.config.instance:  # registered here after all
            owner = self._conns.get(result.conn_id)
            if owner is None or lookup.name not in owner.names:
                self._no_such_name(conn, lookup.name, now)
                self._end_session(session)
            elif self._holder_busy(owner):
                self._busy(conn, lookup.name, now)
                self._end_session(session)
            else:
                self._offer_incoming(session, owner, offer)
            return
        session.peer = result.instance
        self._to_peer(result.instance,
                      pw.PeerIncoming(session.id, result.conn_id, lookup.name, offer))

    def held_names(self) -> list[HeldName]:
        """Every name held live by a connection of this instance (to refresh)."""
        out = []
        for conn in self._conns.values():
            for name in conn.names:
                record = self.registry.get(name)
                if record is not None and record.conn_id == conn.id:
                    out.append(HeldName(name, record.owner, conn.id))
        return out

    def names_lost(self, lost: list[LostName], now: float) -> None:
        """Drop names the shared registry gives to someone else now (see the module
        docstring). Never raises."""
        for item in lost:
            conn = self._conns.get(item.conn_id)
            if conn is None or item.name not in conn.names:
                continue
            self._forget_name(conn, item.name)
            if item.reason == "taken":
                logger.warning("name %r was claimed by another owner while this relay could "
                               "not reach Redis; disconnecting its holder conn %d",
                               item.name, conn.id)
                self._disconnect(conn, _CLOSE_POLICY,
                                 f"name {item.name!r} was claimed by another owner", now)
            else:
                logger.info("name %r moved away from conn %d", item.name, conn.id)
                self._tell_taken_over(conn, item.name)

    def peer_instances(self) -> set[str]:
        """Instances this one shares live sessions with (the shell watches them)."""
        return {s.peer for s in self._sessions.values() if s.peer is not None}

    def peer_down(self, instance: str, now: float) -> None:
        """Instance ``instance`` is gone: end every session with it, as if its members
        had disconnected (pending connectors get ``no-such-name``). Never raises."""
        gone = [s for s in self._sessions.values() if s.peer == instance]
        if gone:
            logger.info("instance %s is gone: ending %d sessions with it", instance, len(gone))
        for session in gone:
            if session.connector is not None and not session.answered:
                conn = self._conns.get(session.connector)
                if conn is not None:
                    self._client_error(conn, sp.E_NO_SUCH_NAME,
                                       f"the relay instance that held {session.name!r} went "
                                       "away; try again in a moment", now, count=False)
            else:
                for member in session.local_members():
                    self._send(member, sp.Closed(session.id, "peer disconnected"))
            self._end_session(session)

    # --- messages from other instances ------------------------------------------------

    def receive_peer(self, instance: str, data: bytes, now: float) -> None:
        """Process one :mod:`signal_server.peerwire` message from ``instance``. Never
        raises (a malformed message is counted and logged)."""
        try:
            msg = pw.decode(data)
        except pw.PeerProtocolError as exc:
            self.errors["peer-protocol"] += 1
            logger.warning("malformed message from instance %s: %s", instance, exc)
            return
        try:
            if isinstance(msg, pw.PeerRelay):
                self._peer_relay(instance, msg)
            elif isinstance(msg, pw.PeerIncoming):
                self._peer_incoming(instance, msg, now)
            elif isinstance(msg, pw.PeerMoved):
                conn = self._conns.get(msg.conn)
                if conn is not None and msg.name in conn.names:
                    logger.info("name %r moved from conn %d to instance %s", msg.name,
                                conn.id, instance)
                    self._forget_name(conn, msg.name)
                    self._tell_taken_over(conn, msg.name)
            else:
                self._peer_reply(instance, msg)
        except Exception:
            self.errors["internal"] += 1
            logger.exception("internal error handling a message from instance %s", instance)

    def _peer_relay(self, instance: str, msg: pw.PeerRelay) -> None:
        session = self._sessions.get(msg.to_sid)
        if (session is None or session.peer != instance or session.peer_sid != msg.from_sid
                or not session.answered):
            self.dropped_bytes += max(0, len(msg.frame) - 5)
            return
        member = session.connector if session.connector is not None else session.owner
        if member is not None:
            self._out.append(Send(member, msg.frame))

    def _peer_incoming(self, instance: str, msg: pw.PeerIncoming, now: float) -> None:
        holder = self._conns.get(msg.conn)
        if holder is None or msg.name not in holder.names:
            self._to_peer(instance, pw.PeerError(msg.from_sid, sp.E_NO_SUCH_NAME,
                                                 f"no peer is registered as {msg.name!r}"))
            return
        if (instance, msg.from_sid) in self._remote:
            return  # a duplicate
        if self._holder_busy(holder):
            self._to_peer(instance, pw.PeerError(
                msg.from_sid, sp.E_BUSY,
                f"{msg.name!r} has too many pending connections; try again shortly"))
            return
        # a second of slack: the connector's side times the session out first
        session = self._new_session(None, holder.id, msg.name, now, slack=1.0)
        session.peer, session.peer_sid = instance, msg.from_sid
        self._remote[(instance, msg.from_sid)] = session.id
        self._send(holder.id, sp.Incoming(session.id, msg.name, msg.offer))

    def _peer_reply(self, instance: str, msg: pw.PeerMessage) -> None:
        """answer / data / rejected / closed / error about one of our sessions."""
        to_sid = getattr(msg, "to_sid", None)
        if to_sid is None and isinstance(msg, pw.PeerClosed):
            to_sid = self._remote.get((instance, msg.from_sid))
        session = self._sessions.get(to_sid) if to_sid is not None else None
        if session is None or session.peer != instance:
            return  # already over here (timeouts cross in flight)
        from_sid = getattr(msg, "from_sid", None)
        if session.peer_sid is not None and from_sid is not None and from_sid != session.peer_sid:
            return
        if isinstance(msg, pw.PeerClosed):
            for member in session.local_members():
                self._send(member, sp.Closed(session.id, msg.reason))
            self._end_session(session)
            return
        if isinstance(msg, pw.PeerData):
            if session.answered:
                for member in session.local_members():
                    self._send(member, sp.Data(session.id, msg.data))
            return
        connector = self._conns.get(session.connector) if session.connector is not None else None
        if connector is None or session.answered:
            return
        if isinstance(msg, pw.PeerAnswer):
            session.peer_sid = msg.from_sid
            self._remote[(instance, msg.from_sid)] = session.id
            session.answered = True
            self._send(connector.id, sp.Answer(session.id, msg.answer))
        elif isinstance(msg, pw.PeerRejected):
            self._send(connector.id, sp.Rejected(session.id, msg.reason, msg.code))
            self._end_session(session)
        elif isinstance(msg, pw.PeerError):
            self.errors[msg.code] += 1
            self._send(connector.id, sp.Error(msg.code, msg.message))
            self._end_session(session)

    # --- helpers ----------------------------------------------------------------------

    def _to_peer(self, instance: str, msg: pw.PeerMessage) -> None:
        self._out.append(ToPeer(instance, pw.encode(msg), False))

    def _peer_closed(self, session: SessionRecord, reason: str) -> None:
        """Tell the other instance of ``session`` that our member left."""
        if session.peer is not None:
            self._to_peer(session.peer, pw.PeerClosed(session.peer_sid, session.id, reason))

    def _forget_name(self, conn: ConnRecord, name: str) -> None:
        conn.names.discard(name)
        record = self.registry.get(name)
        if record is not None and record.conn_id == conn.id:
            self.registry.release(name, None)

    def _no_such_name(self, conn: ConnRecord, name: str, now: float) -> None:
        self._client_error(conn, sp.E_NO_SUCH_NAME, f"no peer is registered as {name!r}",
                           now, count=False)

    def _busy(self, conn: ConnRecord, name: str, now: float) -> None:
        self._client_error(conn, sp.E_BUSY,
                           f"{name!r} has too many pending connections; try again shortly",
                           now, count=False)
