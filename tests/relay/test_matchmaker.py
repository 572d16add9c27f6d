"""Tests for the pure matchmaker, driven with a fake clock and no sockets."""

from __future__ import annotations

import logging
import os

import pytest
from helpers import signed_register

from quictun.proto import signalling as sp
from signal_server.matchmaker import Disconnect, Matchmaker, MatchmakerConfig, Send

OWNER_A = "aa" * 32
OWNER_B = "bb" * 32


class Harness:
    """Drives a Matchmaker and sorts its outputs per connection."""

    def __init__(self, **config: object) -> None:
        self.now = 1000.0
        self.mm = Matchmaker(MatchmakerConfig(stun_ports=(3478, 40000), **config),
                             random_bytes=os.urandom)  # type: ignore[arg-type]
        self.inbox: dict[int, list[sp.Message | bytes]] = {}
        self.disconnected: dict[int, Disconnect] = {}
        self.challenges: dict[int, str | None] = {}

    def _drain(self) -> None:
        for out in self.mm.outputs():
            if isinstance(out, Send):
                item = out.data if isinstance(out.data, bytes) else sp.decode(out.data)
                self.inbox.setdefault(out.conn_id, []).append(item)
            else:
                assert out.conn_id not in self.disconnected
                self.disconnected[out.conn_id] = out

    def open(self, cid: int, hello: bool = True, token: str | None = None) -> None:
        self.mm.open(cid, f"10.0.0.{cid}:{5000 + cid}", self.now)
        self._drain()
        if hello:
            self.send(cid, sp.Hello(v=2, token=token, agent="test"))
            welcome = self.pop(cid)
            assert isinstance(welcome, sp.Welcome)
            self.challenges[cid] = welcome.challenge

    def reg(self, cid: int, name: str, owner: str = "aa" * 32) -> sp.Register:
        """A ``register`` of ``name`` by the owner ``owner``, signed for conn ``cid``."""
        return signed_register(name, owner, self.challenges.get(cid, "00" * 32))

    def send(self, cid: int, msg: sp.Message | str) -> None:
        self.mm.receive_text(cid, msg if isinstance(msg, str) else sp.encode(msg), self.now)
        self._drain()

    def send_bin(self, cid: int, data: bytes) -> None:
        self.mm.receive_binary(cid, data, self.now)
        self._drain()

    def close(self, cid: int) -> None:
        self.mm.close(cid, self.now)
        self._drain()

    def advance(self, dt: float) -> None:
        self.now += dt
        timer = self.mm.get_timer()
        if timer is not None and timer <= self.now:
            self.mm.handle_timer(self.now)
        self._drain()

    def pop(self, cid: int) -> sp.Message | bytes:
        box = self.inbox.get(cid, [])
        assert box, f"nothing sent to conn {cid}"
        return box.pop(0)

    def pop_all(self, cid: int) -> list[sp.Message | bytes]:
        return self.inbox.pop(cid, [])

    def expect_error(self, cid: int, code: str) -> sp.Error:
        msg = self.pop(cid)
        assert isinstance(msg, sp.Error), msg
        assert msg.code == code, msg
        return msg

    def register(self, cid: int, name: str, owner: str = OWNER_A) -> None:
        self.send(cid, self.reg(cid, name, owner))
        assert self.pop(cid) == sp.Registered(name)

    def pair(self, owner: int = 1, connector: int = 2, name: str = "srv") -> int:
        """Open two peers, register, connect, answer; return the session id."""
        self.open(owner)
        self.open(connector)
        self.register(owner, name)
        self.send(connector, sp.Connect(name=name, offer={"o": 1}))
        incoming = self.pop(owner)
        assert isinstance(incoming, sp.Incoming)
        self.send(owner, sp.Answer(session=incoming.session, answer={"a": 2}))
        assert self.pop(connector) == sp.Answer(incoming.session, {"a": 2})
        assert self.pop(owner) == sp.Go(incoming.session)
        return incoming.session


