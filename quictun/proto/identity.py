"""A peer's identity: an Ed25519 key and its self-signed certificate (pure crypto).

The identity's *fingerprint* is the SHA-256 of its SubjectPublicKeyInfo (hex), so it
survives a certificate renewal. Clients pin the server's fingerprint; servers log the
client's. Where identities live on disk is :mod:`quictun.store`.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID


def public_key_fingerprint(public_key: object) -> str:
    """SHA-256 hex of a public key's DER SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """The fingerprint of the identity a certificate carries (see module doc)."""
    return public_key_fingerprint(cert.public_key())


@dataclass(frozen=True)
class Identity:
    """A private key with its self-signed certificate."""

    private_key: ed25519.Ed25519PrivateKey
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return public_key_fingerprint(self.private_key.public_key())

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def registration_key(self, name: str) -> ed25519.Ed25519PrivateKey:
        """The key that registers ``name`` on a relay: derived from this identity and the
        name (HKDF-SHA256), so the relay can bind a name to its owner across restarts and
        networks, yet cannot link two names of one machine, nor a name to the identity
        fingerprint that tickets pin (that one is only shown inside the encrypted QUIC
        handshake)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"quictun/2 registration key\0" + name.encode()
                    ).derive(self.private_bytes())
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    @classmethod
    def generate(cls) -> Identity:
        key = ed25519.Ed25519PrivateKey.generate()
        return cls(key, self_signed_certificate(key))


def self_signed_certificate(key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quictun peer")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )


def raw_public(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def verify_signature(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    """Check an Ed25519 signature made by :meth:`Identity.sign`."""
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint_of_raw(public_raw: bytes) -> str:
    """Fingerprint of a raw Ed25519 public key (same value as :attr:`Identity.fingerprint`)."""
    return public_key_fingerprint(ed25519.Ed25519PublicKey.from_public_bytes(public_raw))
