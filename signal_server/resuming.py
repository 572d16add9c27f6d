"""Sessions that outlive a member's relay connection (pure: no I/O, time passed in).

Mixed into :class:`~signal_server.matchmaker.Matchmaker`. A NAT that forgets its mappings
breaks a peer's WebSocket while the peer and its tunnel are fine; the peer reconnects
and moves its half of each session to the new connection (see
:mod:`quictun.proto.resume` for why only that peer can):

* ``resumable {session, key}`` from a member of an answered session stores that
  member's resume key (one per role: connector, holder);
* when that member's connection is gone, the session is *detached* instead of ended:
  it waits ``resume_window`` seconds (the other member is not told; packets for the
  missing member are dropped), then ends as before (``closed``, "peer disconnected");
* ``resume {session, sig}`` on any connection whose signature, over that connection's
  challenge, verifies with a stored key moves that role there (also while the old
  connection still looks alive: after a NAT reset the relay may not have noticed yet)
  and replies ``resumed``; anything else gets ``error no-such-session``, counted as a
  mistake (guessing is not free);
* a holder that registers its name again from a new connection without resuming a
  session has restarted: its old sessions under that name end at once, so their
  connectors hear ``closed`` instead of waiting for a timeout.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from quictun.proto import signalling as sp
from quictun.proto.resume import verify_resume

from .types import ConnRecord, SessionRecord

if TYPE_CHECKING:
    from .types import MatchmakerConfig

__all__ = ["Resuming", "CONNECTOR", "HOLDER"]

logger = logging.getLogger("quictun.signal")

CONNECTOR, HOLDER = "connector", "holder"


def role_of(session: SessionRecord, conn_id: int) -> str | None:
    """The role ``conn_id`` plays in ``session``; None for a non-member or a connection
    that is both (it connected to its own name: nothing to tell apart)."""
    if session.connector == session.owner:
        return None
    if conn_id == session.connector:
        return CONNECTOR
    if conn_id == session.owner:
        return HOLDER
    return None


class Resuming:
    """``resumable`` and ``resume`` in the matchmaker (see the module docstring)."""

    config: MatchmakerConfig
    _conns: dict[int, ConnRecord]
    _sessions: dict[int, SessionRecord]

    if TYPE_CHECKING:
        def _send(self, conn_id: int, msg: sp.Message) -> None: ...
        def _client_error(self, conn: ConnRecord, code: str, message: str, now: float, *,
                          session: int | None = None, count: bool = True) -> None: ...
        def _end_session(self, session: SessionRecord) -> None: ...
        def _peer_closed(self, session: SessionRecord, reason: str) -> None: ...
        def _push_timer(self, when: float, kind: str, key: object) -> None: ...

    def _handle_resumable(self, conn: ConnRecord, msg: sp.Resumable, now: float) -> None:
        session = self._sessions.get(msg.session)
        role = role_of(session, conn.id) if session is not None else None
        if session is None or role is None or not session.answered:
            self._client_error(conn, sp.E_NO_SUCH_SESSION, f"no answered session "
                               f"{msg.session} of yours to make resumable", now,
                               session=msg.session, count=False)
            return
        session.resume_keys[role] = bytes.fromhex(msg.key)

    def _handle_resume(self, conn: ConnRecord, msg: sp.Resume, now: float) -> None:
        session = self._sessions.get(msg.session)
        role = None
        if session is not None and self.config.resume_window > 0:
            sig = bytes.fromhex(msg.sig)
            role = next((r for r, key in session.resume_keys.items()
                         if verify_resume(key, sig, conn.challenge, session.id)), None)
        if session is None or role is None:
            self._client_error(conn, sp.E_NO_SUCH_SESSION, f"cannot resume session "
                               f"{msg.session}: no such session, or not yours", now,
                               session=msg.session)
            return
        old = session.connector if role == CONNECTOR else session.owner
        if old != conn.id:
            previous = self._conns.get(old) if old is not None else None
            if previous is not None:
                previous.sessions.discard(session.id)
            if role == CONNECTOR:
                session.connector = conn.id
            else:
                session.owner = conn.id
            conn.sessions.add(session.id)
            logger.info("session %d (%s): %s resumed on conn %d (was conn %s)", session.id,
                        session.name, role, conn.id, old)
        session.away.pop(role, None)
        self._send(conn.id, sp.Resumed(session.id))

    def _detach(self, session: SessionRecord, conn_id: int, now: float) -> bool:
        """``conn_id`` is gone: keep ``session`` waiting for it to resume (True) if it
        gave a resume key and the other member is still there; else False (end it)."""
        role = role_of(session, conn_id)
        window = self.config.resume_window
        if role is None or role not in session.resume_keys or window <= 0:
            return False
        other = session.owner if role == CONNECTOR else session.connector
        if session.away.keys() - {role} or (other is None and session.peer is None):
            return False  # the other member is gone too: nobody to resume with
        if other is not None and other not in self._conns:
            return False
        session.away[role] = now + window
        self._push_timer(now + window, "resume", session.id)
        logger.info("session %d (%s): %s's connection dropped; waiting %gs for it to "
                    "resume", session.id, session.name, role, window)
        return True

    def _resume_expired(self, sid: int, now: float) -> None:
        """A detached member did not come back in time: end the session as before."""
        session = self._sessions.get(sid)
        if session is None or not session.away or min(session.away.values()) > now:
            return
        self._end_detached(session, "peer disconnected")

    def _end_detached(self, session: SessionRecord, reason: str) -> None:
        for member in session.local_members():
            if member in self._conns:
                self._send(member, sp.Closed(session.id, reason))
        if session.peer is not None:
            self._peer_closed(session, reason)
        self._end_session(session)

    def _end_stale_holder_sessions(self, name: str, holder: int) -> None:
        """``holder`` (a new connection) now holds ``name``: end the answered sessions
        an earlier holder of the name still has (detached or not), so their connectors
        hear ``closed`` at once. A holder that moved a session here resumed it first."""
        stale = [s for s in self._sessions.values()
                 if s.name == name and s.answered and s.owner is not None
                 and s.owner != holder and s.connector != s.owner]
        for session in stale:
            logger.info("session %d (%s): its holder registered again from conn %d; "
                        "ending it", session.id, name, holder)
            old = self._conns.get(session.owner) if session.owner is not None else None
            session.away.pop(HOLDER, None)
            if old is not None:
                old.sessions.discard(session.id)
            session.owner = None
            self._end_detached(session, "peer restarted")
