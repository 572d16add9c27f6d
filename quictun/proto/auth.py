"""End-to-end authentication keyed by the tunnel's shared secret.

The relay carries offers and answers but never sees the secret. From the secret and the
tunnel name both peers derive a *root key*; every value that crosses the relay is
MAC'd with it, and per-session keys come from both peers' fresh nonces and identities:

- the connector's **offer** MAC proves it knows the secret (a wrong secret is refused
  by the server before anything touches the forwarded port);
- the server's **answer** MAC binds its certificate fingerprint, so a relay that swaps
  fingerprints is detected (the client pins the fingerprint it authenticated);
- **punch keys** (one per direction) key the STUN probes' MESSAGE-INTEGRITY, so a
  stranger cannot steer the path;
- the **client proof**, sent inside the QUIC connection, is a MAC over both identities
  plus an Ed25519 signature by the client's identity key, bound to this session.

A relay that records an offer can try to guess a weak secret offline; the root key comes
from scrypt to make each guess expensive, and generated secrets (tickets) are 256 bits
so that is hopeless for them. See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

_SALT = b"quictun/v1"


def _mac(key: bytes, *parts: bytes | str) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return h.digest()


def root_key(secret: str | bytes, name: str) -> bytes:
    """Derive the tunnel's root key from its shared secret and name.

    scrypt (N=2^14, r=8: ~16 MiB, tens of milliseconds, once per connect or serve) so
    that a relay that recorded an offer pays dearly for every guess of a weak,
    person-chosen secret; generated secrets (tickets) are 256 bits anyway.
    """
    ikm = secret.encode() if isinstance(secret, str) else secret
    return hashlib.scrypt(ikm, salt=_SALT + b"|" + name.encode(), n=1 << 14, r=8, p=1,
                          maxmem=64 * 1024 * 1024, dklen=32)


def owner_token(identity_private: bytes, name: str) -> str:
    """The value a server registers a name with: proves to the relay that the same
    identity comes back, without revealing the identity key or the tunnel secret."""
    return _mac(identity_private, "owner", name).hex()


def offer_mac(root: bytes, nonce: str, client_pub: str, cands: list[str]) -> str:
    """MAC of an offer. Every candidate is its own length-prefixed part, so a relay
    cannot merge or split candidates without breaking it."""
    return _mac(root, "offer", nonce, client_pub, str(len(cands)), *cands).hex()


def answer_mac(
    root: bytes, client_nonce: str, server_nonce: str, server_fp: str, client_pub: str,
    cands: list[str],
) -> str:
    return _mac(
        root, "answer", client_nonce, server_nonce, server_fp, client_pub, str(len(cands)),
        *cands,
    ).hex()


def check(expected_hex: str, given: object) -> bool:
    """Constant-time comparison of a MAC from the network against the expected one."""
    return isinstance(given, str) and hmac.compare_digest(expected_hex, given)


@dataclass(frozen=True)
class SessionKeys:
    """Keys for one tunnel session, identical on both peers."""

    to_server: bytes  # keys probes sent to the server (server's local_key)
    to_client: bytes  # keys probes sent to the client (client's local_key)
    proof: bytes  # keys the client proof inside QUIC


def session_keys(
    root: bytes, client_nonce: str, server_nonce: str, client_pub: str, server_fp: str
) -> SessionKeys:
    sk = _mac(root, "session", client_nonce, server_nonce, client_pub, server_fp)
    return SessionKeys(
        to_server=_mac(sk, "punch to server"),
        to_client=_mac(sk, "punch to client"),
        proof=_mac(sk, "client proof"),
    )


def client_proof_message(keys: SessionKeys, server_fp: str, client_fp: str) -> bytes:
    """What the client MACs and signs inside QUIC (the server checks both)."""
    return _mac(keys.proof, "client proof", server_fp, client_fp)
