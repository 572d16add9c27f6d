"""PCP codec (quictun.proto.pcp): RFC 6887 layouts, refusals, hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto import pcp

NONCE = bytes(range(12))


def response(*, opcode: int = pcp.OP_MAP, result: int = 0, lifetime: int = 300,
             epoch: int = 1000, nonce: bytes = NONCE, protocol: int = 17,
             internal_port: int = 40000, external_port: int = 40000,
             external_ip: str = "198.18.0.11", body: bool = True,
             options: bytes = b"") -> bytes:
    """A server's answer, laid out by hand from RFC 6887 §7.2 and §11.1."""
    head = struct.pack("!BBBBII", 2, 0x80 | opcode, 0, result, lifetime, epoch) + bytes(12)
    if opcode != pcp.OP_MAP or not body:
        return head + options
    data = nonce + struct.pack("!B3xHH", protocol, internal_port, external_port)
    return head + data + pcp.encode_ip(external_ip) + options


def test_map_request_layout() -> None:
    req = pcp.map_request(NONCE, 40000, "198.19.1.2", lifetime=300, suggested_port=40001)
    assert len(req) == 60
    assert req[0] == 2 and req[1] == pcp.OP_MAP and req[2:4] == b"\x00\x00"
    assert struct.unpack("!I", req[4:8])[0] == 300
    assert req[8:24] == bytes(10) + b"\xff\xff" + bytes([198, 19, 1, 2])
    assert req[24:36] == NONCE
    assert req[36] == 17 and req[37:40] == bytes(3)
    assert struct.unpack("!HH", req[40:44]) == (40000, 40001)
    # no suggested address: the IPv4-mapped all-zero address (RFC 6887 §11.1)
    assert req[44:60] == bytes(10) + b"\xff\xff" + bytes(4)


def test_ipv6_client_and_suggested_address() -> None:
    req = pcp.map_request(NONCE, 1, "2001:db8:1::2", lifetime=0,
                          suggested_ip="2001:db8::11")
    assert pcp.decode_ip(req[8:24]) == "2001:db8:1::2"
    assert pcp.decode_ip(req[44:60]) == "2001:db8::11"
    assert pcp.map_request(NONCE, 1, "2001:db8:1::2", lifetime=1)[44:60] == bytes(16)


def test_delete_and_announce() -> None:
    delete = pcp.delete_request(NONCE, 40000, "198.19.1.2")
    assert struct.unpack("!I", delete[4:8])[0] == 0 and delete[24:36] == NONCE
    ann = pcp.announce_request("198.19.1.2")
    assert len(ann) == 24 and ann[1] == pcp.OP_ANNOUNCE


@pytest.mark.parametrize("kwargs", [
    {"nonce": b"short"},
    {"internal_port": 0},
    {"internal_port": 70000},
    {"lifetime": -1},
    {"lifetime": 1 << 32},
    {"suggested_port": -1},
    {"client_ip": "not-an-ip"},
    {"protocol": 0},
])
def test_builders_reject_bad_arguments(kwargs: dict) -> None:
    args = {"nonce": NONCE, "internal_port": 1, "client_ip": "198.19.1.2", "lifetime": 1}
    args.update(kwargs)
    with pytest.raises(pcp.PcpError):
        pcp.map_request(args.pop("nonce"), args.pop("internal_port"), args.pop("client_ip"),
                        **args)


def test_decode_map_success() -> None:
    resp = pcp.decode_response(response(external_port=41000, lifetime=120, epoch=77))
    assert resp.ok and resp.result_name == "SUCCESS"
    assert (resp.external_ip, resp.external_port, resp.lifetime, resp.epoch) == (
        "198.18.0.11", 41000, 120, 77)
    assert pcp.matches(resp, NONCE, 40000)
    assert not pcp.matches(resp, bytes(12), 40000)
    assert not pcp.matches(resp, NONCE, 40001)
    assert not pcp.matches(resp, NONCE, 40000, pcp.PROTO_TCP)


