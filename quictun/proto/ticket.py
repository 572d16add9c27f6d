"""Tickets: everything a connecting peer needs, in one pasteable string.

Format ``qt1<base32>``: ``qt`` + the format version + unpadded lowercase base32 of a
JSON object ``{"u": relay URL, "n": name, "s": secret, "f": server fingerprint}``.
Base32 keeps it one word for a terminal's double-click. Later versions use another
digit; this module names the version it cannot read instead of failing obscurely.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from ..errors import TunnelError
from .addr import parse_relay_url

PREFIX = "qt"
VERSION = 1
_RE = re.compile(r"^qt(\d+)([a-z2-7]+)$")


class TicketError(ValueError):
    """The text is not a ticket this version can read (message says why)."""


@dataclass(frozen=True)
class Ticket:
    url: str
    name: str
    secret: str
    fingerprint: str

    def encode(self) -> str:
        raw = json.dumps(
            {"u": self.url, "n": self.name, "s": self.secret, "f": self.fingerprint},
            separators=(",", ":"),
        ).encode()
        return f"{PREFIX}{VERSION}" + base64.b32encode(raw).decode().rstrip("=").lower()


def looks_like_ticket(text: str) -> bool:
    return bool(_RE.match(text)) and len(text) > 40


def decode(text: str) -> Ticket:
    """Parse a ticket. Raises :class:`TicketError` with a one-line reason."""
    m = _RE.match(text.strip())
    if not m:
        raise TicketError("this is not a quictun ticket (it should start with 'qt1')")
    version = int(m.group(1))
    if version != VERSION:
        raise TicketError(
            f"this ticket has format version {version}; this quictun reads version "
            f"{VERSION} (upgrade quictun on this machine)"
        )
    body = m.group(2).upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
        obj = json.loads(raw)
        t = Ticket(url=obj["u"], name=obj["n"], secret=obj["s"], fingerprint=obj["f"])
    except (ValueError, KeyError, TypeError):
        raise TicketError("this ticket is damaged (copy it again, whole)") from None
    if not all(isinstance(v, str) for v in (t.url, t.name, t.secret, t.fingerprint)):
        raise TicketError("this ticket is damaged (copy it again, whole)")
    try:
        parse_relay_url(t.url)
    except TunnelError as exc:
        raise TicketError(f"this ticket carries a {exc}") from None
    return t


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
