"""Ticket text, format 2 with a checksum; format 1 still read (pure codec).

Theory of operation
-------------------
A ticket is everything a connecting machine needs, as one word to paste: the relay URL,
the tunnel name, the secret, the server's identity fingerprint (which the client pins)
and, from format 2 on, the server's box key (which lets the client send a hint, see
:mod:`quictun.proto.pake`).

Format 2: ``qt2`` + unpadded lowercase base32 (RFC 4648) of ``payload || crc``::

    payload = flags (1 byte; bit 0: a box key follows the fingerprint)
              | len(url) (1) | url (UTF-8) | len(name) (1) | name (ASCII)
              | len(secret) (1) | secret (UTF-8) | fingerprint (32 bytes)
              | box key (32 bytes, if flag bit 0)
    crc     = CRC-32 (zlib) of b"qt2" + payload, 4 bytes big-endian

Every single-character substitution in the base32 body changes at most 5 adjacent bits
of ``payload || crc``, a burst that CRC-32 always detects; a substitution that only
touches the unused low bits of the last character is caught by requiring the canonical
encoding. So one typo is always "this ticket is damaged (checksum)", never a wrong ticket
accepted (tests/proto/test_ticket.py tries every substitution of a sample).

Format 1 (``qt1`` + base32 of a JSON object ``{"u","n","s","f"}``, no checksum) is still
decoded, and :meth:`Ticket.encode` always writes format 2.

:func:`decode` forgives what copying does to text: surrounding whitespace and quotes,
whitespace and line breaks inside, upper case (base32 has one case), ``=`` padding.
Everything else raises :class:`TicketError` with one line that says what to do.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from dataclasses import dataclass

from ..errors import TunnelError
from .addr import parse_relay_url

__all__ = ["VERSION", "InvalidName", "Ticket", "TicketError", "check_name", "decode",
           "looks_like_ticket", "normalise"]

PREFIX = "qt"
VERSION = 2
_FLAG_BOX = 0x01
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb<>"
_TEXT_RE = re.compile(r"qt(\d)([a-z2-7]+)")  # versions are one digit, 1-9
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DAMAGED = "this ticket is damaged (checksum): copy it again, whole"


class TicketError(ValueError):
    """The text is not a ticket this version can read (the message says why)."""


def _check_url(url: str) -> None:
    try:
        parse_relay_url(url)
    except TunnelError as exc:
        raise TicketError(f"this ticket carries a {exc}") from None


def _check_fields(url: str, name: str, secret: str, fingerprint: str) -> None:
    _check_url(url)
    if not _NAME_RE.fullmatch(name) or not name.strip("."):
        raise TicketError("this ticket carries an invalid tunnel name")
    if not secret or not secret.isprintable():
        raise TicketError("this ticket carries an empty or unprintable secret")
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise TicketError("this ticket carries an invalid fingerprint")


@dataclass(frozen=True)
class Ticket:
    """A decoded ticket. ``box_key`` is None for format-1 tickets."""

    url: str
    name: str
    secret: str
    fingerprint: str  # 64 lowercase hex
    box_key: bytes | None = None

    def encode(self) -> str:
        """Format-2 text.

        Raises:
            TicketError: a field cannot be written (too long, invalid).
        """
        _check_fields(self.url, self.name, self.secret, self.fingerprint)
        fields = [self.url.encode(), self.name.encode(), self.secret.encode()]
        if any(len(f) > 255 for f in fields):
            raise TicketError("a ticket field is longer than 255 bytes")
        if self.box_key is not None and len(self.box_key) != 32:
            raise TicketError("a box key is 32 bytes")
        payload = bytes([_FLAG_BOX if self.box_key is not None else 0])
        payload += b"".join(bytes([len(f)]) + f for f in fields)
        payload += bytes.fromhex(self.fingerprint) + (self.box_key or b"")
        crc = zlib.crc32(b"qt2" + payload).to_bytes(4, "big")
        return "qt2" + base64.b32encode(payload + crc).decode().rstrip("=").lower()

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"Ticket(url={self.url!r}, name={self.name!r}, fingerprint={self.fingerprint!r})"


def normalise(text: str) -> str:
    """``text`` as a ticket's canonical spelling: without surrounding whitespace and
    quotes, without whitespace inside, lower case, without ``=`` padding."""
    t = text.strip().strip(_QUOTES + " \t\r\n")
    return re.sub(r"\s+", "", t).lower().rstrip("=")


def looks_like_ticket(text: str) -> bool:
    """True if ``text`` is spelt like a ticket (it may still be damaged)."""
    return isinstance(text, str) and bool(_TEXT_RE.fullmatch(normalise(text))) \
        and len(normalise(text)) > 40


def _b32(body: str) -> bytes:
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise TicketError(_DAMAGED) from None
    if base64.b32encode(raw).decode().rstrip("=").lower() != body:
        raise TicketError(_DAMAGED)  # stray bits in the last character
    return raw


def _decode_v1(body: str) -> Ticket:
    try:
        obj = json.loads(_b32(body))
        t = Ticket(url=obj["u"], name=obj["n"], secret=obj["s"], fingerprint=obj["f"])
    except (ValueError, KeyError, TypeError, TicketError):
        raise TicketError("this ticket is damaged (copy it again, whole)") from None
    if not all(isinstance(v, str) for v in (t.url, t.name, t.secret, t.fingerprint)):
        raise TicketError("this ticket is damaged (copy it again, whole)")
    _check_url(t.url)
    return t


def _take(raw: bytes, at: int) -> tuple[bytes, int]:
    n = raw[at]
    if at + 1 + n > len(raw):
        raise IndexError
    return raw[at + 1:at + 1 + n], at + 1 + n


def _decode_v2(body: str) -> Ticket:
    raw = _b32(body)
    if len(raw) < 4 + 1 + 3 + 32:
        raise TicketError(_DAMAGED)
    payload, crc = raw[:-4], raw[-4:]
    if zlib.crc32(b"qt2" + payload).to_bytes(4, "big") != crc:
        raise TicketError(_DAMAGED)
    try:
        flags = payload[0]
        url, at = _take(payload, 1)
        name, at = _take(payload, at)
        secret, at = _take(payload, at)
        rest = payload[at:]
        want = 32 + (32 if flags & _FLAG_BOX else 0)
        if flags & ~_FLAG_BOX or len(rest) != want:
            raise ValueError
        t = Ticket(url.decode(), name.decode("ascii"), secret.decode(), rest[:32].hex(),
                   rest[32:] if flags & _FLAG_BOX else None)
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        raise TicketError("this ticket is well-formed but its contents are not: it was "
                          "made by a broken program") from None
    _check_fields(t.url, t.name, t.secret, t.fingerprint)
    return t


def decode(text: str) -> Ticket:
    """Parse a ticket (format 1 or 2). Raises :class:`TicketError` with a one-line reason:
    not a ticket, another format version (upgrade), or damaged (checksum)."""
    if not isinstance(text, str) or len(text) > 8192:
        raise TicketError("this is not a quictun ticket (it should start with 'qt2')")
    t = normalise(text)
    m = _TEXT_RE.fullmatch(t)
    if not m:
        head = re.match(r"qt\d", t)
        if head:
            bad = sorted(set(re.sub(r"[a-z2-7]", "", t[head.end():]))) or ["?"]
            raise TicketError(f"this ticket is damaged (it contains {''.join(bad)!r}, "
                              "which tickets never do): copy it again, whole")
        raise TicketError("this is not a quictun ticket (it should start with 'qt2')")
    version = int(m.group(1))
    if version == 1:
        return _decode_v1(m.group(2))
    if version == VERSION:
        return _decode_v2(m.group(2))
    raise TicketError(f"this ticket has format version {version}; this quictun reads "
                      f"versions 1 and {VERSION} (upgrade quictun on this machine)")


class InvalidName(ValueError):
    """A name that cannot be a tunnel name (or a file name in the config dir)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid tunnel name, else raise :class:`InvalidName`.

    Valid: :func:`quictun.proto.signalling.valid_name` and not only dots (``.`` and ``..`` would
    name directories, not files, under the config dir)."""
    from .signalling import valid_name

    if not valid_name(name) or not name.strip("."):
        raise InvalidName(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -, "
                          "not only dots)")
    return name
