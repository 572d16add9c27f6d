"""A small, pure STUN codec (RFC 8489), shared by the relay's reflector and the client.

Theory of operation
-------------------
A STUN message is a 20-byte header (type, length, magic cookie, 12-byte transaction
id) followed by TLV attributes padded to 4 bytes. :func:`decode` is strict: it raises
:class:`StunError` on anything malformed (wrong cookie, length not matching the
datagram, truncated attribute or padding, bad FINGERPRINT), so callers can treat a
successful decode as "a well-formed STUN message". It never checks integrity: use
:func:`verify_integrity` with the key you expect.

:func:`encode` appends MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6) when a key is given
and then FINGERPRINT (§14.7). No I/O, no clock, no randomness: transaction ids are
supplied by the caller (``os.urandom(12)``).

Demultiplexing (RFC 7983 as updated by RFC 9443): :func:`is_stun` is true for
datagrams whose first byte is 0-3, length >= 20 and that carry the magic cookie;
QUIC packets start with a byte >= 64.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAGIC_COOKIE",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_USERNAME",
    "ATTR_MESSAGE_INTEGRITY",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_PRIORITY",
    "ATTR_MESSAGE_INTEGRITY_SHA256",
    "ATTR_FINGERPRINT",
    "ATTR_SOFTWARE",
    "ATTR_PADDING",
    "StunError",
    "StunMessage",
    "is_stun",
    "encode",
    "decode",
    "verify_integrity",
    "encode_xor_address",
    "decode_xor_address",
    "encode_address",
    "decode_address",
    "binding_request",
    "binding_success",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_SIZE = 20
FINGERPRINT_XOR = 0x5354554E

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PRIORITY = 0x0024
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C
ATTR_FINGERPRINT = 0x8028
ATTR_SOFTWARE = 0x8022
ATTR_PADDING = 0x0026  # RFC 5780 §7.6: pads a message to a chosen size (path MTU probes)

_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02
_MAX_USERNAME = 513  # RFC 8489 §14.3: < 509 bytes; be slightly lenient.


class StunError(ValueError):
    """Raised by :func:`decode` and the address helpers for malformed input."""


def is_stun(data: bytes) -> bool:
    """Return True if ``data`` looks like a STUN message (RFC 7983/9443 demux rule).

    Only the cheap header checks are made; call :func:`decode` for a full parse.
    """
    return len(data) >= HEADER_SIZE and data[0] < 4 and data[4:8] == _COOKIE_BYTES


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass(frozen=True)
class StunMessage:
    """A decoded STUN message.

    Attributes:
        msg_type: the 14-bit message type (method and class), e.g. ``BINDING_REQUEST``.
        txid: the 12-byte transaction id.
        attrs: raw ``(type, value)`` pairs in wire order, padding stripped.
    """

    msg_type: int
    txid: bytes
    attrs: tuple[tuple[int, bytes], ...]

    def get(self, attr_type: int) -> bytes | None:
        """Return the value of the first attribute of ``attr_type``, or None."""
        for t, v in self.attrs:
            if t == attr_type:
                return v
        return None

    @property
    def xor_mapped_address(self) -> tuple[str, int] | None:
        """The reflexive address: XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS, else None.

        Returns None (never raises) if the attribute is present but malformed.
        """
        value = self.get(ATTR_XOR_MAPPED_ADDRESS)
        try:
            if value is not None:
                return decode_xor_address(value, self.txid)
            value = self.get(ATTR_MAPPED_ADDRESS)
            if value is not None:
                return decode_address(value)
        except StunError:
            return None
        return None

    @property
    def username(self) -> str | None:
        """The USERNAME attribute decoded as UTF-8, or None if absent or not UTF-8."""
        value = self.get(ATTR_USERNAME)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None


def _attr(attr_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * _pad(len(value))


def _header(msg_type: int, length: int, txid: bytes) -> bytes:
    return struct.pack("!HHI", msg_type, length, MAGIC_COOKIE) + txid


def _fingerprint(data: bytes) -> bytes:
    return struct.pack("!I", (zlib.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR)


def encode(
    msg_type: int,
    txid: bytes,
    attrs: Sequence[tuple[int, bytes]] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Encode a STUN message.

    Args:
        msg_type: 14-bit message type.
        txid: 12-byte transaction id.
        attrs: ``(type, value)`` pairs, written in order and padded.
        integrity_key: when given, MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, 32 bytes) is
            appended, computed over the message with the length field covering it.
        fingerprint: append FINGERPRINT (CRC-32 xor 0x5354554E) last.

    Raises:
        ValueError: bad txid length or message type, or an attribute over 65535 bytes.
    """
    if len(txid) != 12:
        raise ValueError("txid must be 12 bytes")
    if not 0 <= msg_type < 0x4000:
        raise ValueError("msg_type must be a 14-bit value")
    body = bytearray()
    for attr_type, value in attrs:
        if len(value) > 0xFFFF:
            raise ValueError("attribute value too long")
        body += _attr(attr_type, bytes(value))
    if integrity_key is not None:
        length = len(body) + 4 + 32
        mac = hmac.new(
            integrity_key, _header(msg_type, length, txid) + bytes(body), hashlib.sha256
        ).digest()
        body += _attr(ATTR_MESSAGE_INTEGRITY_SHA256, mac)
    if fingerprint:
        length = len(body) + 8
        crc = _fingerprint(_header(msg_type, length, txid) + bytes(body))
        body += _attr(ATTR_FINGERPRINT, crc)
    return _header(msg_type, len(body), txid) + bytes(body)


