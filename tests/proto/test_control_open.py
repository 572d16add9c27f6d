"""Open requests, replies, DATAGRAM framing and the listing (quictun.proto.control)."""

from __future__ import annotations

import pytest

from quictun.proto import control as c


@pytest.mark.parametrize("req", [
    c.OpenRequest(c.OP_STREAM, "web"),
    c.OpenRequest(c.OP_STREAM, None),
    c.OpenRequest(c.OP_DATAGRAM, "wg"),
    c.OpenRequest(c.OP_TARGET, host="nas.lan", port=443),
    c.OpenRequest(c.OP_TARGET, host="2001:db8::1", port=22),
    c.OpenRequest(c.OP_LIST),
])
def test_open_request_roundtrip_byte_by_byte(req: c.OpenRequest) -> None:
    raw = req.encode() + b"data"
    n = len(raw) - 4
    for i in range(n):
        assert c.parse_open(raw[:i]) is None
    assert c.parse_open(raw) == (req, n)


def test_version_zero_is_the_old_preamble() -> None:
    assert c.OpenRequest(c.OP_STREAM, version=0).encode() == c.STREAM_PREAMBLE == b"\x00"
    assert c.parse_open(b"\x00hello") == (c.OpenRequest(c.OP_STREAM, version=0), 1)


@pytest.mark.parametrize("raw", [b"\x02", b"\x01\x09\x00", b"\x01\x02\x01a",
                                 b"\x01\x01\x02\xff\xfe"])
def test_malformed_requests(raw: bytes) -> None:
    with pytest.raises(c.ProtocolError):
        c.parse_open(raw)


def test_reply_roundtrip() -> None:
    raw = c.OpenReply(c.ST_NOT_ALLOWED, "10.0.0.1:22 is not allowed").encode() + b"x"
    assert c.parse_reply(raw[:1]) is None
    assert c.parse_reply(raw[:-2]) is None
    reply, n = c.parse_reply(raw)  # type: ignore[misc]
    assert (reply.status, reply.text, raw[n:]) == (c.ST_NOT_ALLOWED,
                                                   "10.0.0.1:22 is not allowed", b"x")
    assert c.OpenReply(c.ST_OK).ok and c.OpenReply(c.ST_OK).encode() == b"\x00\x00"


@pytest.mark.parametrize("flow", [0, 1, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1])
def test_datagram_varint_prefix(flow: int) -> None:
    raw = c.encode_datagram(flow, b"payload")
    assert len(raw) == c.varint_size(flow) + 7
    assert c.decode_datagram(raw) == (flow, b"payload")
    assert c.decode_datagram(raw[:c.varint_size(flow) - 1]) is None


def test_listing_roundtrip_and_garbage() -> None:
    listing = c.Listing((("default", "tcp", True), ("wg", "udp", False)), ("10.0.0.0/8:22",))
    assert c.decode_listing(c.encode_listing(listing)) == listing
    for raw in (b"", b"[]", b'{"services": [{"kind": "tcp"}]}', b"\xff"):
        with pytest.raises(c.ProtocolError):
            c.decode_listing(raw)
