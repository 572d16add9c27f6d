"""Moving a session to a new relay connection, authenticated (pure crypto).

Theory of operation
-------------------
A peer's relay connection can die under a live session: a home router that reboots or
a carrier NAT that flushes its table moves every mapping, TCP included, so the
WebSocket breaks while both peers are fine. The peer then opens a new connection and
asks the relay to move its half of the session there (``resume``). The relay must not
let anyone else do that: a stranger who names the session id would take the relay path
away from its member (the tunnel's data stays end-to-end encrypted, but the stranger
could cut it).

So each peer, once its session is confirmed, gives the relay the public half of a
**resume key** (``resumable``): an Ed25519 key derived from the session's SPAKE2 keys
(:meth:`~quictun.proto.pake.SessionKeys.resume_seed`; one per role, nobody but the two
peers can derive it). To resume, the peer signs :func:`resume_signed`, which binds the
new connection's ``welcome`` challenge and the session id; the relay checks the
signature against the key it was given (:func:`verify_resume`). A recorded ``resume``
is useless on any other connection (another challenge), and the relay learns nothing
that helps it guess the secret: the key is random-looking and single-purpose.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .identity import verify_signature

__all__ = ["ResumeKey", "resume_signed", "verify_resume"]

_LABEL = b"quictun/2 resume"


def resume_signed(challenge: bytes, session: int) -> bytes:
    """What a peer signs to move ``session`` to the connection whose ``welcome`` carried
    ``challenge``: ``lp(label) || lp(challenge) || session (4 bytes, big-endian)``."""
    if not 0 <= session <= 0xFFFFFFFF:
        raise ValueError("session must be a u32")
    return b"".join(len(p).to_bytes(4, "big") + p
                    for p in (_LABEL, bytes(challenge))) + session.to_bytes(4, "big")


def verify_resume(public: bytes, signature: bytes, challenge: bytes, session: int) -> bool:
    """Whether ``signature`` is the holder of ``public``'s resume signature for
    ``session`` on the connection of ``challenge``. Never raises for bad input."""
    if len(public) != 32 or len(signature) != 64 or not 0 <= session <= 0xFFFFFFFF:
        return False
    return verify_signature(bytes(public), bytes(signature), resume_signed(challenge, session))


class ResumeKey:
    """One peer's resume key for one session, from its 32-byte ``seed``."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("a resume key seed is 32 bytes")
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(seed))
        self.public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        """The raw 32-byte public key the relay is given (``resumable.key``)."""

    def sign(self, challenge: bytes, session: int) -> bytes:
        """The ``resume.sig`` for ``session`` on the connection of ``challenge``."""
        return self._key.sign(resume_signed(challenge, session))

    def __repr__(self) -> str:
        return f"ResumeKey(public={self.public.hex()[:16]}…)"