def _walk(data: bytes) -> list[tuple[int, int, int]]:
    """Validate the framing and return ``(type, value_offset, value_length)`` triples."""
    if len(data) < HEADER_SIZE:
        raise StunError("shorter than a STUN header")
    msg_type, length = struct.unpack_from("!HH", data, 0)
    if msg_type & 0xC000:
        raise StunError("top two bits of the message type are not zero")
    if data[4:8] != _COOKIE_BYTES:
        raise StunError("bad magic cookie")
    if length % 4:
        raise StunError("message length is not a multiple of 4")
    if HEADER_SIZE + length != len(data):
        raise StunError(f"length field {length} does not match datagram size {len(data)}")
    out: list[tuple[int, int, int]] = []
    pos = HEADER_SIZE
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunError("truncated attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + attr_len
        if end + _pad(attr_len) > len(data):
            raise StunError(f"truncated attribute 0x{attr_type:04x}")
        out.append((attr_type, pos + 4, attr_len))
        pos = end + _pad(attr_len)
    return out


def decode(data: bytes) -> StunMessage:
    """Parse a STUN message.

    Raises:
        StunError: not well-formed STUN, or FINGERPRINT present but wrong or not last.
    """
    data = bytes(data)
    walked = _walk(data)
    attrs: list[tuple[int, bytes]] = []
    for index, (attr_type, off, n) in enumerate(walked):
        value = data[off : off + n]
        if attr_type == ATTR_FINGERPRINT:
            if index != len(walked) - 1:
                raise StunError("FINGERPRINT is not the last attribute")
            if n != 4:
                raise StunError("FINGERPRINT has the wrong size")
            if value != _fingerprint(data[: off - 4]):
                raise StunError("bad FINGERPRINT")
        attrs.append((attr_type, value))
    txid = data[8:20]
    return StunMessage(msg_type=struct.unpack_from("!H", data)[0], txid=txid, attrs=tuple(attrs))


def verify_integrity(data: bytes, key: bytes, *, sha1: bool = False) -> bool:
    """Check the message-integrity attribute of the raw message ``data``.

    By default checks MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6); with ``sha1=True``
    checks the legacy MESSAGE-INTEGRITY (HMAC-SHA1, §14.5), e.g. for RFC 5769 vectors.
    The HMAC covers the message up to the attribute with the header length adjusted
    to end just after it. Returns False if the message is malformed, the attribute is
    absent, or the MAC differs (compared in constant time). Never raises.
    """
    want_type = ATTR_MESSAGE_INTEGRITY if sha1 else ATTR_MESSAGE_INTEGRITY_SHA256
    digest = hashlib.sha1 if sha1 else hashlib.sha256
    data = bytes(data)
    try:
        walked = _walk(data)
    except StunError:
        return False
    for attr_type, off, n in walked:
        if attr_type != want_type:
            continue
        if sha1 and n != 20:
            return False
        if not sha1 and not (16 <= n <= 32 and n % 4 == 0):
            return False
        start = off - 4
        adjusted = data[:2] + struct.pack("!H", start + 4 + n - HEADER_SIZE) + data[4:start]
        mac = hmac.new(key, adjusted, digest).digest()[:n]
        return hmac.compare_digest(mac, data[off : off + n])
    return False


def _normalize_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError as exc:
        raise StunError(f"not an IP address: {ip!r}") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port out of range: {port}")


def encode_address(ip: str, port: int) -> bytes:
    """Encode a plain (non-XOR) MAPPED-ADDRESS/OTHER-ADDRESS value.

    IPv4-mapped IPv6 addresses are written as IPv4.
    """
    _check_port(port)
    addr = _normalize_ip(ip)
    family = _FAMILY_V4 if addr.version == 4 else _FAMILY_V6
    return struct.pack("!BBH", 0, family, port) + addr.packed


def decode_address(value: bytes) -> tuple[str, int]:
    """Decode a plain MAPPED-ADDRESS value. Raises StunError if malformed."""
    if len(value) < 4:
        raise StunError("address attribute too short")
    _, family, port = struct.unpack_from("!BBH", value)
    raw = value[4:]
    if family == _FAMILY_V4 and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw)), port
    if family == _FAMILY_V6 and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw)), port
    raise StunError(f"bad address family {family} or length {len(value)}")