# --- hello ---------------------------------------------------------------------------


def test_welcome_contents() -> None:
    h = Harness(relay_enabled=False)
    h.open(1, hello=False)
    h.send(1, sp.Hello(v=1, token=None, agent="x"))
    assert h.pop(1) == sp.Welcome(v=1, stun=[3478, 40000], relay=False, addr="10.0.0.1:5001")


def test_hello_deadline() -> None:
    h = Harness(hello_timeout=10.0)
    h.open(1, hello=False)
    h.open(2)
    h.advance(9.9)
    assert 1 not in h.disconnected
    h.advance(0.2)
    h.expect_error(1, "timeout")
    assert h.disconnected[1].code == 1008
    assert 2 not in h.disconnected
    assert h.mm.stats["connections"] == 1


@pytest.mark.parametrize(
    ("first", "code", "close"),
    [
        (sp.encode(sp.Ping(1)), "hello-required", 1008),
        ("garbage", "hello-required", 1002),
        (sp.encode(sp.Hello(v=3, token=None, agent="x")), "unsupported-version", 1002),
    ],
)
def test_first_message_must_be_hello(first: str, code: str, close: int) -> None:
    h = Harness()
    h.open(1, hello=False)
    h.send(1, first)
    h.expect_error(1, code)
    assert h.disconnected[1].code == close
    # Input after the disconnect is ignored.
    h.send(1, sp.Hello(v=1, token=None, agent="x"))
    assert h.pop_all(1) == []


def test_binary_before_hello() -> None:
    h = Harness()
    h.open(1, hello=False)
    h.send_bin(1, sp.encode_relay(1, b"x"))
    h.expect_error(1, "hello-required")
    assert 1 in h.disconnected


def test_wrong_token_is_refused_at_hello() -> None:
    h = Harness(token="s3cret")
    h.open(1, hello=False)
    h.send(1, sp.Hello(v=1, token="wrong", agent="x"))
    err = h.expect_error(1, "unauthorized")
    assert "token" in err.message
    assert h.disconnected[1].code == 1008
    h.open(2, token="s3cret")  # asserts welcome
    h.register(2, "srv")
    assert 2 not in h.disconnected


@pytest.mark.parametrize("token", [None, ""])
def test_tokenless_hello_is_welcomed_but_may_not_register(token: str | None) -> None:
    h = Harness(token="s3cret")
    h.open(1, token=token)  # asserts welcome
    h.send(1, h.reg(1, "srv", OWNER_A))
    err = h.expect_error(1, "unauthorized")
    assert "QUICTUN_SIGNAL_TOKEN" in err.message and "--token" in err.message
    assert 1 not in h.disconnected
    assert h.mm.stats["names"] == 0
    # The connection stays usable, and the name was not claimed.
    h.open(2, token=token)
    h.send(2, sp.Connect(name="srv", offer={}))
    h.expect_error(2, "no-such-name")
    h.send(1, sp.Ping(7))
    assert h.pop(1) == sp.Pong(7)


def test_tokenless_registers_count_as_errors() -> None:
    h = Harness(token="s3cret", max_errors=3)
    h.open(1)
    for _ in range(3):
        h.send(1, h.reg(1, "srv", OWNER_A))
        h.expect_error(1, "unauthorized")
    assert h.disconnected[1].code == 1008


def test_tokenless_connector_pairs_with_token_holder() -> None:
    h = Harness(token="s3cret")
    h.open(1, token="s3cret")
    h.open(2)  # no token: what a pasted ticket gives
    h.register(1, "srv")
    h.send(2, sp.Connect(name="srv", offer={"o": 1}))
    incoming = h.pop(1)
    assert isinstance(incoming, sp.Incoming) and incoming.offer == {"o": 1}
    sid = incoming.session
    h.send(1, sp.Answer(session=sid, answer={"a": 2}))
    assert h.pop(2) == sp.Answer(sid, {"a": 2})
    assert h.pop(1) == sp.Go(sid)
    frame = sp.encode_relay(sid, b"\xc0up")
    h.send_bin(2, frame)
    assert h.pop(1) == frame
    back = sp.encode_relay(sid, b"\x40down")
    h.send_bin(1, back)
    assert h.pop(2) == back


