"""Persistent peer identity: an Ed25519 key and a self-signed certificate.

Each peer keeps one identity under its config directory (``$QUICTUN_HOME``, else
``$XDG_CONFIG_HOME/quictun``, else ``~/.config/quictun``), created on first use with
mode 0600. The identity's *fingerprint* is the SHA-256 of its SubjectPublicKeyInfo
(hex), so it survives a certificate renewal. Clients pin the server's fingerprint;
servers log the client's.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

KEY_FILE = "identity.key"
CERT_FILE = "identity.crt"


def config_dir() -> Path:
    """Return the config directory (not created)."""
    home = os.environ.get("QUICTUN_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "quictun"


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

    @classmethod
    def generate(cls) -> Identity:
        key = ed25519.Ed25519PrivateKey.generate()
        return cls(key, _self_signed(key))


def _self_signed(key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
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


def load_or_create(directory: Path | None = None) -> Identity:
    """Load the identity from ``directory`` (default :func:`config_dir`), creating it if absent.

    Raises:
        OSError: the directory cannot be created or the files cannot be read/written.
        ValueError: the files exist but do not hold a valid identity.
    """
    d = directory or config_dir()
    key_path, cert_path = d / KEY_FILE, d / CERT_FILE
    if key_path.exists():
        if key_path.stat().st_mode & 0o077:
            raise ValueError(f"{key_path} is readable by other users; run chmod 600 on it")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{key_path} is not an Ed25519 key")
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if public_key_fingerprint(cert.public_key()) == public_key_fingerprint(
                key.public_key()
            ):
                return Identity(key, cert)
        ident = Identity(key, _self_signed(key))
        write_private(cert_path, ident.certificate.public_bytes(serialization.Encoding.PEM))
        return ident
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity.generate()
    pem = ident.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(key_path, pem)
    write_private(cert_path, ident.certificate.public_bytes(serialization.Encoding.PEM))
    return ident


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (owner only)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # also when a stale .tmp existed with a looser mode
        f.write(data)
    os.replace(tmp, path)

