"""The owner token a server registers its name with (relay protocol 1's ``register``).

It proves to the relay that the same identity comes back (after a restart or a network
blip), without revealing the identity key: ``HMAC(identity private key, "owner", name)``.
The peers' own authentication is :mod:`quictun.proto.pake`.
"""

from __future__ import annotations

import hashlib
import hmac


def _mac(key: bytes, *parts: bytes | str) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return h.digest()


def owner_token(identity_private: bytes, name: str) -> str:
    """The value a server registers ``name`` with (64 hex characters)."""
    return _mac(identity_private, "owner", name).hex()
