"""Sessions that outlive a member's relay connection (signal_server.resuming), with the
pure matchmaker and a fake clock: a member moves its half of a session to a new
connection by signing that connection's challenge with the resume key it gave; nobody
else can; a dropped member's session waits a while for it, then ends as before; a
holder that registers again without resuming has restarted."""

from __future__ import annotations

import os

from test_matchmaker import Harness

from quictun.proto import signalling as sp
from quictun.proto.resume import ResumeKey, verify_resume

CONNECTOR_KEY = ResumeKey(b"\x01" * 32)
HOLDER_KEY = ResumeKey(b"\x02" * 32)


def resumable_pair(h: Harness) -> int:
    """Holder 1 and connector 2 in an answered session; both gave their resume keys."""
    sid = h.pair(1, 2)
    h.send(1, sp.Resumable(session=sid, key=HOLDER_KEY.public.hex()))
    h.send(2, sp.Resumable(session=sid, key=CONNECTOR_KEY.public.hex()))
    assert h.pop_all(1) == h.pop_all(2) == []  # no reply
    return sid


def resume(h: Harness, cid: int, sid: int, key: ResumeKey) -> sp.Message | bytes:
    challenge = h.challenges[cid]
    assert challenge is not None
    h.send(cid, sp.Resume(session=sid, sig=key.sign(bytes.fromhex(challenge), sid).hex()))
    return h.pop(cid)


def test_the_welcome_says_how_long_sessions_wait() -> None:
    h = Harness(resume_window=15.0)
    h.open(2, hello=False)
    h.send(2, sp.Hello(v=2, token=None, agent="x"))
    msg = h.pop(2)
    assert isinstance(msg, sp.Welcome) and msg.resume == 15
    h0 = Harness(resume_window=0.0)
    h0.open(1, hello=False)
    h0.send(1, sp.Hello(v=2, token=None, agent="x"))
    assert h0.pop(1).resume is None  # type: ignore[union-attr]


def test_a_dropped_connector_resumes_on_a_new_connection() -> None:
    h = Harness()
    sid = resumable_pair(h)
    h.close(2)  # its NAT forgot the mapping: the WebSocket is gone
    assert h.pop_all(1) == []  # the holder is not told: the session waits
    h.send_bin(1, sp.encode_relay(sid, b"\x40lost"))  # in flight meanwhile: dropped
    h.open(3)
    assert resume(h, 3, sid, CONNECTOR_KEY) == sp.Resumed(sid)
    h.send_bin(1, sp.encode_relay(sid, b"\x40to-connector"))
    assert h.pop_all(3) == [sp.encode_relay(sid, b"\x40to-connector")]
    h.send_bin(3, sp.encode_relay(sid, b"\x40to-holder"))
    assert h.pop_all(1) == [sp.encode_relay(sid, b"\x40to-holder")]
    h.advance(60.0)  # long past the window: it resumed, nothing ends
    h.send_bin(3, sp.encode_relay(sid, b"\x40still"))
    assert h.pop_all(1) == [sp.encode_relay(sid, b"\x40still")]


def test_the_holder_resumes_before_the_relay_noticed_its_old_connection_died() -> None:
    """After a NAT reset the relay may still think the old connection alive: a resume
    moves the session anyway, and the old connection's late death changes nothing."""
    h = Harness()
    sid = resumable_pair(h)
    h.open(3)
    assert resume(h, 3, sid, HOLDER_KEY) == sp.Resumed(sid)
    h.send_bin(2, sp.encode_relay(sid, b"\x40to-holder"))
    assert h.pop_all(3) == [sp.encode_relay(sid, b"\x40to-holder")]
    assert h.pop_all(1) == []
    h.close(1)  # the relay's ping timeout finally drops the old one
    assert h.pop_all(2) == []
    h.send_bin(2, sp.encode_relay(sid, b"\x40again"))
    assert h.pop_all(3) == [sp.encode_relay(sid, b"\x40again")]


