"""Who may register which name, and how fast: the relay's defences (pure, fake clock)."""

from __future__ import annotations

from helpers import signed_register, signer
from test_matchmaker import OWNER_A, OWNER_B, Harness

from quictun.proto import signalling as sp
from signal_server.admission import decayed_errors, ip_of


def test_an_owner_token_register_is_refused_with_the_upgrade_message() -> None:
    h = Harness()
    h.open(1)
    h.send(1, sp.Register(name="srv", owner="aa" * 32))
    err = h.expect_error(1, "unsupported-version")
    assert "upgrade quictun on the serving machine" in err.message
    assert 1 not in h.disconnected  # a protocol-1 server is told, not cut off


def test_a_recorded_register_is_useless_on_another_connection() -> None:
    """The signature covers the connection's own challenge: replaying a captured
    register (or one made for another name) takes nothing."""
    h = Harness()
    h.open(1)
    h.open(2)
    captured = h.reg(1, "srv", OWNER_A)
    h.send(2, captured)  # replayed on connection 2
    h.expect_error(2, "unauthorized")
    h.send(1, h.reg(1, "other", OWNER_A).__class__(name="srv", key=captured.key,
                                                   sig=h.reg(1, "other", OWNER_A).sig))
    h.expect_error(1, "unauthorized")  # a signature for another name
    h.send(1, captured)
    assert h.pop(1) == sp.Registered("srv")  # on its own connection it works


def test_a_name_belongs_to_a_key_not_to_a_connection() -> None:
    h = Harness()
    h.open(1)
    h.register(1, "srv", OWNER_A)
    h.open(2)
    h.send(2, h.reg(2, "srv", OWNER_B))  # a squatter with its own key
    h.expect_error(2, "name-taken")
    h.close(1)
    h.open(3)
    h.send(3, h.reg(3, "srv", OWNER_B))  # still reserved for A during the grace
    h.expect_error(3, "name-taken")
    h.open(4)
    h.register(4, "srv", OWNER_A)  # A comes back from anywhere


def test_reserved_prefixes_need_their_token() -> None:
    h = Harness(name_tokens={"corp-": "s3cret"})
    h.open(1)
    h.send(1, h.reg(1, "corp-db", OWNER_A))
    assert "reserved" in h.expect_error(1, "unauthorized").message
    h.register(1, "home", OWNER_A)  # other names are free as before
    h.open(2, token="s3cret")
    h.register(2, "corp-db", OWNER_B)


def test_a_prefix_token_works_on_a_relay_with_its_own_token_for_that_prefix_only() -> None:
    h = Harness(token="relay-token", name_tokens={"corp-": "s3cret"})
    h.open(1, token="s3cret")  # not the relay's token, but a prefix's: welcomed
    h.register(1, "corp-db", OWNER_A)
    h.send(1, h.reg(1, "home", OWNER_A))  # outside its prefix it needs the relay's
    assert "token" in h.expect_error(1, "unauthorized").message
    h.open(2, token="relay-token")
    h.register(2, "home", OWNER_B)
    h.send(2, h.reg(2, "corp-web", OWNER_B))  # the relay's token is not the prefix's
    assert "reserved" in h.expect_error(2, "unauthorized").message
    h.open(3, hello=False)
    h.send(3, sp.Hello(v=2, token="guess", agent="t"))
    assert 3 in h.disconnected  # any other token is still refused at hello


def test_per_address_rates_refuse_the_excess_without_disconnecting() -> None:
    h = Harness(connect_rate=1.0)  # ten at once, then one per second
    h.open(1)
    h.register(1, "srv", OWNER_A)
    h.open(2)
    for _ in range(10):
        h.send(2, sp.Connect(name="srv", offer={}))
    assert sum(isinstance(m, sp.Incoming) for m in h.pop_all(1)) == 10
    h.send(2, sp.Connect(name="srv", offer={}))
    assert "this address" in h.expect_error(2, "rate-limited").message
    assert 2 not in h.disconnected
    h.advance(1.0)
    h.pop_all(2)
    h.send(2, sp.Connect(name="srv", offer={}))
    assert isinstance(h.pop(1), sp.Incoming)


