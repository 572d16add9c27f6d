"""SPAKE2 authentication and the key schedule of quictun protocol 2 (pure).

Theory of operation
-------------------
Both peers know a secret (a ticket's secret, or a pairing code) and the tunnel name. They
run one SPAKE2 exchange (the ``spake2`` package's Ed25519 group, the same as
magic-wormhole's): the client plays side A, the server side B.

1. :func:`prepare` turns (secret, name, kind, role) into a :class:`Prepared` value. This
   is the only step whose running time depends on the secret (two scalar multiplications,
   about 4 ms), so a shell does it once, before it talks to the relay, and reuses it for
   every exchange. What :func:`start` and :func:`finish` compute afterwards takes a time
   that depends on fresh randomness and on the peer's message only, never on the secret.
2. :func:`start` takes 64 bytes of fresh randomness and returns a :class:`Started` with
   the 33-byte outbound message (side byte + group element).
3. :func:`finish` takes the peer's message and returns :class:`SessionKeys`, or raises
   :class:`PakeError`. Both sides get the same keys exactly when both used the same
   secret, name and kind and saw the same messages; otherwise they get unrelated keys,
   and the first :meth:`SessionKeys.open` on either side fails. That is the key
   confirmation: nothing in this module reveals whether a guess was right except a box
   that opens, and a box is only made by someone who ran the exchange.

Key schedule (HKDF-SHA256, RFC 5869)::

    K    = SPAKE2 key (32 bytes; already a hash of pw, idA, idB, X*, Y*, K)
    TH   = SHA-256(lp("quictun/2 transcript"), lp(kind), lp(name),
                   lp(msg_client), lp(hint), lp(msg_server))
    PRK  = HKDF-Extract(salt=TH, ikm=K)
    key_i = HKDF-Expand(PRK, "quictun/2 " + label_i, 32) for each label below

``lp(x)`` is x prefixed by its length as 4 bytes big-endian. Labels: ``seal c2s``,
``seal s2c`` (the AEAD keys, one per direction), ``punch to server``, ``punch to client``
(STUN probe integrity keys, as in protocol 1), ``proof`` (the in-QUIC key confirmation
bound to the TLS channel, :meth:`SessionKeys.proof`), ``resume`` (the seeds of the keys
that let each peer move the session to a new relay connection,
:meth:`SessionKeys.resume_seed` and :mod:`quictun.proto.resume`).

Boxes (:meth:`SessionKeys.seal`) are ChaCha20-Poly1305 with the per-direction key, the
12-byte big-endian message counter ``n`` as nonce, and associated data
``lp("quictun/2 box") || lp(direction) || n (8 bytes) || TH``. Each key belongs to one
session and one direction and every counter value is used once, so nonces never repeat.

Hints (:func:`seal_hint`) let a ticket holder tell the *server* (not the relay) which
identity is connecting, signed and timestamped, before the PAKE completes: the server's
online-guess throttle can then keep known clients apart from strangers. A hint is sealed
to the server's X25519 "box key" (derived from its identity key, :func:`box_keypair`),
which tickets carry; it is bound to the exchange's client message.

Every failure (a malformed message, a wrong secret, a tampered box, a bad hint) raises
:class:`PakeError`, whose message is one line safe to log; no other exception escapes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from spake2.spake2 import DefaultParams, finalize_SPAKE2

from .identity import Identity

__all__ = [
    "VERSION",
    "KINDS",
    "KIND_CONNECT",
    "KIND_PAIR",
    "MESSAGE_SIZE",
    "RANDOM_SIZE",
    "HINT_SIZE",
    "PakeError",
    "Prepared",
    "Started",
    "SessionKeys",
    "Hint",
    "prepare",
    "start",
    "finish",
    "box_keypair",
    "box_key_of",
    "seal_hint",
    "open_hint",
    "tls_channel_binding",
]

VERSION = 2
KIND_CONNECT = "connect"  # the ticket's secret: open a tunnel
KIND_PAIR = "pair"  # a short pairing code: hand over a ticket
KINDS = (KIND_CONNECT, KIND_PAIR)
ROLES = ("client", "server")
MESSAGE_SIZE = 33  # side byte + 32-byte Ed25519 group element
RANDOM_SIZE = 64  # bytes of randomness per start (spake2 reduces 512 bits mod L)
KEY_SIZE = 32
TAG_SIZE = 16
_SIDE = {"client": b"A", "server": b"B"}
_PREFIX = b"quictun/2 "
_GROUP = DefaultParams.group
_SECRET_MAX = 4096


class PakeError(Exception):
    """The exchange failed: a malformed or reflected message, a wrong secret (seen as a
    box that does not open), tampering, or a bad hint. The message is one line, safe to
    log and to show; it never says which secret was tried."""


def _lp(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _expand(prk: bytes, label: str) -> bytes:
    """HKDF-Expand (RFC 5869) with SHA-256, one block (32 bytes)."""
    return hmac.new(prk, _PREFIX + label.encode() + b"\x01", hashlib.sha256).digest()


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _check(kind: str, name: str, role: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if not name or len(name) > 64 or not name.isascii():
        raise ValueError("name must be 1-64 ASCII characters")


@dataclass(frozen=True, repr=False)
class Prepared:
    """A secret made ready for many exchanges (see the module doc). Holds the secret:
    keep it in memory only. ``repr`` shows no secret material."""

    role: str
    kind: str
    name: str
    _pw: bytes
    _blind: object  # pw * (M for the client, N for the server)
    _unblind: object  # -pw * (the other side's point)
    id_a: bytes = field(default=b"")
    id_b: bytes = field(default=b"")

    def __repr__(self) -> str:
        return f"Prepared(role={self.role!r}, kind={self.kind!r}, name={self.name!r})"


def prepare(secret: str | bytes, name: str, kind: str, role: str) -> Prepared:
    """Make ``secret`` ready for exchanges on tunnel ``name``.

    Args:
        secret: the shared secret (ticket secret or canonical pairing code); any length.
        name: the tunnel name (or the pairing slot's name), bound into every key.
        kind: :data:`KIND_CONNECT` or :data:`KIND_PAIR`; a secret prepared for one kind
            never agrees with the other.
        role: ``"client"`` (SPAKE2 side A) or ``"server"`` (side B).

    Raises:
        ValueError: a bad kind, role or name, or an empty or oversized secret (a
            programming error, not a peer's).
    """
    _check(kind, name, role)
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not raw or len(raw) > _SECRET_MAX:
        raise ValueError(f"the secret must be 1-{_SECRET_MAX} bytes")
    pw = _PREFIX + kind.encode() + b"\x00" + raw
    scalar = _GROUP.password_to_scalar(pw)
    m, n = DefaultParams.M, DefaultParams.N
    mine, theirs = (m, n) if role == "client" else (n, m)
    ident = f"{kind} {name}".encode()
    return Prepared(
        role=role, kind=kind, name=name, _pw=pw,
        _blind=mine.scalarmult(scalar), _unblind=theirs.scalarmult(-scalar),
        id_a=_PREFIX + b"client " + ident, id_b=_PREFIX + b"server " + ident,
    )


@dataclass(frozen=True, repr=False)
class Started:
    """One side's half of one exchange. Use it for one :func:`finish` only."""

    prepared: Prepared
    message: bytes  # what to send to the peer (MESSAGE_SIZE bytes)
    _scalar: int

    def __repr__(self) -> str:
        return f"Started({self.prepared!r}, message={self.message.hex()})"


def _entropy(rand: bytes) -> Callable[[int], bytes]:
    used = []

    def take(n: int) -> bytes:
        if used or n != len(rand):
            raise ValueError("spake2 asked for more randomness than was passed in")
        used.append(n)
        return rand

    return take


def start(prepared: Prepared, rand: bytes) -> Started:
    """Begin one exchange with ``rand`` (:data:`RANDOM_SIZE` fresh random bytes; never
    reuse them: two exchanges with the same randomness reveal the secret's blinding).

    Raises:
        ValueError: ``rand`` is not :data:`RANDOM_SIZE` bytes.
    """
    if len(rand) != RANDOM_SIZE:
        raise ValueError(f"start() needs exactly {RANDOM_SIZE} random bytes")
    scalar = _GROUP.random_scalar(_entropy(bytes(rand)))
    element = _GROUP.Base.scalarmult(scalar).add(prepared._blind)  # type: ignore[arg-type]
    return Started(prepared, _SIDE[prepared.role] + element.to_bytes(), scalar)


def _peer_element(started: Started, message: bytes) -> object:
    peer_side = _SIDE["server" if started.prepared.role == "client" else "client"]
    if not isinstance(message, bytes | bytearray) or len(message) != MESSAGE_SIZE:
        raise PakeError(f"the peer's PAKE message is not {MESSAGE_SIZE} bytes")
    if message[:1] != peer_side:
        raise PakeError("the peer's PAKE message is from the wrong side (a reflection?)")
    try:
        element = _GROUP.bytes_to_element(bytes(message[1:]))
    except Exception:  # the pure-Python group raises ValueError, AssertionError, ...
        raise PakeError("the peer's PAKE message is not a valid group element") from None
    if element.to_bytes() == started.message[1:]:
        raise PakeError("the peer's PAKE message is our own (a reflection)")
    return element


def finish(started: Started, message: bytes, hint: bytes = b"") -> SessionKeys:
    """Complete the exchange with the peer's ``message``; ``hint`` is the offer's hint
    bytes (empty if none), bound into the transcript.

    Raises:
        PakeError: the message is malformed or reflected. A *wrong secret* does not raise
            here: it yields keys that do not match the peer's (see the module doc).
    """
    p = started.prepared
    peer = _peer_element(started, message)
    k_elem = peer.add(p._unblind).scalarmult(started._scalar)  # type: ignore[attr-defined]
    mine, theirs = started.message[1:], bytes(message[1:])
    x_msg, y_msg = (mine, theirs) if p.role == "client" else (theirs, mine)
    key = finalize_SPAKE2(p.id_a, p.id_b, x_msg, y_msg, k_elem.to_bytes(), p._pw)
    msg_c, msg_s = (started.message, bytes(message))
    if p.role == "server":
        msg_c, msg_s = msg_s, msg_c
    th = hashlib.sha256(_lp(b"quictun/2 transcript", p.kind.encode(), p.name.encode(),
                            msg_c, bytes(hint), msg_s)).digest()
    prk = _extract(th, key)
    return SessionKeys(
        role=p.role, transcript=th,
        _seal_c2s=_expand(prk, "seal c2s"), _seal_s2c=_expand(prk, "seal s2c"),
        punch_to_server=_expand(prk, "punch to server"),
        punch_to_client=_expand(prk, "punch to client"),
        _proof=_expand(prk, "proof"),
        _resume=_expand(prk, "resume"),
    )


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The keys of one session, equal on both peers when the exchange agreed.

    ``transcript`` (TH) is public-safe to log as an exchange id; the rest are secret.
    """

    role: str
    transcript: bytes
    _seal_c2s: bytes
    _seal_s2c: bytes
    punch_to_server: bytes
    punch_to_client: bytes
    _proof: bytes
    _resume: bytes

    def __repr__(self) -> str:
        return f"SessionKeys(role={self.role!r}, transcript={self.transcript.hex()[:16]}…)"

    def _key(self, direction: str) -> bytes:
        return self._seal_c2s if direction == "c2s" else self._seal_s2c

    @staticmethod
    def _nonce_ad(direction: str, n: int, th: bytes) -> tuple[bytes, bytes]:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 1 << 64:
            raise PakeError("a box counter must be an integer 0 <= n < 2^64")
        nb = n.to_bytes(8, "big")
        return b"\x00" * 4 + nb, _lp(b"quictun/2 box", direction.encode()) + nb + th

    def seal(self, n: int, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` as message ``n`` of our direction
        (client: c2s, server: s2c). The caller numbers its messages 0, 1, 2, ... and
        never reuses a number. Returns ciphertext + 16-byte tag."""
        direction = "c2s" if self.role == "client" else "s2c"
        nonce, ad = self._nonce_ad(direction, n, self.transcript)
        return ChaCha20Poly1305(self._key(direction)).encrypt(nonce, bytes(plaintext), ad)

    def open(self, n: int, box: bytes) -> bytes:
        """Decrypt message ``n`` of the peer's direction.

        Raises:
            PakeError: the box does not open: a wrong secret on one side, or anything
                changed on the way (box, counter, either PAKE message, hint, name).
        """
        direction = "s2c" if self.role == "client" else "c2s"
        nonce, ad = self._nonce_ad(direction, n, self.transcript)
        if not isinstance(box, bytes | bytearray) or len(box) < TAG_SIZE:
            raise PakeError("a sealed message is too short")
        try:
            return ChaCha20Poly1305(self._key(direction)).decrypt(nonce, bytes(box), ad)
        except InvalidTag:
            raise PakeError("authentication failed: the peer does not know the same "
                            "secret, or the message was changed on the way") from None

    def proof(self, who: str, channel_binding: bytes, server_fp: str, client_fp: str) -> bytes:
        """The in-QUIC key confirmation of ``who`` (``"client"`` or ``"server"``): a MAC
        with the proof key over the TLS channel binding (:func:`tls_channel_binding`)
        and both identity fingerprints. Each side sends its own and checks the other's
        with :meth:`check_proof`."""
        if who not in ROLES:
            raise ValueError(f"who must be one of {ROLES}")
        return hmac.new(self._proof, _lp(b"quictun/2 " + who.encode() + b" proof",
                                         bytes(channel_binding), server_fp.encode(),
                                         client_fp.encode()), hashlib.sha256).digest()

    def check_proof(self, who: str, given: object, channel_binding: bytes,
                    server_fp: str, client_fp: str) -> bool:
        """Constant-time check of the peer's proof (see :meth:`proof`)."""
        expected = self.proof(who, channel_binding, server_fp, client_fp)
        return isinstance(given, bytes | bytearray) and hmac.compare_digest(expected,
                                                                             bytes(given))

    def resume_seed(self, who: str) -> bytes:
        """The 32-byte seed of ``who``'s resume key (``"client"`` or ``"server"``):
        the Ed25519 key whose public half that peer gives the relay, so that only it
        can later move the session to a new relay connection
        (:mod:`quictun.proto.resume`). Secret: derived from the exchange."""
        if who not in ROLES:
            raise ValueError(f"who must be one of {ROLES}")
        return hmac.new(self._resume, _lp(b"quictun/2 resume seed", who.encode()),
                        hashlib.sha256).digest()

    def client_signature_input(self, channel_binding: bytes, server_fp: str) -> bytes:
        """What the client signs with its identity key inside QUIC, next to its proof:
        binds its long-term identity to this TLS channel and this exchange."""
        return _lp(b"quictun/2 client signature", bytes(channel_binding), self.transcript,
                   server_fp.encode())


# -- hints: a signed, timestamped client identity, sealed to the server's box key --------
_HINT_PLAIN = 32 + 8 + 64  # client's raw Ed25519 public key, ts (ms), signature
HINT_SIZE = 32 + _HINT_PLAIN + TAG_SIZE


@dataclass(frozen=True)
class Hint:
    """What a valid hint tells the server: who signed it, and when (ms since the epoch,
    by the client's clock). The caller checks freshness and replays."""

    client_public: bytes
    ts_ms: int
    ephemeral: bytes  # the hint's ephemeral public key: a unique id for replay checks


def box_keypair(identity_private: bytes) -> tuple[bytes, bytes]:
    """The server's X25519 box key pair (private, public; raw 32 bytes each), derived
    from its raw 32-byte Ed25519 identity private key, so it needs no file of its own."""
    if len(identity_private) != 32:
        raise ValueError("identity_private must be the raw 32-byte Ed25519 key")
    seed = _expand(_extract(b"quictun/2 box key", bytes(identity_private)), "box key")
    priv = x25519.X25519PrivateKey.from_private_bytes(seed)
    from cryptography.hazmat.primitives import serialization as s

    pub = priv.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return seed, pub


def box_key_of(identity: Identity) -> bytes:
    """The public box key of ``identity`` (what tickets carry, see :func:`box_keypair`)."""
    return box_keypair(identity.private_bytes())[1]


def _hint_key(shared: bytes, eph_pub: bytes, box_pub: bytes) -> bytes:
    return _expand(_extract(eph_pub + box_pub, shared), "hint key")


def _hint_signed(name: str, message: bytes, ts_ms: int, box_pub: bytes) -> bytes:
    return _lp(b"quictun/2 hint", name.encode(), bytes(message), ts_ms.to_bytes(8, "big"),
               box_pub)


def seal_hint(*, box_public: bytes, name: str, message: bytes,
              identity: ed25519.Ed25519PrivateKey, ts_ms: int, rand: bytes) -> bytes:
    """A hint for the offer carrying ``message`` (our PAKE message) on ``name``: our
    identity, ``ts_ms`` and our signature over them, sealed to ``box_public`` with an
    ephemeral X25519 key made from ``rand`` (32 fresh random bytes). :data:`HINT_SIZE`
    bytes.

    Raises:
        ValueError: bad argument sizes (a programming error).
    """
    from cryptography.hazmat.primitives import serialization as s

    if len(rand) != 32 or len(box_public) != 32 or not 0 <= ts_ms < 1 << 63:
        raise ValueError("seal_hint needs 32 random bytes, a 32-byte box key, a ts >= 0")
    eph = x25519.X25519PrivateKey.from_private_bytes(bytes(rand))
    eph_pub = eph.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    shared = eph.exchange(x25519.X25519PublicKey.from_public_bytes(bytes(box_public)))
    pub = identity.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    sig = identity.sign(_hint_signed(name, message, ts_ms, bytes(box_public)))
    plain = pub + ts_ms.to_bytes(8, "big") + sig
    ad = _lp(b"quictun/2 hint box", name.encode(), bytes(message))
    box = ChaCha20Poly1305(_hint_key(shared, eph_pub, bytes(box_public))).encrypt(
        b"\x00" * 12, plain, ad)
    return eph_pub + box


def open_hint(*, box_private: bytes, name: str, message: bytes, hint: bytes) -> Hint:
    """Open and verify a hint (see :func:`seal_hint`) with our box private key.

    Raises:
        PakeError: the hint is malformed, not sealed to us, not for this offer, or its
            signature does not verify.
    """
    from cryptography.hazmat.primitives import serialization as s

    if not isinstance(hint, bytes | bytearray) or len(hint) != HINT_SIZE:
        raise PakeError(f"the offer's hint is not {HINT_SIZE} bytes")
    eph_pub, box = bytes(hint[:32]), bytes(hint[32:])
    priv = x25519.X25519PrivateKey.from_private_bytes(bytes(box_private))
    box_pub = priv.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    try:
        shared = priv.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
        ad = _lp(b"quictun/2 hint box", name.encode(), bytes(message))
        plain = ChaCha20Poly1305(_hint_key(shared, eph_pub, box_pub)).decrypt(
            b"\x00" * 12, box, ad)
    except (ValueError, InvalidTag):  # ValueError: a low-order point (all-zero secret)
        raise PakeError("the offer's hint is not sealed to this server's key") from None
    pub, ts_ms, sig = plain[:32], int.from_bytes(plain[32:40], "big"), plain[40:]
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(
            sig, _hint_signed(name, message, ts_ms, box_pub))
    except (InvalidSignature, ValueError):
        raise PakeError("the offer's hint carries a bad signature") from None
    return Hint(client_public=pub, ts_ms=ts_ms, ephemeral=eph_pub)


# -- TLS channel binding (both QUIC engines keep TLS 1.3's key schedule in Python) -------
def tls_channel_binding(master_secret: bytes, transcript_hash: bytes, hash_name: str) -> bytes:
    """32 bytes that both ends of one TLS 1.3 connection compute alike and nobody else can:
    ``HKDF-Expand-Label(master_secret, "quictun cb", Transcript-Hash(ClientHello ..
    client Finished), 32)`` (RFC 8446 section 7.1, the same construction as its
    ``res master`` secret). ``hash_name`` is the handshake hash (``sha256``/``sha384``).
    :mod:`quictun.quic.binding` reads the two inputs from aioquic or qh3."""
    if hash_name not in ("sha256", "sha384"):
        raise ValueError(f"unexpected TLS hash {hash_name!r}")
    label = b"tls13 quictun cb"
    info = (32).to_bytes(2, "big") + bytes([len(label)]) + label
    info += bytes([len(transcript_hash)]) + bytes(transcript_hash)
    return hmac.new(bytes(master_secret), info + b"\x01", hash_name).digest()[:32]
