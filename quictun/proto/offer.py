"""The offer and the answer: the one message pair the two peers exchange through the relay.

The relay forwards both as opaque JSON objects (``connect.offer`` / ``answer.answer`` in
docs/protocol.md). Each is MAC'd with the root key both peers derive from the shared
secret (:func:`quictun.proto.auth.root_key`), so the relay can neither forge nor alter
one without being caught:

* the **offer** (connector -> server): the client's identity public key, a fresh nonce and
  its candidates. A wrong secret fails its MAC: the server refuses it before anything
  else happens.
* the **answer** (server -> connector): the server's identity fingerprint, a fresh nonce
  and its candidates, MAC'd together with the offer's nonce and key. The client pins the
  fingerprint it authenticated.

Wire form (JSON objects; every candidate is ``"kind ip port"``, see
:class:`~quictun.proto.addr.Candidate`)::

    offer  = {"v": 1, "pub": hex(32 bytes), "nonce": hex, "cands": [str, ...], "mac": hex}
    answer = {"v": 1, "fp": hex, "nonce": hex, "cands": [str, ...], "mac": hex}

Decoding checks the shape first (:class:`Malformed`), then the MAC (:class:`Forged`).
Pure: nonces come from the caller's random source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import auth

__all__ = ["VERSION", "Answer", "Forged", "Malformed", "Offer", "OfferError", "session_keys"]

VERSION = 1
NONCE_BYTES = 16


class OfferError(ValueError):
    """An offer or answer that must be refused (the message says why, for a log)."""


class Malformed(OfferError):
    """Not an offer/answer of this version: wrong shape or types."""


class Forged(OfferError):
    """Well-formed, but its MAC does not verify: another secret, or a tampering relay."""


def _strings(raw: object) -> tuple[str, ...] | None:
    if isinstance(raw, list) and all(isinstance(c, str) for c in raw):
        return tuple(raw)
    return None


@dataclass(frozen=True)
class Offer:
    """What the connector sends: who it is, a fresh nonce, where it may be reached."""

    client_pub: bytes
    """The client's raw 32-byte Ed25519 identity public key."""
    nonce: str
    """Hex of :data:`NONCE_BYTES` fresh random bytes (also the replay-detection key)."""
    cands: tuple[str, ...]
    """The client's candidates, in wire form (as MAC'd)."""

    @classmethod
    def create(cls, client_pub: bytes, cands: list[str],
               random_bytes: Callable[[int], bytes]) -> Offer:
        return cls(client_pub, random_bytes(NONCE_BYTES).hex(), tuple(cands))

    @property
    def pub_hex(self) -> str:
        return self.client_pub.hex()

    def to_wire(self, root: bytes) -> dict[str, object]:
        """The JSON object for ``connect.offer``, MAC'd with ``root``."""
        cands = list(self.cands)
        return {"v": VERSION, "pub": self.pub_hex, "nonce": self.nonce, "cands": cands,
                "mac": auth.offer_mac(root, self.nonce, self.pub_hex, cands)}

    @classmethod
    def from_wire(cls, raw: object, root: bytes) -> Offer:
        """Parse and verify ``incoming.offer``.

        Raises:
            Malformed: wrong shape, or a public key that is not 32 bytes of hex.
            Forged: the MAC does not verify under ``root`` (wrong secret).
        """
        if not isinstance(raw, dict):
            raise Malformed("the offer is not an object")
        pub, nonce, cands = raw.get("pub"), raw.get("nonce"), _strings(raw.get("cands"))
        if not (isinstance(pub, str) and isinstance(nonce, str) and cands is not None):
            raise Malformed("malformed offer")
        if not auth.check(auth.offer_mac(root, nonce, pub, list(cands)), raw.get("mac")):
            raise Forged("authentication failed: wrong secret")
        try:
            client_pub = bytes.fromhex(pub)
        except ValueError:
            raise Malformed("malformed offer") from None
        if len(client_pub) != 32:
            raise Malformed("malformed offer")
        return cls(client_pub, nonce, cands)


@dataclass(frozen=True)
class Answer:
    """What the server answers: its identity, a fresh nonce, where it may be reached."""

    server_fp: str
    """The server's identity fingerprint (hex SHA-256 of its public key), to pin."""
    nonce: str
    """Hex of :data:`NONCE_BYTES` fresh random bytes."""
    cands: tuple[str, ...]
    """The server's candidates, in wire form (as MAC'd)."""

    @classmethod
    def create(cls, server_fp: str, cands: list[str],
               random_bytes: Callable[[int], bytes]) -> Answer:
        return cls(server_fp, random_bytes(NONCE_BYTES).hex(), tuple(cands))

    def to_wire(self, root: bytes, offer: Offer) -> dict[str, object]:
        """The JSON object for ``answer.answer``, MAC'd with ``root`` over this answer and
        the offer it answers."""
        cands = list(self.cands)
        mac = auth.answer_mac(root, offer.nonce, self.nonce, self.server_fp, offer.pub_hex,
                              cands)
        return {"v": VERSION, "fp": self.server_fp, "nonce": self.nonce, "cands": cands,
                "mac": mac}

    @classmethod
    def from_wire(cls, raw: object, root: bytes, offer: Offer) -> Answer:
        """Parse and verify the answer to ``offer``.

        Raises:
            Malformed: wrong shape.
            Forged: the MAC does not verify: someone without the secret (the relay, or
                whoever holds the name) wrote or altered it.
        """
        if not isinstance(raw, dict):
            raise Malformed("the answer is not an object")
        fp, nonce, cands = raw.get("fp"), raw.get("nonce"), _strings(raw.get("cands"))
        if not (isinstance(fp, str) and isinstance(nonce, str) and cands is not None):
            raise Malformed("malformed answer")
        mac = auth.answer_mac(root, offer.nonce, nonce, fp, offer.pub_hex, list(cands))
        if not auth.check(mac, raw.get("mac")):
            raise Forged("the answer is not authenticated by our secret")
        return cls(fp, nonce, cands)


def session_keys(root: bytes, offer: Offer, answer: Answer) -> auth.SessionKeys:
    """The session's keys (punch keys both ways, the client-proof key), the same on both
    peers: they depend on both fresh nonces and both identities."""
    return auth.session_keys(root, offer.nonce, answer.nonce, offer.pub_hex, answer.server_fp)