def _xor_mask(family: int, txid: bytes) -> bytes:
    return _COOKIE_BYTES if family == _FAMILY_V4 else _COOKIE_BYTES + txid


def encode_xor_address(ip: str, port: int, txid: bytes) -> bytes:
    """Encode an XOR-MAPPED-ADDRESS value (IPv4 or IPv6).

    IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are encoded as the IPv4 family.
    """
    if len(txid) != 12:
        raise ValueError("txid must be 12 bytes")
    _check_port(port)
    addr = _normalize_ip(ip)
    family = _FAMILY_V4 if addr.version == 4 else _FAMILY_V6
    xport = port ^ (MAGIC_COOKIE >> 16)
    xaddr = bytes(a ^ b for a, b in zip(addr.packed, _xor_mask(family, txid), strict=True))
    return struct.pack("!BBH", 0, family, xport) + xaddr


def decode_xor_address(value: bytes, txid: bytes) -> tuple[str, int]:
    """Decode an XOR-MAPPED-ADDRESS value. Raises StunError if malformed."""
    if len(value) < 4:
        raise StunError("address attribute too short")
    _, family, xport = struct.unpack_from("!BBH", value)
    raw = value[4:]
    expected = {_FAMILY_V4: 4, _FAMILY_V6: 16}.get(family)
    if expected is None or len(raw) != expected or len(txid) != 12:
        raise StunError(f"bad address family {family} or length {len(value)}")
    plain = bytes(a ^ b for a, b in zip(raw, _xor_mask(family, txid), strict=True))
    port = xport ^ (MAGIC_COOKIE >> 16)
    if family == _FAMILY_V4:
        return str(ipaddress.IPv4Address(plain)), port
    return str(ipaddress.IPv6Address(plain)), port


def binding_request(
    txid: bytes,
    *,
    username: str | None = None,
    key: bytes | None = None,
    extra: Sequence[tuple[int, bytes]] = (),
    pad_to: int | None = None,
) -> bytes:
    """Build a Binding request with optional USERNAME, extra attributes, integrity and
    FINGERPRINT (always).

    ``pad_to``: add a PADDING attribute (zeros, before the integrity attribute) so that
    the whole message is exactly ``pad_to`` bytes: a path MTU probe. Raises ValueError
    unless ``pad_to`` is a multiple of 4 leaving room for the attribute header.
    """
    attrs: list[tuple[int, bytes]] = []
    if username is not None:
        raw = username.encode("utf-8")
        if len(raw) > _MAX_USERNAME:
            raise ValueError("username too long")
        attrs.append((ATTR_USERNAME, raw))
    attrs.extend(extra)
    if pad_to is not None:
        used = HEADER_SIZE + sum(4 + len(v) + _pad(len(v)) for _t, v in attrs)
        used += (4 + 32 if key is not None else 0) + 8  # integrity, FINGERPRINT
        room = pad_to - used - 4
        if pad_to % 4 or room < 0:
            raise ValueError(f"cannot pad a Binding request to {pad_to} bytes")
        attrs.append((ATTR_PADDING, bytes(room)))
    return encode(BINDING_REQUEST, txid, attrs, integrity_key=key)


def binding_success(
    txid: bytes,
    mapped: tuple[str, int],
    *,
    key: bytes | None = None,
    extra: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """Build a Binding success response carrying XOR-MAPPED-ADDRESS for ``mapped``,
    then ``extra`` attributes, optional integrity, and FINGERPRINT."""
    attrs: list[tuple[int, bytes]] = [
        (ATTR_XOR_MAPPED_ADDRESS, encode_xor_address(mapped[0], mapped[1], txid))
    ]
    attrs.extend(extra)
    return encode(BINDING_SUCCESS, txid, attrs, integrity_key=key)
