"""The wire format between relay instances, and the Prometheus text renderer."""

from __future__ import annotations

import pytest
from clusterkit import parse_prometheus

from quictun.proto import signalling as sp
from signal_server import peerwire as pw
from signal_server.metrics import Family, render

MESSAGES = [
    pw.PeerIncoming(7, 3, "home", {"cands": ["192.0.2.1:1"], "é": 1}),
    pw.PeerAnswer(7, 9, {"fp": "ab"}),
    pw.PeerRejected(7, 9, "wrong secret", "auth"),
    pw.PeerRejected(7, 9, "nope", None),
    pw.PeerClosed(None, 9, "peer disconnected"),
    pw.PeerClosed(7, 9, "bye"),
    pw.PeerError(7, "no-such-name", "no peer is registered as 'x'"),
    pw.PeerMoved("home", 3),
    pw.PeerRelay(9, 7, sp.encode_relay(7, b"\x40packet")),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: pw.PeerMessage) -> None:
    assert pw.decode(pw.encode(msg)) == msg


def test_relay_frame_rewrites_only_the_session_id() -> None:
    client = sp.encode_relay_batch(5, [b"\x40a", b"\x40bc"])
    msg = pw.decode(pw.relay_frame(5, 0xFFFFFFFF, client))
    assert isinstance(msg, pw.PeerRelay) and msg.from_sid == 5 and msg.to_sid == 0xFFFFFFFF
    assert sp.relay_packets(msg.frame) == (0xFFFFFFFF, [b"\x40a", b"\x40bc"])


@pytest.mark.parametrize("data", [
    b"", b"\x02", b"\x00", b"\x00not json", b"\x00[1]", b"\x00{\"k\":\"nope\"}",
    b"\x00{\"k\":\"answer\",\"to\":-1,\"from\":1,\"answer\":{}}",
    b"\x00{\"k\":\"answer\",\"to\":true,\"from\":1,\"answer\":{}}",
    b"\x00{\"k\":\"incoming\",\"from\":1,\"conn\":1,\"name\":\"bad name\",\"offer\":{}}",
    b"\x00{\"k\":\"rejected\",\"to\":1,\"from\":1,\"reason\":5}",
    b"\x00\xff\xfe", b"\x01\x00\x00\x00\x01", b"\x01\x00\x00\x00\x01\x07\x00\x00\x00\x01",
])
def test_malformed_raises_only_peer_protocol_error(data: bytes) -> None:
    with pytest.raises(pw.PeerProtocolError):
        pw.decode(data)


def test_frame_reader_splits_and_limits() -> None:
    reader = pw.FrameReader(limit=10)
    stream = pw.frame(b"one") + pw.frame(b"") + pw.frame(b"three")
    got = []
    for i in range(len(stream)):  # byte by byte
        got += reader.feed(stream[i : i + 1])
    assert got == [b"one", b"", b"three"]
    with pytest.raises(pw.PeerProtocolError):
        reader.feed(pw.frame(b"x" * 11))


def test_hello_and_pubsub_envelopes() -> None:
    hello = pw.LinkHello("abc123", "t" * 32)
    assert pw.decode_hello(pw.encode_hello(hello)) == hello
    for bad in (b"{}", b"junk", b'{"v":2,"inst":"a","token":"b"}', b'{"v":1,"inst":"","token":""}'):
        with pytest.raises(pw.PeerProtocolError):
            pw.decode_hello(bad)
    assert pw.unpack_pubsub(pw.pack_pubsub("abc", b"\x00{}\n")) == ("abc", b"\x00{}\n")
    with pytest.raises(pw.PeerProtocolError):
        pw.unpack_pubsub(b"no-newline")


def test_metrics_text_parses_and_escapes() -> None:
    fams = [
        Family("x_total", "counter", "Things.\nSecond line \\ here").add(3, code='a"b\\c\nd'),
        Family("y", "gauge", "A gauge.").add(0.25).add(float("inf"), kind="inf"),
        Family("z_total", "counter", "Empty family."),
    ]
    text = render(fams)
    parsed = parse_prometheus(text)
    assert parsed["x_total"] == {(("code", 'a\\"b\\\\c\\nd'),): 3.0}
    assert parsed["y"][()] == 0.25 and parsed["y"][(("kind", "inf"),)] == float("inf")
    assert parsed["z_total"] == {}
    assert "\nSecond" not in text