def test_tokenless_clients_cannot_relay_on_their_own() -> None:
    """Without a token-holding owner's answer there is no session to relay in: not
    between two token-less clients, not into someone else's session, not before the
    answer, not after a reject."""
    h = Harness(token="s3cret")
    h.open(1, token="s3cret")
    h.open(2)
    h.open(3)
    h.register(1, "srv")
    # Two token-less clients: nothing to connect to, made-up session ids are dropped.
    h.send(3, h.reg(3, "mine", OWNER_B))
    h.expect_error(3, "unauthorized")
    h.send(2, sp.Connect(name="mine", offer={}))
    h.expect_error(2, "no-such-name")
    for sid in (0, 1, 2, 99):
        h.send_bin(2, sp.encode_relay(sid, b"to-3"))
        assert h.expect_error(2, "no-such-session").session == sid
    assert h.pop_all(3) == [] and h.pop_all(1) == []
    # Pending (unanswered) session: nothing forwarded to the owner.
    h.send(2, sp.Connect(name="srv", offer={}))
    pending = h.pop(1).session  # type: ignore[union-attr]
    h.send_bin(2, sp.encode_relay(pending, b"early"))
    h.expect_error(2, "no-such-session")
    assert h.pop_all(1) == []
    # Rejected: the session is gone.
    h.send(1, sp.Reject(session=pending, reason="no", code="auth"))
    assert h.pop(2) == sp.Rejected(pending, "no", "auth")
    h.send_bin(2, sp.encode_relay(pending, b"late"))
    assert h.pop_all(1) == []
    h.pop_all(2)
    # A session answered for client 2 does not carry client 3's frames.
    h.send(2, sp.Connect(name="srv", offer={}))
    sid = h.pop(1).session  # type: ignore[union-attr]
    h.send(1, sp.Answer(session=sid, answer={}))
    h.pop_all(1)
    h.pop_all(2)
    h.send_bin(3, sp.encode_relay(sid, b"intruder"))
    h.expect_error(3, "no-such-session")
    assert h.pop_all(1) == [] and h.pop_all(2) == []
    assert h.mm.stats["relayed_bytes"] == 0


def test_any_token_is_fine_when_the_relay_has_none() -> None:
    h = Harness()
    h.open(1, token="whatever")
    h.register(1, "srv")
    h.open(2, token=None)
    h.register(2, "other", OWNER_B)


def test_second_hello_is_bad_message() -> None:
    h = Harness()
    h.open(1)
    h.send(1, sp.Hello(v=1, token=None, agent="x"))
    h.expect_error(1, "bad-message")


def test_ping_pong() -> None:
    h = Harness()
    h.open(1)
    h.send(1, sp.Ping(42))
    assert h.pop(1) == sp.Pong(42)


# --- names ---------------------------------------------------------------------------


def test_name_ownership_and_grace() -> None:
    h = Harness(name_grace=60.0)
    h.open(1)
    h.open(2)
    h.register(1, "srv", OWNER_A)
    h.send(2, h.reg(2, "srv", OWNER_B))
    h.expect_error(2, "name-taken")
    h.close(1)
    # Within the grace period another owner still cannot take it.
    h.advance(59.0)
    h.send(2, h.reg(2, "srv", OWNER_B))
    h.expect_error(2, "name-taken")
    # ... but nobody can connect to it either.
    h.send(2, sp.Connect(name="srv", offer={}))
    assert "'srv'" in h.expect_error(2, "no-such-name").message
    h.advance(2.0)
    h.register(2, "srv", OWNER_B)
    assert h.mm.stats["names"] == 1


