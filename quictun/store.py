"""What quictun keeps on disk, in the config directory (:func:`config_dir`).

``$QUICTUN_HOME``, else ``$XDG_CONFIG_HOME/quictun``, else ``~/.config/quictun``::

    identity.key, identity.crt   this machine's identity (mode 600), made on first use
    secrets/NAME                 the secret ``serve NAME`` generated (so tickets stay the same)
    tickets/NAME                 tickets stored by ``quictun import``

Every file is written atomically with mode 600 (:func:`write_private`). The formats are
the codecs' (:mod:`quictun.proto.identity`, :mod:`quictun.proto.ticket`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .proto.identity import Identity, public_key_fingerprint, self_signed_certificate
from .proto.ticket import Ticket, TicketError, check_name, decode

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


def load_or_create(directory: Path | None = None) -> Identity:
    """Load the identity from ``directory`` (default :func:`config_dir`), creating it if absent.

    Raises:
        OSError: the directory cannot be created or the files cannot be read/written.
        ValueError: the files exist but do not hold a valid identity.
    """
    d = directory or config_dir()
    key_path, cert_path = d / KEY_FILE, d / CERT_FILE
    if key_path.exists():
        check_private(key_path)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{key_path} is not an Ed25519 key")
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if public_key_fingerprint(cert.public_key()) == public_key_fingerprint(
                key.public_key()
            ):
                return Identity(key, cert)
        ident = Identity(key, self_signed_certificate(key))
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
    """Atomically write ``data`` to ``path`` with mode 0600 (owner only).

    The data goes to a new temporary file in the same folder, created with
    ``O_EXCL | O_NOFOLLOW`` (never an existing file, never through a symlink someone
    planted), then renamed over ``path``: a reader sees the old or the new content, and
    the secret is never readable by others, not even for an instant.
    """
    import secrets as _secrets

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    tmp = path.with_name(f".{path.name}.{_secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ExposedFile(ValueError):
    """A file holding a secret can be read by other users (the message says what to do)."""


def check_private(path: Path) -> None:
    """Refuse a secret file that the group or others may read (as ssh does for keys).

    Raises:
        ExposedFile: with the ``chmod`` that fixes it.
    """
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ExposedFile(f"{path} is readable by other users: it holds a secret; run "
                          f"chmod 600 {path}")


def stored_secret(name: str) -> str:
    """The generated secret for ``name``: created once, then kept in the config dir
    (``$QUICTUN_HOME/secrets/NAME``, mode 600) so that restarts print the same ticket.

    Raises:
        InvalidName: ``name`` is not a valid name (checked before any file is touched).
        ExposedFile: the stored secret is readable by other users.
        OSError: the config dir cannot be read or written.
    """
    import secrets as _secrets

    path = secret_path(name)
    if path.exists():
        check_private(path)
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = _secrets.token_urlsafe(32)
    write_private(path, value.encode())
    return value


def secret_path(name: str) -> Path:
    """Where :func:`stored_secret` keeps the secret for ``name``."""
    return config_dir() / "secrets" / check_name(name)


def ticket_path(name: str) -> Path:
    """Where :func:`store_ticket` keeps the imported ticket for ``name``."""
    return config_dir() / "tickets" / check_name(name)


def stored_names() -> list[str]:
    """The names that have a ticket stored by :func:`store_ticket`, sorted."""
    folder = config_dir() / "tickets"
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError:
        return []


def store_ticket(t: Ticket) -> Path:
    """Keep ``t`` (secret included) as ``$QUICTUN_HOME/tickets/NAME``, mode 600, replacing
    any ticket stored for that name. Returns the path.

    Raises:
        InvalidName: the ticket's name is not a valid name.
        OSError: the config dir cannot be written.
    """
    path = ticket_path(t.name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, (t.encode() + "\n").encode())
    return path


def load_ticket(name: str) -> Ticket | None:
    """The ticket stored for ``name`` by :func:`store`, or None if there is none.

    Raises:
        InvalidName: ``name`` is not a valid name.
        TicketError: the stored file is damaged or is for another name.
        ExposedFile: other users can read it.
        OSError: the file exists but cannot be read.
    """
    path = ticket_path(name)
    if not path.is_file():
        return None
    check_private(path)
    try:
        t = decode(path.read_text())
    except TicketError as exc:
        raise TicketError(f"the stored ticket {path}: {exc}") from None
    if t.name != name:
        raise TicketError(f"the stored ticket {path} is for {t.name!r}, not {name!r} "
                          "(import it again)")
    return t


class KnownClients:
    """The client identities that proved the secret of one served name: the guess
    throttle keeps them apart from strangers (:mod:`quictun.proto.throttle`), also after
    a restart. Kept in ``$QUICTUN_HOME/known/NAME``, one fingerprint per line, mode 600;
    at most :attr:`LIMIT` (the oldest are forgotten first)."""

    LIMIT = 10_000

    def __init__(self, name: str) -> None:
        self.path = config_dir() / "known" / check_name(name)
        self.fingerprints: dict[str, None] = {}  # insertion-ordered
        try:
            lines = self.path.read_text().split()
        except OSError:
            lines = []
        for fp in lines:
            if len(fp) == 64 and all(c in "0123456789abcdef" for c in fp):
                self.fingerprints[fp] = None

    def __contains__(self, fp: object) -> bool:
        return fp in self.fingerprints

    def add(self, fp: str) -> None:
        """Remember ``fp``. Raises OSError when the file cannot be written (the
        fingerprint is still known until the process exits)."""
        if fp in self.fingerprints:
            return
        self.fingerprints[fp] = None
        while len(self.fingerprints) > self.LIMIT:
            del self.fingerprints[next(iter(self.fingerprints))]
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.path, ("\n".join(self.fingerprints) + "\n").encode())