def test_a_stranger_cannot_take_a_session_by_naming_it() -> None:
    h = Harness()
    sid = resumable_pair(h)
    h.open(4)
    stranger = ResumeKey(os.urandom(32))
    err = resume(h, 4, sid, stranger)
    assert isinstance(err, sp.Error) and err.code == "no-such-session"
    # a real resume recorded on another connection is useless here (its challenge)
    h.open(5)
    challenge5 = h.challenges[5]
    assert challenge5 is not None
    recorded = CONNECTOR_KEY.sign(bytes.fromhex(challenge5), sid)
    h.open(6)
    h.send(6, sp.Resume(session=sid, sig=recorded.hex()))
    err = h.expect_error(6, "no-such-session")
    assert err.session == sid
    # the members were never moved: packets still flow between 1 and 2 only
    h.send_bin(1, sp.encode_relay(sid, b"\x40mine"))
    assert h.pop_all(2) == [sp.encode_relay(sid, b"\x40mine")]
    assert h.pop_all(4) == h.pop_all(6) == []


def test_guessing_resumes_counts_as_mistakes() -> None:
    h = Harness(max_errors=3)
    sid = resumable_pair(h)
    h.open(4)
    for _ in range(3):
        resume(h, 4, sid, ResumeKey(os.urandom(32)))
    assert h.disconnected[4].code == 1008


def test_a_member_that_does_not_come_back_ends_the_session_after_the_window() -> None:
    h = Harness(resume_window=15.0)
    sid = resumable_pair(h)
    h.close(2)
    h.advance(14.0)
    assert h.pop_all(1) == []
    h.advance(2.0)
    assert h.pop_all(1) == [sp.Closed(sid, "peer disconnected")]
    h.open(3)
    assert isinstance(resume(h, 3, sid, CONNECTOR_KEY), sp.Error)  # gone for good


def test_without_a_resume_key_a_dropped_member_ends_the_session_at_once() -> None:
    h = Harness()
    sid = h.pair(1, 2)
    h.close(2)
    assert h.pop_all(1) == [sp.Closed(sid, "peer disconnected")]


def test_only_a_member_of_an_answered_session_gives_a_key() -> None:
    h = Harness()
    sid = h.pair(1, 2)
    h.open(3)
    h.send(3, sp.Resumable(session=sid, key=CONNECTOR_KEY.public.hex()))
    assert h.expect_error(3, "no-such-session").session == sid
    h.close(2)
    assert h.pop_all(1) == [sp.Closed(sid, "peer disconnected")]  # 3 gave no key for 2


def test_a_restarted_holder_ends_its_old_sessions_at_once() -> None:
    """A `serve` killed and started again registers its name from a new connection and
    knows nothing of its old sessions: their connectors hear `closed` now, not after
    the window (nor after an idle timeout)."""
    h = Harness()
    sid = resumable_pair(h)
    h.close(1)  # killed: the relay sees the connection drop, the session waits
    assert h.pop_all(2) == []
    h.open(3)
    h.register(3, "srv")
    assert h.pop_all(2) == [sp.Closed(sid, "peer restarted")]


def test_a_holder_that_resumed_first_keeps_its_sessions_when_it_registers_again() -> None:
    h = Harness()
    sid = resumable_pair(h)
    h.open(3)
    assert resume(h, 3, sid, HOLDER_KEY) == sp.Resumed(sid)
    h.register(3, "srv")  # takes the name over from its own dead connection 1
    assert h.pop_all(2) == []
    taken = h.pop_all(1)
    assert any(isinstance(m, sp.Error) and m.code == "taken-over" for m in taken)
    h.send_bin(2, sp.encode_relay(sid, b"\x40ok"))
    assert h.pop_all(3) == [sp.encode_relay(sid, b"\x40ok")]


def test_the_signature_binds_challenge_and_session() -> None:
    challenge = os.urandom(32)
    sig = CONNECTOR_KEY.sign(challenge, 7)
    assert verify_resume(CONNECTOR_KEY.public, sig, challenge, 7)
    assert not verify_resume(CONNECTOR_KEY.public, sig, challenge, 8)
    assert not verify_resume(CONNECTOR_KEY.public, sig, os.urandom(32), 7)
    assert not verify_resume(HOLDER_KEY.public, sig, challenge, 7)
    assert not verify_resume(b"short", sig, challenge, 7)
