"""The local proxy entry's two dialects, SOCKS5 (RFC 1928) and HTTP CONNECT (pure).

The asyncio side (:mod:`quictun.aio.socks`) buffers what a local client sends and calls
:func:`parse` until it returns a :class:`Request` (or raises :class:`SocksError`); it
writes each ``reply`` bytes it is given. One port speaks both: the first byte decides
(``0x05`` SOCKS5; a letter, HTTP). Only CONNECT and "no authentication" are offered
(the listener binds to loopback by default); SOCKS4, BIND and UDP ASSOCIATE are refused
with the proper reply.

The serving side's verdict comes back as a :mod:`quictun.proto.control` status, which
:func:`socks_reply` and :func:`http_reply` turn into the client's reply. The SOCKS
statuses share RFC 1928's numbers (2 not allowed by ruleset, 3 network unreachable,
4 host unreachable, 5 connection refused, 6 TTL expired, 7 command not supported,
8 address type not supported).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import control

__all__ = ["HTTP", "SOCKS5", "Greeting", "Request", "SocksError", "http_reply", "parse",
           "socks_reply"]

SOCKS5 = "socks5"
HTTP = "http"
HTTP_LIMIT = 8192
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4, ATYP_NAME, ATYP_IPV6 = 0x01, 0x03, 0x04

_HTTP_STATUS = {
    control.ST_OK: "200 Connection established",
    control.ST_NOT_ALLOWED: "403 Forbidden",
    control.ST_TIMEOUT: "504 Gateway Timeout",
    control.ST_BAD_ADDRESS: "400 Bad Request",
    control.ST_NOT_SUPPORTED: "405 Method Not Allowed",
}


class SocksError(ValueError):
    """The client spoke nonsense or asked for something unsupported: write ``reply``
    (may be empty) and close. ``text`` says why, for the log."""

    def __init__(self, text: str, reply: bytes = b"") -> None:
        super().__init__(text)
        self.reply = reply


@dataclass(frozen=True)
class Greeting:
    """SOCKS5's method negotiation is done: write ``reply`` and parse on."""

    reply: bytes
    consumed: int


@dataclass(frozen=True)
class Request:
    """A complete CONNECT request. ``consumed`` bytes of the buffer belong to it (what
    follows is the client's first data)."""

    dialect: str
    host: str
    port: int
    consumed: int


def parse(buf: bytes, greeted: bool) -> Greeting | Request | None:
    """The next step for the bytes a local client sent so far (None: need more).

    ``greeted``: a SOCKS5 greeting was already answered (the buffer starts with the
    request). Raises :class:`SocksError`."""
    if not buf:
        return None
    if greeted:
        return _socks_request(buf)
    first = buf[0]
    if first == 0x05:
        return _socks_greeting(buf)
    if first == 0x04:
        # SOCKS4 reply: VN 0, CD 91 (rejected)
        raise SocksError("SOCKS4 is not supported (use SOCKS5)", b"\x00\x5b" + bytes(6))
    if 0x41 <= first <= 0x7A:
        return _http_request(buf)
    raise SocksError(f"not SOCKS5 or HTTP (first byte 0x{first:02x})")


def _socks_greeting(buf: bytes) -> Greeting | None:
    if len(buf) < 2:
        return None
    n = buf[1]
    if n == 0:
        raise SocksError("SOCKS5 greeting offers no method", b"\x05\xff")
    if len(buf) < 2 + n:
        return None
    if NO_AUTH not in buf[2:2 + n]:
        raise SocksError("the SOCKS5 client insists on authentication (only "
                         "'no authentication' is offered)", bytes([5, NO_ACCEPTABLE]))
    return Greeting(bytes([5, NO_AUTH]), 2 + n)


def _socks_request(buf: bytes) -> Request | None:
    if len(buf) < 5:
        return None
    ver, cmd, _rsv, atyp = buf[0], buf[1], buf[2], buf[3]
    if ver != 5:
        raise SocksError(f"bad SOCKS version {ver} in the request")
    if cmd != CMD_CONNECT:
        raise SocksError(f"SOCKS5 command {cmd} is not supported (only CONNECT)",
                         socks_reply(control.ST_NOT_SUPPORTED))
    if atyp == ATYP_IPV4:
        end = 4 + 4
        host = lambda: str(ipaddress.IPv4Address(buf[4:8]))  # noqa: E731
    elif atyp == ATYP_IPV6:
        end = 4 + 16
        host = lambda: str(ipaddress.IPv6Address(buf[4:20]))  # noqa: E731
    elif atyp == ATYP_NAME:
        end = 5 + buf[4]
        host = lambda: buf[5:end].decode("ascii", "replace")  # noqa: E731
    else:
        raise SocksError(f"SOCKS5 address type {atyp} is not supported",
                         socks_reply(control.ST_BAD_ADDRESS))
    if len(buf) < end + 2:
        return None
    port = int.from_bytes(buf[end:end + 2], "big")
    return Request(SOCKS5, host(), port, end + 2)


def _http_request(buf: bytes) -> Request | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > HTTP_LIMIT:
            raise SocksError("HTTP request head too long", http_reply(control.ST_BAD_ADDRESS))
        return None
    line = buf[:buf.find(b"\r\n")].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise SocksError(f"bad HTTP request line {line[:80]!r}",
                         http_reply(control.ST_BAD_ADDRESS))
    if parts[0] != "CONNECT":
        raise SocksError(f"HTTP {parts[0][:16]} is not supported (only CONNECT)",
                         http_reply(control.ST_NOT_SUPPORTED))
    host, sep, port_s = parts[1].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port_s.isdigit() or not host:
        raise SocksError(f"CONNECT {parts[1][:80]!r}: not HOST:PORT",
                         http_reply(control.ST_BAD_ADDRESS))
    return Request(HTTP, host, int(port_s), end + 4)


def socks_reply(status: int) -> bytes:
    """The SOCKS5 reply for a control status (BND.ADDR 0.0.0.0:0: not meaningful here)."""
    if status == control.ST_OK:
        rep = 0
    elif 2 <= status <= 8:
        rep = status
    elif status == control.ST_NAME_NOT_FOUND:
        rep = 4
    else:
        rep = 1
    return bytes([5, rep, 0, ATYP_IPV4]) + bytes(6)


def http_reply(status: int) -> bytes:
    """The HTTP response head for a control status."""
    text = _HTTP_STATUS.get(status, "502 Bad Gateway")
    return f"HTTP/1.1 {text}\r\n\r\n".encode() if status == control.ST_OK else (
        f"HTTP/1.1 {text}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