def test_same_owner_reclaims_during_grace_and_takes_over_live() -> None:
    h = Harness()
    h.open(1)
    h.register(1, "srv", OWNER_A)
    h.close(1)
    h.open(2)
    h.register(2, "srv", OWNER_A)  # the same identity, from another connection
    # A live registration is handed to the same owner registering again, and the older
    # connection is told (it must not go on serving a name nobody can reach).
    h.open(3)
    h.register(3, "srv", OWNER_A)
    told = h.expect_error(2, "taken-over")
    assert "same identity" in told.message
    h.open(4)
    h.send(4, sp.Connect(name="srv", offer={}))
    assert isinstance(h.pop(3), sp.Incoming)
    assert h.pop_all(2) == []
    # The old connection dropping later does not release the name.
    h.close(2)
    h.send(4, sp.Connect(name="srv", offer={}))
    assert isinstance(h.pop(3), sp.Incoming)


def test_several_names_and_unregister() -> None:
    h = Harness()
    h.open(1)
    h.open(2)
    h.register(1, "a")
    h.register(1, "b")
    h.send(1, sp.Unregister(name="a"))
    h.send(1, sp.Unregister(name="a"))
    h.expect_error(1, "not-registered")
    # Explicit unregister frees the name immediately for anyone.
    h.register(2, "a", OWNER_B)
    h.send(2, sp.Connect(name="b", offer={}))
    assert isinstance(h.pop(1), sp.Incoming)


def test_name_limit() -> None:
    h = Harness(max_names_per_conn=2)
    h.open(1)
    h.register(1, "a")
    h.register(1, "b")
    h.register(1, "a")  # re-registering one you hold is fine
    h.send(1, h.reg(1, "c", OWNER_A))
    h.expect_error(1, "rate-limited")


# --- sessions ------------------------------------------------------------------------


def test_connect_answer_go() -> None:
    h = Harness()
    h.open(1)
    h.open(2)
    h.register(1, "srv")
    h.send(2, sp.Connect(name="srv", offer={"cands": ["1.2.3.4:5"]}))
    incoming = h.pop(1)
    assert isinstance(incoming, sp.Incoming)
    assert incoming.name == "srv" and incoming.offer == {"cands": ["1.2.3.4:5"]}
    assert h.pop_all(2) == []
    # answer and go are emitted back to back, connector's first.
    h.send(1, sp.Answer(session=incoming.session, answer={"x": 1}))
    assert h.pop(2) == sp.Answer(incoming.session, {"x": 1})
    assert h.pop(1) == sp.Go(incoming.session)
    # Answering twice is an error.
    h.send(1, sp.Answer(session=incoming.session, answer={}))
    h.expect_error(1, "bad-message")
    # The answered session does not time out.
    h.advance(100.0)
    assert h.pop_all(2) == []
    assert h.mm.stats["sessions"] == 1


def test_session_ids_are_distinct() -> None:
    h = Harness()
    h.open(1)
    h.open(2)
    h.register(1, "srv")
    ids = set()
    for _ in range(5):
        h.send(2, sp.Connect(name="srv", offer={}))
        ids.add(h.pop(1).session)  # type: ignore[union-attr]
    assert len(ids) == 5


def test_connect_unknown_name() -> None:
    h = Harness()
    h.open(1)
    h.send(1, sp.Connect(name="ghost", offer={}))
    err = h.expect_error(1, "no-such-name")
    assert "ghost" in err.message and err.session is None


def test_reject() -> None:
    h = Harness()
    h.open(1)
    h.open(2)
    h.register(1, "srv")
    h.send(2, sp.Connect(name="srv", offer={}))
    sid = h.pop(1).session  # type: ignore[union-attr]
    h.send(1, sp.Reject(session=sid, reason="not you"))
    rejected = h.pop(2)
    assert rejected == sp.Rejected(sid, "not you") and rejected.code is None  # type: ignore[union-attr]
    assert h.mm.stats["sessions"] == 0


