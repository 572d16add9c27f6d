"""Field checks for the signalling messages' JSON (pure; used by :mod:`.signalling`).

Each check takes ``(value, field name)`` and returns the value, or raises
:class:`ProtocolError` with the error code to send back (``bad-message`` or ``too-large``).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["LONG", "MAX_BLOB_SIZE", "MAX_SESSION", "SESSION", "SHORT", "U53", "ProtocolError",
           "bad", "blob", "boolean", "hexbytes", "integer", "name", "owner", "ports", "string",
           "valid_name"]

#: Largest accepted offer/answer/data object, in bytes of compact JSON (``too-large``).
MAX_BLOB_SIZE = 8 * 1024
MAX_SESSION = 0xFFFFFFFF
E_BAD_MESSAGE = "bad-message"
E_TOO_LARGE = "too-large"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_OWNER_RE = re.compile(r"[0-9a-fA-F]{64}")
SHORT = 256  # token, agent, reason, code, addr
LONG = 1024  # error message


class ProtocolError(Exception):
    """A message could not be decoded (or encoded).

    Attributes:
        code: one of the error-code constants (``bad-message``, ``too-large`` ...).
        message: human-readable detail, safe to send back to the peer.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def valid_name(name: object) -> bool:
    """True if ``name`` is a str of 1-64 characters from ``[A-Za-z0-9._-]``."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def bad(msg: str) -> ProtocolError:
    return ProtocolError(E_BAD_MESSAGE, msg)


def integer(lo: int, hi: int):
    def check(v: Any, f: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(f"field {f!r} must be an integer")
        if not lo <= v <= hi:
            raise bad(f"field {f!r} out of range [{lo}, {hi}]")
        return v

    return check


def string(limit: int, *, optional: bool = False):
    def check(v: Any, f: str) -> str | None:
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise bad(f"field {f!r} must be a string")
        if len(v) > limit:
            raise ProtocolError(E_TOO_LARGE, f"field {f!r} longer than {limit} characters")
        return v

    return check


def name(v: Any, f: str) -> str:
    if not valid_name(v):
        raise bad(f"field {f!r} must be 1-64 characters of [A-Za-z0-9._-]")
    return v


def owner(v: Any, f: str) -> str:
    if not isinstance(v, str) or _OWNER_RE.fullmatch(v) is None:
        raise bad(f"field {f!r} must be 64 hex characters")
    return v


def hexbytes(size: int):
    """A check for ``size`` bytes written as lowercase or uppercase hex."""
    pattern = re.compile(rf"[0-9a-fA-F]{{{2 * size}}}")

    def check(v: Any, f: str) -> str:
        if not isinstance(v, str) or pattern.fullmatch(v) is None:
            raise bad(f"field {f!r} must be {2 * size} hex characters")
        return v

    return check


def blob(v: Any, f: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise bad(f"field {f!r} must be an object")
    size = len(json.dumps(v, separators=(",", ":")).encode("utf-8"))
    if size > MAX_BLOB_SIZE:
        raise ProtocolError(E_TOO_LARGE, f"field {f!r} is {size} bytes (max {MAX_BLOB_SIZE})")
    return v


def boolean(v: Any, f: str) -> bool:
    if not isinstance(v, bool):
        raise bad(f"field {f!r} must be a boolean")
    return v


def ports(v: Any, f: str) -> list[int]:
    if not isinstance(v, list) or len(v) > 8:
        raise bad(f"field {f!r} must be a list of at most 8 ports")
    check = integer(0, 0xFFFF)
    return [check(p, f) for p in v]


SESSION = integer(0, MAX_SESSION)
U53 = integer(0, 2**53 - 1)