def test_decode_deletion_confirmed() -> None:
    resp = pcp.decode_response(response(lifetime=0, external_port=0, external_ip="0.0.0.0"))
    assert resp.ok and resp.lifetime == 0 and pcp.matches(resp, NONCE, 40000)


def test_decode_refusals_are_not_errors() -> None:
    resp = pcp.decode_response(response(result=pcp.ResultCode.NOT_AUTHORIZED, lifetime=30))
    assert not resp.ok and resp.result_name == "NOT_AUTHORIZED" and resp.lifetime == 30
    bare = pcp.decode_response(response(result=pcp.ResultCode.NO_RESOURCES, body=False))
    assert bare.nonce is None and bare.result == pcp.ResultCode.NO_RESOURCES
    unknown = pcp.decode_response(response(result=200, body=False))
    assert unknown.result_name == "result 200"


def test_decode_announce_and_options() -> None:
    resp = pcp.decode_response(response(opcode=pcp.OP_ANNOUNCE, lifetime=0))
    assert resp.opcode == pcp.OP_ANNOUNCE and resp.ok and resp.nonce is None
    opt = struct.pack("!BBH", 18, 0, 3) + b"abc" + b"\x00"  # padded to 4
    with_opt = pcp.decode_response(response(options=opt))
    assert with_opt.options == ((18, b"abc"),)


@pytest.mark.parametrize("data, why", [
    (b"", "shorter"),
    (b"\x00\x80\x00\x01\x00\x00\x00\x05", "version 0"),  # NAT-PMP "unsupported version"
    (response()[:-4], "MAP data"),  # 56 bytes: a multiple of 4, MAP data truncated
    (response() + b"\x00", "size"),
    (response() + bytes(1100), "size"),
    (b"\x02\x01" + response()[2:], "request"),
    (response(external_port=0), "external"),
    (response(external_ip="0.0.0.0"), "external"),
    (response(external_ip="::"), "external"),
    (response(body=False), "MAP data"),
    (response(options=struct.pack("!BBH", 1, 0, 8) + b"abcd"), "truncated option"),
    (response(options=b"\x01\x00"), "size"),
])
def test_decode_rejects_malformed(data: bytes, why: str) -> None:
    """Each malformed answer raises PcpError, and for the reason named."""
    with pytest.raises(pcp.PcpError, match=why):
        pcp.decode_response(data)


def test_epoch_check() -> None:
    assert pcp.epoch_ok(None, 0.0, 5)
    assert pcp.epoch_ok((100.0, 1000), 160.0, 1060)
    assert not pcp.epoch_ok((100.0, 1000), 160.0, 3)  # went back: the server restarted
    assert not pcp.epoch_ok((100.0, 1000), 400.0, 1010)  # too slow for the client's clock
    assert not pcp.epoch_ok((100.0, 1000), 101.0, 1500)  # too fast


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1200))
def test_fuzz_decode_raises_only_pcp_error(data: bytes) -> None:
    try:
        resp = pcp.decode_response(data)
    except pcp.PcpError:
        return
    assert resp.opcode in range(128)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=60, max_size=60), st.integers(0, 59), st.integers(0, 255))
def test_fuzz_mutated_answers(base: bytes, index: int, value: int) -> None:
    data = bytearray(response())
    data[index] = value
    try:
        resp = pcp.decode_response(bytes(data))
    except pcp.PcpError:
        return
    if resp.ok and resp.opcode == pcp.OP_MAP and resp.lifetime:
        assert resp.external_port and resp.external_ip not in ("0.0.0.0", "::")


@given(st.ip_addresses())
def test_ip_roundtrip(ip) -> None:  # type: ignore[no-untyped-def]
    mapped = getattr(ip, "ipv4_mapped", None)
    expected = str(mapped) if mapped is not None else str(ip)  # IPv4-mapped come back IPv4
    assert pcp.decode_ip(pcp.encode_ip(str(ip))) == expected
