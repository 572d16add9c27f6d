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
from pathlib import Path

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
    return t


def stored_secret(name: str) -> str:
    """The generated secret for ``name``: created once, then kept in the config dir
    (``$QUICTUN_HOME/secrets/NAME``, mode 600) so that restarts print the same ticket."""
    import secrets as _secrets

    from .identity import _write

    path = secret_path(name)
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = _secrets.token_urlsafe(32)
    _write(path, value.encode())
    return value


def secret_path(name: str) -> Path:
    """Where :func:`stored_secret` keeps the secret for ``name``."""
    from .identity import config_dir

    return config_dir() / "secrets" / name
