"""Tests for quictun.proto.signalling: round trips of every message and every malformed case."""

from __future__ import annotations

import json

import pytest

from quictun.proto import signalling as sp

OWNER = "ab" * 32

ALL = [
    sp.Hello(v=1, token=None, agent="quictun/0.1"),
    sp.Hello(v=1, token="secret", agent=""),
    sp.Register(name="my-host.1", owner=OWNER),
    sp.Unregister(name="x"),
    sp.Connect(name="n_1", offer={"cands": ["1.2.3.4:5"], "fp": "ab", "n": [1, {"x": None}]}),
    sp.Answer(session=4294967295, answer={}),
    sp.Reject(session=1, reason="busy"),
    sp.Reject(session=1, reason="server busy", code="busy"),
    sp.Close(session=2, reason="bye"),
    sp.Ping(id=0),
    sp.Welcome(v=1, stun=[3478, 40000], relay=True, addr="[::1]:5"),
    sp.Registered(name="n"),
    sp.Incoming(session=7, name="n", offer={"a": "ü"}),
    sp.Go(session=7),
    sp.Rejected(session=7, reason=""),
    sp.Rejected(session=7, reason="authentication failed: wrong secret", code="auth"),
    sp.Closed(session=7, reason="peer disconnected"),
    sp.Pong(id=2**53 - 1),
    sp.Error(code="bad-message", message="nope", session=None),
    sp.Error(code="timeout", message="late", session=9),
    sp.Welcome(v=2, stun=[3478], relay=True, addr="1.2.3.4:5", challenge="ab" * 32,
               resume=15),
    sp.Resumable(session=3, key="cd" * 32),
    sp.Resume(session=3, sig="ef" * 64),
    sp.Resumed(session=3),
]


def test_welcome_without_resume_is_what_older_relays_send() -> None:
    w = sp.Welcome(v=2, stun=[3478], relay=True, addr="x", challenge="ab" * 32)
    assert "resume" not in sp.encode(w)
    assert sp.decode(sp.encode(w)).resume is None  # type: ignore[union-attr]
    with pytest.raises(sp.ProtocolError):
        sp.decode('{"t":"resume","session":1,"sig":"abcd"}')  # not 64 bytes of hex


@pytest.mark.parametrize("msg", ALL, ids=lambda m: m.T)
def test_round_trip(msg: sp.Message) -> None:
    text = sp.encode(msg)
    assert json.loads(text)["t"] == msg.T
    assert sp.decode(text) == msg
    assert sp.decode(text.encode()) == msg


@pytest.mark.parametrize("cls", [sp.Reject, sp.Rejected])
def test_reject_code_is_optional_and_backward_compatible(cls: type) -> None:
    def wire(**extra: object) -> str:
        obj = {"t": cls.T, "session": 3, "reason": "nope", **extra}
        return json.dumps(obj, separators=(",", ":"))

    # Without a code: decoded as None, and encoded exactly as before the field existed.
    assert sp.decode(wire()) == cls(3, "nope") and sp.decode(wire()).code is None
    assert sp.encode(cls(3, "nope")) == wire()
    assert sp.decode(wire(code=None)).code is None
    # With a code: round trip (a decoder that predates it ignores the extra key).
    assert sp.encode(cls(3, "nope", sp.REJECT_AUTH)) == wire(code="auth")
    assert sp.decode(wire(code="auth")) == cls(3, "nope", "auth")
    with pytest.raises(sp.ProtocolError, match="'code' must be a string"):
        sp.decode(wire(code=1))
    with pytest.raises(sp.ProtocolError) as exc:
        sp.decode(wire(code="c" * 300))
    assert exc.value.code == "too-large"


def test_reject_codes() -> None:
    assert sp.REJECT_CODES == {"auth", "replay", "malformed", "busy", "server-error",
                               "version", "stale"}


@pytest.mark.parametrize("text", [
    '{"t":"ping","id":1e400}',  # infinite: the relay could not encode it again
    '{"t":"ping","id":-1e400}',
    '{"t":"hello","v":1,"token":null,"agent":"\\ud800"}',  # a lone surrogate
    '{"t":"close","session":1,"reason":"\\udfff x"}',
])
def test_numbers_and_strings_that_cannot_be_encoded_again_are_refused(text: str) -> None:
    with pytest.raises(sp.ProtocolError) as info:
        sp.decode(text)
    assert info.value.code == "bad-message"


def test_error_session_optional_and_extra_fields_ignored() -> None:
    assert sp.decode('{"t":"error","code":"x","message":"y"}') == sp.Error("x", "y", None)
    assert sp.decode('{"t":"ping","id":3,"future":true}') == sp.Ping(3)