def test_a_connect_flood_gets_busy_and_the_holder_stays() -> None:
    h = Harness(max_pending_per_holder=4, connect_rate=0)
    h.open(1)
    h.register(1, "srv", OWNER_A)
    for cid in range(2, 12):
        h.open(cid)
        h.send(cid, sp.Connect(name="srv", offer={}))
    assert sum(isinstance(m, sp.Incoming) for m in h.pop_all(1)) == 4
    assert all(h.expect_error(cid, "busy") for cid in range(6, 12))
    assert 1 not in h.disconnected


def test_hit_and_run_connectors_cannot_get_the_holder_disconnected() -> None:
    """Connectors that close at once make the holder's answers late: those replies are
    not the holder's mistakes (protocol-1 relays disconnected it after ten)."""
    h = Harness(connect_rate=0)
    h.open(1)
    h.register(1, "srv", OWNER_A)
    sessions = []
    for cid in range(2, 32):
        h.open(cid)
        h.send(cid, sp.Connect(name="srv", offer={}))
        (incoming,) = [m for m in h.pop_all(1) if isinstance(m, sp.Incoming)]
        sessions.append(incoming.session)
        h.close(cid)  # the holder is told "closed" ...
    h.pop_all(1)  # ... but its replies were already on the way
    for sid in sessions:
        h.send(1, sp.Reject(session=sid, reason="late", code="busy"))
        h.send(1, sp.Answer(session=sid, answer={}))
        h.send(1, sp.Data(session=sid, data={}))
    assert 1 not in h.disconnected
    h.open(40)
    h.send(40, sp.Connect(name="srv", offer={}))
    assert any(isinstance(m, sp.Incoming) for m in h.pop_all(1))


def test_mistakes_are_forgiven_over_time() -> None:
    assert decayed_errors(5, 0.0, 59.0, 60.0) == (5, 0.0)
    assert decayed_errors(5, 0.0, 130.0, 60.0) == (3, 120.0)
    assert decayed_errors(1, 0.0, 500.0, 60.0) == (0, 500.0)
    h = Harness(max_errors=3, error_decay=60.0)
    h.open(1)
    for _ in range(2):
        h.send(1, "[]")
        h.expect_error(1, "bad-message")
    h.advance(125.0)  # two forgiven
    for _ in range(2):
        h.send(1, "[]")
        h.expect_error(1, "bad-message")
    assert 1 not in h.disconnected
    h.send(1, "[]")
    assert 1 in h.disconnected  # three within a minute: out


def test_data_only_between_the_members_of_an_answered_session() -> None:
    h = Harness(max_data_per_session=2)
    sid = h.pair(owner=1, connector=2)
    h.send(2, sp.Data(session=sid, data={"box": "x"}))
    assert h.pop(1) == sp.Data(sid, {"box": "x"})
    h.open(3)
    h.send(3, sp.Data(session=sid, data={"box": "intruder"}))
    h.expect_error(3, "no-such-session")
    assert h.pop_all(1) == []
    h.send(2, sp.Data(session=sid, data={"n": 2}))
    h.send(2, sp.Data(session=sid, data={"n": 3}))
    assert h.pop(1) == sp.Data(sid, {"n": 2})
    h.expect_error(2, "rate-limited")  # the third from one member


def test_ip_of() -> None:
    assert ip_of("10.0.0.1:5000") == "10.0.0.1"
    assert ip_of("[2001:db8::1]:443") == "2001:db8::1"
    assert ip_of("garbage") == "garbage"


def test_signed_register_helper_is_a_real_signature() -> None:
    """The tests' helper signs with the identity it names (so the tests above are real)."""
    reg = signed_register("x", "label", "11" * 32)
    assert reg.key == signer("label").public_bytes.hex() and reg.owner is None