@pytest.mark.parametrize("code", ["auth", "replay", "busy", "something-new"])
def test_reject_code_is_passed_through(code: str) -> None:
    h = Harness()
    h.open(1)
    h.open(2)
    h.register(1, "srv")
    h.send(2, sp.Connect(name="srv", offer={}))
    sid = h.pop(1).session  # type: ignore[union-attr]
    h.send(1, sp.Reject(session=sid, reason="authentication? no", code=code))
    assert h.pop(2) == sp.Rejected(sid, "authentication? no", code)


def test_connect_timeout() -> None:
    h = Harness(connect_timeout=15.0)
    h.open(1)
    h.open(2)
    h.register(1, "srv")
    h.send(2, sp.Connect(name="srv", offer={}))
    sid = h.pop(1).session  # type: ignore[union-attr]
    h.advance(14.0)
    assert h.pop_all(2) == []
    h.advance(2.0)
    err = h.expect_error(2, "timeout")
    assert err.session == sid
    assert h.pop(1) == sp.Closed(sid, "timeout")
    # A late answer is refused.
    h.send(1, sp.Answer(session=sid, answer={}))
    h.expect_error(1, "no-such-session")
    assert 1 not in h.disconnected


def test_answer_reject_close_by_non_member() -> None:
    h = Harness()
    sid = h.pair()
    h.open(3)
    h.send(3, sp.Answer(session=sid, answer={}))
    assert h.expect_error(3, "no-such-session").session == sid
    h.send(3, sp.Reject(session=sid, reason=""))
    h.expect_error(3, "no-such-session")
    h.send(3, sp.Close(session=sid, reason=""))
    h.expect_error(3, "no-such-session")
    # The connector may not answer its own session either.
    h.send(2, sp.Connect(name="srv", offer={}))
    sid2 = h.pop(1).session  # type: ignore[union-attr]
    h.send(2, sp.Answer(session=sid2, answer={}))
    h.expect_error(2, "no-such-session")
    assert 3 not in h.disconnected and 2 not in h.disconnected


def test_close_propagates() -> None:
    h = Harness()
    sid = h.pair()
    h.send(2, sp.Close(session=sid, reason="done"))
    assert h.pop(1) == sp.Closed(sid, "done")
    assert h.pop_all(2) == []
    assert h.mm.stats["sessions"] == 0


def test_disconnect_closes_sessions_both_ways() -> None:
    h = Harness()
    sid = h.pair()
    h.open(3)
    h.send(3, sp.Connect(name="srv", offer={}))
    pending = h.pop(1).session  # type: ignore[union-attr]
    h.close(1)  # the owner drops
    assert h.pop(2) == sp.Closed(sid, "peer disconnected")
    assert h.pop(3) == sp.Closed(pending, "peer disconnected")
    assert h.mm.stats["sessions"] == 0
    # And the connector dropping notifies the owner.
    sid2 = h.pair(owner=4, connector=5, name="other")
    h.close(5)
    assert h.pop(4) == sp.Closed(sid2, "peer disconnected")
    h.close(5)  # idempotent


def test_pending_limit() -> None:
    h = Harness(max_pending_per_conn=2)
    h.open(1)
    h.open(2)
    h.register(1, "srv")
    for _ in range(2):
        h.send(2, sp.Connect(name="srv", offer={}))
    h.send(2, sp.Connect(name="srv", offer={}))
    h.expect_error(2, "rate-limited")


# --- relaying ------------------------------------------------------------------------


def test_relay_forwarding() -> None:
    h = Harness()
    sid = h.pair()
    frame = sp.encode_relay(sid, b"\xc0quic-packet")
    h.send_bin(2, frame)
    assert h.pop(1) == frame
    back = sp.encode_relay(sid, b"\x40reply")
    h.send_bin(1, back)
    assert h.pop(2) == back
    assert h.mm.stats["relayed_bytes"] == len(b"\xc0quic-packet") + len(b"\x40reply")
    assert h.mm.session_relayed_bytes(sid) == h.mm.stats["relayed_bytes"]