REJECT_CASES = [
    ("{", "bad-message", "invalid JSON"),
    ("[]", "bad-message", "JSON object"),
    ('"hello"', "bad-message", "JSON object"),
    ("{}", "bad-message", "'t'"),
    ('{"t":5}', "bad-message", "'t'"),
    ('{"t":"nope"}', "bad-message", "unknown message type"),
    ('{"t":"ping"}', "bad-message", "missing field 'id'"),
    ('{"t":"ping","id":"1"}', "bad-message", "integer"),
    ('{"t":"ping","id":true}', "bad-message", "integer"),
    ('{"t":"ping","id":1.5}', "bad-message", "integer"),
    ('{"t":"ping","id":-1}', "bad-message", "range"),
    ('{"t":"ping","id":NaN}', "bad-message", "invalid JSON"),
    ('{"t":"answer","session":4294967296,"answer":{}}', "bad-message", "range"),
    ('{"t":"answer","session":1,"answer":[]}', "bad-message", "object"),
    ('{"t":"register","name":"","owner":"' + OWNER + '"}', "bad-message", "1-64"),
    ('{"t":"register","name":"a b","owner":"' + OWNER + '"}', "bad-message", "1-64"),
    ('{"t":"register","name":"' + "a" * 65 + '","owner":"' + OWNER + '"}', "bad-message", None),
    ('{"t":"register","name":"a","owner":"xyz"}', "bad-message", "64 hex"),
    ('{"t":"register","name":"a","owner":"' + "g" * 64 + '"}', "bad-message", "64 hex"),
    ('{"t":"register","name":"é","owner":"' + OWNER + '"}', "bad-message", "1-64"),
    ('{"t":"hello","v":1,"token":5,"agent":"a"}', "bad-message", "string"),
    ('{"t":"hello","v":1,"token":null,"agent":"' + "a" * 300 + '"}', "too-large", "longer"),
    ('{"t":"welcome","v":1,"stun":[70000],"relay":true,"addr":""}', "bad-message", "range"),
    ('{"t":"welcome","v":1,"stun":[],"relay":1,"addr":""}', "bad-message", "boolean"),
    ('{"t":"welcome","v":1,"stun":"x","relay":true,"addr":""}', "bad-message", "list"),
    ("[" * 100000 + "]" * 100000, "too-large", None),
    ("[" * 5000 + "]" * 5000, "bad-message", None),
]


@pytest.mark.parametrize(
    ("text", "code", "match"), REJECT_CASES, ids=[f"case{i}" for i in range(len(REJECT_CASES))]
)
def test_decode_rejects(text: str, code: str, match: str | None) -> None:
    with pytest.raises(sp.ProtocolError, match=match) as info:
        sp.decode(text)
    assert info.value.code == code


def test_decode_rejects_bad_utf8_and_oversize() -> None:
    with pytest.raises(sp.ProtocolError) as info:
        sp.decode(b"\xff\xfe{}")
    assert info.value.code == "bad-message"
    with pytest.raises(sp.ProtocolError) as info:
        sp.decode(" " * (sp.MAX_MESSAGE_SIZE + 1))
    assert info.value.code == "too-large"


def test_blob_limit() -> None:
    big = {"x": "a" * (sp.MAX_BLOB_SIZE)}
    with pytest.raises(sp.ProtocolError) as info:
        sp.decode(json.dumps({"t": "connect", "name": "n", "offer": big}))
    assert info.value.code == "too-large"
    ok = {"x": "a" * (sp.MAX_BLOB_SIZE - 20)}
    assert sp.decode(json.dumps({"t": "connect", "name": "n", "offer": ok})).offer == ok


def test_encode_validates() -> None:
    with pytest.raises(sp.ProtocolError):
        sp.encode(sp.Register(name="bad name", owner=OWNER))
    with pytest.raises(sp.ProtocolError):
        sp.encode(sp.Ping(id=-1))


def test_valid_name() -> None:
    assert sp.valid_name("a")
    assert sp.valid_name("A-z_0.9")
    assert sp.valid_name("x" * 64)
    for bad in ("", "x" * 65, "a/b", "a b", "ä", None, 5):
        assert not sp.valid_name(bad)


def test_relay_frames() -> None:
    frame = sp.encode_relay(0x01020304, b"\xc0quic")
    assert frame == b"\x01\x01\x02\x03\x04\xc0quic"
    assert sp.decode_relay(frame) == (0x01020304, b"\xc0quic")
    assert sp.decode_relay(sp.encode_relay(0, b"")) == (0, b"")
    for bad in (b"", b"\x01\x00\x00\x00", b"\x03\x00\x00\x00\x01x"):
        with pytest.raises(sp.ProtocolError) as info:
            sp.decode_relay(bad)
        assert info.value.code == "bad-message"
    with pytest.raises(sp.ProtocolError):
        sp.encode_relay(2**32, b"")


def test_relay_batches() -> None:
    packets = [b"\xc0one", b"", b"\x40" * 1350]
    frame = sp.encode_relay_batch(7, packets)
    assert frame[0] == 0x02
    assert sp.decode_relay(frame)[0] == 7  # the relay only needs the session
    assert sp.relay_packets(frame) == (7, packets)
    assert sp.relay_packets(sp.encode_relay(9, b"\xc0x")) == (9, [b"\xc0x"])
    for bad in (frame[:-1], frame[:6]):
        with pytest.raises(sp.ProtocolError):
            sp.relay_packets(bad)


def test_error_codes_are_the_documented_set() -> None:
    assert {
        "bad-message",
        "unsupported-version",
        "unauthorized",
        "name-taken",
        "no-such-name",
        "timeout",
        "too-large",
        "relay-disabled",
        "rate-limited",
        "not-registered",
        "no-such-session",
        "hello-required",
        "too-many-connections",
        "server-error",
        "busy",
        "taken-over",
    } == sp.ERROR_CODES
