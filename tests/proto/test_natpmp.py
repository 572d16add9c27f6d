"""NAT-PMP codec (quictun.proto.natpmp): RFC 6886 layouts, refusals, hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto import natpmp


def test_requests() -> None:
    assert natpmp.external_address_request() == b"\x00\x00"
    req = natpmp.map_request(40000, lifetime=300, suggested_port=40001)
    assert req == struct.pack("!BBHHHI", 0, 1, 0, 40000, 40001, 300)
    assert natpmp.map_request(40000, lifetime=300, tcp=True)[1] == 2
    assert natpmp.delete_request(40000) == struct.pack("!BBHHHI", 0, 1, 0, 40000, 0, 0)


@pytest.mark.parametrize("kwargs", [
    {"internal_port": 0}, {"internal_port": 65536}, {"lifetime": -1},
    {"lifetime": 1 << 32}, {"suggested_port": 65536},
    {"lifetime": 0, "suggested_port": 5},  # a delete suggests no port (§3.4)
])
def test_map_request_rejects(kwargs: dict) -> None:
    args = {"internal_port": 40000, "lifetime": 10}
    args.update(kwargs)
    with pytest.raises(natpmp.NatPmpError):
        natpmp.map_request(args.pop("internal_port"), **args)


def test_decode_external_address() -> None:
    resp = natpmp.decode_response(b"\x00\x80\x00\x00" + struct.pack("!I", 42)
                                  + bytes([198, 18, 0, 11]))
    assert resp.ok and resp.external_ip == "198.18.0.11" and resp.epoch == 42


def test_decode_mapping_and_deletion() -> None:
    resp = natpmp.decode_response(struct.pack("!BBHIHHI", 0, 129, 0, 7, 40000, 41000, 300))
    assert (resp.internal_port, resp.external_port, resp.lifetime) == (40000, 41000, 300)
    gone = natpmp.decode_response(struct.pack("!BBHIHHI", 0, 129, 0, 7, 40000, 0, 0))
    assert gone.ok and gone.external_port == 0 and gone.lifetime == 0


def test_decode_refusals() -> None:
    short = natpmp.decode_response(struct.pack("!BBHI", 0, 129, 2, 7))
    assert not short.ok and short.result_name == "NOT_AUTHORIZED" and short.lifetime is None
    full = natpmp.decode_response(struct.pack("!BBHIHHI", 0, 129, 4, 7, 40000, 0, 0))
    assert full.result_name == "OUT_OF_RESOURCES"
    odd = natpmp.decode_response(struct.pack("!BBHI", 0, 128 + 9, 5, 7))
    assert odd.result == natpmp.ResultCode.UNSUPPORTED_OPCODE
    assert natpmp.decode_response(struct.pack("!BBHI", 0, 129, 999, 1)).result_name == (
        "result 999")


@pytest.mark.parametrize("data, why", [
    (b"\x00\x80", "shorter"),
    (b"\x02" + bytes(15), "version 2"),  # a PCP message
    (struct.pack("!BBHIHHI", 0, 1, 0, 7, 40000, 41000, 300), "request"),
    (struct.pack("!BBHIHHI", 0, 129, 0, 7, 40000, 41000, 300) + b"x", "16 bytes"),
    (struct.pack("!BBHI", 0, 129, 0, 7), "16 bytes"),  # success without the mapping
    (struct.pack("!BBHIHHI", 0, 129, 0, 7, 40000, 0, 300), "without a port"),
    (struct.pack("!BBHIHHI", 0, 129, 0, 7, 0, 41000, 300), "without a port"),
    (struct.pack("!BBHI", 0, 128 + 9, 0, 7), "unknown opcode"),
    (b"\x00\x80\x00\x00" + bytes(4) + bytes(3), "12 bytes"),
])
def test_decode_rejects(data: bytes, why: str) -> None:
    with pytest.raises(natpmp.NatPmpError, match=why):
        natpmp.decode_response(data)


def test_epoch_check() -> None:
    assert natpmp.epoch_ok(None, 0.0, 0)
    assert natpmp.epoch_ok((10.0, 100), 20.0, 110)
    assert natpmp.epoch_ok((10.0, 100), 20.0, 107)  # 7/8 of 10 s, less 2 s of slack
    assert not natpmp.epoch_ok((10.0, 100), 20.0, 104)
    assert not natpmp.epoch_ok((10.0, 100), 20.0, 1)  # rebooted


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_decode_raises_only_natpmp_error(data: bytes) -> None:
    try:
        resp = natpmp.decode_response(data)
    except natpmp.NatPmpError:
        return
    if resp.ok and resp.lifetime:
        assert resp.external_port and resp.internal_port
