"""SOCKS5 (RFC 1928) and HTTP CONNECT, bytes in, requests and replies out."""

from __future__ import annotations

import pytest

from quictun.proto import control
from quictun.proto.socks import (
    HTTP,
    SOCKS5,
    Greeting,
    Request,
    SocksError,
    http_reply,
    parse,
    socks_reply,
)


def test_socks5_greeting_then_request_byte_by_byte() -> None:
    greeting = b"\x05\x02\x02\x00"
    for i in range(len(greeting)):
        assert parse(greeting[:i], greeted=False) is None
    assert parse(greeting, greeted=False) == Greeting(b"\x05\x00", 4)
    req = b"\x05\x01\x00\x03\x07nas.lan\x01\xbb" + b"first data"
    for i in range(1, 4 + 1 + 7 + 2):
        assert parse(req[:i], greeted=True) is None
    assert parse(req, greeted=True) == Request(SOCKS5, "nas.lan", 443, 14)


def test_socks5_address_types() -> None:
    v4 = b"\x05\x01\x00\x01\x0a\x00\x00\x05\x00\x16"
    assert parse(v4, True) == Request(SOCKS5, "10.0.0.5", 22, 10)
    v6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50"
    assert parse(v6, True) == Request(SOCKS5, "::1", 80, 22)
    with pytest.raises(SocksError) as exc:
        parse(b"\x05\x01\x00\x09\x00\x00", True)
    assert exc.value.reply[1] == 8  # address type not supported


@pytest.mark.parametrize(("cmd", "name"), [(2, "BIND"), (3, "UDP ASSOCIATE")])
def test_socks5_other_commands_get_command_not_supported(cmd: int, name: str) -> None:
    with pytest.raises(SocksError, match=f"command {cmd}") as exc:
        parse(bytes([5, cmd, 0, 1, 10, 0, 0, 1, 0, 80]), True)
    assert exc.value.reply[:2] == b"\x05\x07"


def test_socks5_authentication_only_clients_are_told_no_method() -> None:
    with pytest.raises(SocksError) as exc:
        parse(b"\x05\x01\x02", False)
    assert exc.value.reply == b"\x05\xff"


def test_socks4_and_garbage() -> None:
    with pytest.raises(SocksError, match="SOCKS4"):
        parse(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", False)
    with pytest.raises(SocksError, match="first byte 0x16"):
        parse(b"\x16\x03\x01", False)  # a TLS ClientHello


def test_http_connect() -> None:
    head = b"CONNECT nas.lan:443 HTTP/1.1\r\nHost: nas.lan:443\r\n\r\n"
    assert parse(head[:-1], False) is None
    assert parse(head + b"tls", False) == Request(HTTP, "nas.lan", 443, len(head))
    v6 = b"CONNECT [2001:db8::1]:22 HTTP/1.1\r\n\r\n"
    assert parse(v6, False) == Request(HTTP, "2001:db8::1", 22, len(v6))
    with pytest.raises(SocksError, match="only CONNECT") as exc:
        parse(b"GET http://x/ HTTP/1.1\r\n\r\n", False)
    assert exc.value.reply.startswith(b"HTTP/1.1 405")
    with pytest.raises(SocksError, match="not HOST:PORT"):
        parse(b"CONNECT nas.lan HTTP/1.1\r\n\r\n", False)
    with pytest.raises(SocksError, match="too long"):
        parse(b"CONNECT " + b"a" * 9000, False)


def test_replies_carry_the_servers_verdict() -> None:
    assert socks_reply(control.ST_OK) == b"\x05\x00\x00\x01" + bytes(6)
    assert socks_reply(control.ST_NOT_ALLOWED)[1] == 2
    assert socks_reply(control.ST_REFUSED)[1] == 5
    assert socks_reply(control.ST_NAME_NOT_FOUND)[1] == 4
    assert socks_reply(control.ST_UNKNOWN_SERVICE)[1] == 1
    assert http_reply(control.ST_OK) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert http_reply(control.ST_NOT_ALLOWED).startswith(b"HTTP/1.1 403 ")
    assert http_reply(control.ST_REFUSED).startswith(b"HTTP/1.1 502 ")