def test_relay_member_and_answer_checks() -> None:
    h = Harness()
    sid = h.pair()
    h.open(3)
    h.send_bin(3, sp.encode_relay(sid, b"intruder"))
    assert h.expect_error(3, "no-such-session").session == sid
    h.send_bin(3, sp.encode_relay(sid, b"again"))  # replied to only once per run
    assert h.pop_all(3) == []
    assert h.pop_all(1) == [] and h.pop_all(2) == []
    # Not answered yet: not forwarded.
    h.send(3, sp.Connect(name="srv", offer={}))
    pending = h.pop(1).session  # type: ignore[union-attr]
    h.send_bin(3, sp.encode_relay(pending, b"early"))
    h.expect_error(3, "no-such-session")
    assert h.pop_all(1) == []
    # Malformed binary frames are bad messages.
    h.send_bin(3, b"\x07abc")
    h.expect_error(3, "bad-message")
    assert h.mm.stats["relayed_bytes"] == 0


def test_relay_disabled() -> None:
    h = Harness(relay_enabled=False)
    sid = h.pair()
    h.send_bin(2, sp.encode_relay(sid, b"x"))
    h.expect_error(2, "relay-disabled")
    h.send_bin(2, sp.encode_relay(sid, b"y"))
    assert h.pop_all(2) == []  # only once
    assert h.pop_all(1) == []
    assert 2 not in h.disconnected


def test_relay_rate_cap() -> None:
    h = Harness(relay_rate=1000.0, relay_burst=1000.0)
    sid = h.pair()
    payload = b"p" * 400
    for _ in range(3):
        h.send_bin(2, sp.encode_relay(sid, payload))
    assert len(h.pop_all(1)) == 2  # the third exceeds the 1000-byte bucket
    h.advance(0.5)  # refills 500 bytes
    h.send_bin(2, sp.encode_relay(sid, payload))
    h.send_bin(2, sp.encode_relay(sid, payload))
    assert len(h.pop_all(1)) == 1
    # The other direction has its own bucket.
    h.send_bin(1, sp.encode_relay(sid, payload))
    assert len(h.pop_all(2)) == 1
    assert h.mm.stats["relayed_bytes"] == 4 * 400
    assert h.mm.stats["dropped_bytes"] == 2 * 400


# --- garbage -------------------------------------------------------------------------


def test_garbage_disconnects_after_max_errors(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(max_errors=10)
    h.open(1)
    caplog.set_level(logging.INFO, logger="quictun.signal")
    for i in range(9):
        h.send(1, "{not json" if i % 3 else '{"t":"frobnicate"}')
        h.expect_error(1, "bad-message")
    assert 1 not in h.disconnected
    h.send(1, '{"t":"welcome"}')  # a server message from a client
    h.expect_error(1, "bad-message")
    assert h.disconnected[1].code == 1008
    lines = [r for r in caplog.records if "bad-message" in r.getMessage()]
    assert len(lines) == 10
    assert all(r.exc_info is None for r in caplog.records)


def test_errors_for_legit_outcomes_do_not_count() -> None:
    h = Harness(max_errors=3)
    h.open(1)
    h.open(2)
    h.register(2, "srv", OWNER_B)
    for _ in range(5):
        h.send(1, sp.Connect(name="nobody", offer={}))
        h.send(1, h.reg(1, "srv", OWNER_A))
    assert 1 not in h.disconnected


def test_internal_error_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    h.open(1)

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setitem(h.mm._handlers, sp.Ping, boom)
    h.send(1, sp.Ping(1))
    h.expect_error(1, "server-error")
    h.send(1, h.reg(1, "x", OWNER_A))
    assert h.pop(1) == sp.Registered("x")


def test_unknown_connection_is_ignored() -> None:
    h = Harness()
    h.send(99, sp.Ping(1))
    h.send_bin(99, b"\x01\x00\x00\x00\x01")
    h.close(99)
    assert h.inbox == {} and h.disconnected == {}
    h.open(1)
    with pytest.raises(ValueError):
        h.mm.open(1, "x", h.now)
