"""Pure codec for the quictun signalling protocol, version 2 (see ``docs/protocol.md``).

Theory of operation
-------------------
Each text WebSocket frame carries one JSON object with a ``"t"`` field naming the
message type; each message type is a frozen dataclass below, whose fields are exactly
the JSON keys. :func:`encode` turns a message into compact JSON; :func:`decode` turns
text (or UTF-8 bytes) back into a message and raises :class:`ProtocolError` for
anything it cannot accept: invalid JSON or UTF-8, a non-object, a missing ``t`` or
unknown type, a missing or wrongly typed field, a string over its limit, a name that
fails :func:`valid_name`, an offer/answer over :data:`MAX_BLOB_SIZE` bytes of JSON.
Unknown *extra* fields are ignored (forward compatibility); the optional fields
(``error.session``, ``reject.code``, ``rejected.code``) decode as None when absent.

Binary WebSocket frames carry relayed QUIC packets: :func:`encode_relay` /
:func:`decode_relay` (kind byte 0x01, 4-byte big-endian session id, payload).

``answer`` is the same message in both directions (owner -> relay -> connector).
No I/O happens here; both the client and ``signal_server`` import this module.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from . import fields as fld
from .fields import (
    E_BAD_MESSAGE,
    E_TOO_LARGE,
    MAX_BLOB_SIZE,
    MAX_SESSION,
    ProtocolError,
    valid_name,
)

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "register_signed", "Data", "MAX_MESSAGE_SIZE",
    "MAX_BLOB_SIZE", "RELAY_KIND", "ProtocolError", "valid_name", "encode", "decode",
    "encode_relay", "decode_relay", "Message", "Hello", "Register", "Unregister", "Connect",
    "Answer", "Reject", "Close", "Ping", "Resumable", "Resume", "Welcome", "Registered",
    "Incoming", "Go", "Rejected", "Closed", "Pong", "Resumed", "Error", "REJECT_AUTH",
    "REJECT_REPLAY", "REJECT_MALFORMED", "REJECT_BUSY", "REJECT_SERVER_ERROR",
    "REJECT_VERSION", "REJECT_STALE", "REJECT_CODES", "CLIENT_MESSAGES", "SERVER_MESSAGES",
]

PROTOCOL_VERSION = 2
#: Hello versions a relay accepts: version 2 only adds ``data``, so a version-1 client
#: (which never sends it) is served as before.
SUPPORTED_VERSIONS = (1, 2)
#: Largest accepted text frame, in bytes of UTF-8 (error code ``too-large``).
MAX_MESSAGE_SIZE = 16 * 1024
RELAY_KIND = 0x01
RELAY_BATCH_KIND = 0x02

# Error codes.
E_UNSUPPORTED_VERSION = "unsupported-version"
E_UNAUTHORIZED = "unauthorized"
E_NAME_TAKEN = "name-taken"
E_NO_SUCH_NAME = "no-such-name"
E_TIMEOUT = "timeout"
E_RELAY_DISABLED = "relay-disabled"
E_RATE_LIMITED = "rate-limited"
E_NOT_REGISTERED = "not-registered"
E_NO_SUCH_SESSION = "no-such-session"
E_HELLO_REQUIRED = "hello-required"
E_TOO_MANY_CONNECTIONS = "too-many-connections"
E_SERVER_ERROR = "server-error"
E_BUSY = "busy"
E_TAKEN_OVER = "taken-over"
ERROR_CODES = frozenset(
    {
        E_BAD_MESSAGE,
        E_UNSUPPORTED_VERSION,
        E_UNAUTHORIZED,
        E_NAME_TAKEN,
        E_NO_SUCH_NAME,
        E_TIMEOUT,
        E_TOO_LARGE,
        E_RELAY_DISABLED,
        E_RATE_LIMITED,
        E_NOT_REGISTERED,
        E_NO_SUCH_SESSION,
        E_HELLO_REQUIRED,
        E_TOO_MANY_CONNECTIONS,
        E_SERVER_ERROR,
        E_BUSY,
        E_TAKEN_OVER,
    }
)

# Reject codes (``reject.code`` / ``rejected.code``): why an owner refused a session.
#: The connector's secret is wrong (protocol 1's MAC did not verify). Permanent.
REJECT_AUTH = "auth"
#: The offer was seen before: a replayed (recorded and resent) offer.
REJECT_REPLAY = "replay"
#: The peers speak different protocol versions; the reason names who must upgrade.
#: Permanent.
REJECT_VERSION = "version"
#: A timestamp in the offer is outside the allowed window (a replay, or a wrong clock).
REJECT_STALE = "stale"
#: The offer is not the shape the owner expects (fields missing or mistyped).
REJECT_MALFORMED = "malformed"
#: The owner has too many sessions; trying later may work.
REJECT_BUSY = "busy"
#: The owner failed while accepting (e.g. out of sockets); trying later may work.
REJECT_SERVER_ERROR = "server-error"
REJECT_CODES = frozenset(
    {REJECT_AUTH, REJECT_REPLAY, REJECT_MALFORMED, REJECT_BUSY, REJECT_SERVER_ERROR,
     REJECT_VERSION, REJECT_STALE}
)



# --- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    T: ClassVar[str] = ""
    CHECKS: ClassVar[dict[str, Any]] = {}


# client -> relay


@dataclass(frozen=True)
class Hello(_Message):
    """First message of every connection. ``token`` is the relay's shared secret."""

    T: ClassVar[str] = "hello"
    v: int
    token: str | None
    agent: str
    CHECKS: ClassVar[dict[str, Any]] = {
        "v": fld.U53,
        "token": fld.string(fld.SHORT, optional=True),
        "agent": fld.string(fld.SHORT),
    }


@dataclass(frozen=True)
class Register(_Message):
    """Claim ``name``: protocol 2 with ``key`` (the server's raw Ed25519 public key, 64
    hex) and ``sig`` (its signature over the welcome's challenge and the name, 128 hex);
    protocol 1 with ``owner`` (a fixed token, refused by a protocol-2 relay)."""

    T: ClassVar[str] = "register"
    name: str
    owner: str | None = None
    key: str | None = None
    sig: str | None = None
    CHECKS: ClassVar[dict[str, Any]] = {
        "name": fld.name,
        "owner": lambda v, n: None if v is None else fld.owner(v, n),
        "key": lambda v, n: None if v is None else fld.hexbytes(32)(v, n),
        "sig": lambda v, n: None if v is None else fld.hexbytes(64)(v, n),
    }


@dataclass(frozen=True)
class Unregister(_Message):
    """Release ``name`` immediately (no grace period, no reply)."""

    T: ClassVar[str] = "unregister"
    name: str
    CHECKS: ClassVar[dict[str, Any]] = {"name": fld.name}


@dataclass(frozen=True)
class Connect(_Message):
    """Ask the holder of ``name`` for a session; ``offer`` is opaque to the relay."""

    T: ClassVar[str] = "connect"
    name: str
    offer: dict[str, Any]
    CHECKS: ClassVar[dict[str, Any]] = {"name": fld.name, "offer": fld.blob}


@dataclass(frozen=True)
class Answer(_Message):
    """Owner -> relay accepting ``session``; relay -> connector forwarding it."""

    T: ClassVar[str] = "answer"
    session: int
    answer: dict[str, Any]
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "answer": fld.blob}


# ``reject`` (owner -> relay) and ``rejected`` (relay -> connector) carry the same fields
_REJECT_CHECKS: dict[str, Any] = {
    "session": fld.SESSION,
    "reason": fld.string(fld.SHORT),
    "code": fld.string(fld.SHORT, optional=True),
}


@dataclass(frozen=True)
class Reject(_Message):
    """Owner refuses an incoming session.

    ``reason`` is free text for humans; ``code`` (optional, one of the ``REJECT_*``
    constants or another short string) is what programs act on. The relay passes both
    through to the connector in :class:`Rejected`.
    """

    T: ClassVar[str] = "reject"
    session: int
    reason: str
    code: str | None = None
    CHECKS: ClassVar[dict[str, Any]] = _REJECT_CHECKS


@dataclass(frozen=True)
class Close(_Message):
    """Either member ends a session."""

    T: ClassVar[str] = "close"
    session: int
    reason: str
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "reason": fld.string(fld.SHORT)}


@dataclass(frozen=True)
class Data(_Message):
    """A sealed message between the two members of an answered session (protocol 2), in
    both directions: the relay forwards it to the other member unchanged (it is opaque
    to the relay, like ``offer`` and ``answer``), also when it does not relay packets."""

    T: ClassVar[str] = "data"
    session: int
    data: dict[str, Any]
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "data": fld.blob}


@dataclass(frozen=True)
class Ping(_Message):
    """Relay answers with ``pong`` carrying the same id (use it as a barrier)."""

    T: ClassVar[str] = "ping"
    id: int
    CHECKS: ClassVar[dict[str, Any]] = {"id": fld.U53}


@dataclass(frozen=True)
class Resumable(_Message):
    """A member of an answered session gives the relay the public half of its resume
    key (64 hex, see :mod:`quictun.proto.resume`); no reply. Only to a relay whose
    ``welcome`` offers ``resume``."""

    T: ClassVar[str] = "resumable"
    session: int
    key: str
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "key": fld.hexbytes(32)}


@dataclass(frozen=True)
class Resume(_Message):
    """Move my half of ``session`` to this connection: ``sig`` (128 hex) by my resume key
    over this connection's challenge and the session id. Reply ``resumed``, or ``error
    no-such-session`` (with the session)."""

    T: ClassVar[str] = "resume"
    session: int
    sig: str
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "sig": fld.hexbytes(64)}


# relay -> client


@dataclass(frozen=True)
class Welcome(_Message):
    """Reply to ``hello``: STUN UDP ports, whether relaying is allowed, observed address,
    (protocol 2) the connection's ``challenge`` (64 hex) a ``register`` or ``resume``
    signs, and ``resume``: how many seconds a session whose member's connection dropped
    waits for it to ``resume`` (absent: this relay cannot resume sessions)."""

    T: ClassVar[str] = "welcome"
    v: int
    stun: list[int]
    relay: bool
    addr: str
    challenge: str | None = None
    resume: int | None = None
    CHECKS: ClassVar[dict[str, Any]] = {
        "v": fld.U53,
        "stun": fld.ports,
        "relay": fld.boolean,
        "addr": fld.string(fld.SHORT),
        "challenge": lambda v, n: None if v is None else fld.hexbytes(32)(v, n),
        "resume": lambda v, n: None if v is None else fld.U53(v, n),
    }


@dataclass(frozen=True)
class Registered(_Message):
    """``name`` is now held by this connection."""

    T: ClassVar[str] = "registered"
    name: str
    CHECKS: ClassVar[dict[str, Any]] = {"name": fld.name}


@dataclass(frozen=True)
class Incoming(_Message):
    """To the owner of ``name``: a connector's offer for ``session``."""

    T: ClassVar[str] = "incoming"
    session: int
    name: str
    offer: dict[str, Any]
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "name": fld.name, "offer": fld.blob}


@dataclass(frozen=True)
class Go(_Message):
    """To the owner, at the same moment ``answer`` goes to the connector: start punching."""

    T: ClassVar[str] = "go"
    session: int
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION}


@dataclass(frozen=True)
class Rejected(_Message):
    """To the connector: the owner rejected ``session``; ``reason`` and ``code`` are the
    owner's :class:`Reject` fields, unchanged (``code`` None when the owner sent none)."""

    T: ClassVar[str] = "rejected"
    session: int
    reason: str
    code: str | None = None
    CHECKS: ClassVar[dict[str, Any]] = _REJECT_CHECKS


@dataclass(frozen=True)
class Closed(_Message):
    """The other member closed ``session`` (or disconnected, or it timed out)."""

    T: ClassVar[str] = "closed"
    session: int
    reason: str
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION, "reason": fld.string(fld.SHORT)}


@dataclass(frozen=True)
class Pong(_Message):
    """Reply to ``ping``."""

    T: ClassVar[str] = "pong"
    id: int
    CHECKS: ClassVar[dict[str, Any]] = {"id": fld.U53}


@dataclass(frozen=True)
class Resumed(_Message):
    """Reply to ``resume``: this connection is now the member of ``session``."""

    T: ClassVar[str] = "resumed"
    session: int
    CHECKS: ClassVar[dict[str, Any]] = {"session": fld.SESSION}


@dataclass(frozen=True)
class Error(_Message):
    """Something went wrong; ``session`` is set when the error concerns one session."""

    T: ClassVar[str] = "error"
    code: str
    message: str
    session: int | None = None
    CHECKS: ClassVar[dict[str, Any]] = {
        "code": fld.string(fld.SHORT),
        "message": fld.string(fld.LONG),
        "session": lambda v, name: None if v is None else fld.SESSION(v, name),
    }


Message = (
    Hello
    | Register
    | Unregister
    | Connect
    | Answer
    | Reject
    | Close
    | Ping
    | Welcome
    | Registered
    | Incoming
    | Go
    | Rejected
    | Closed
    | Data
    | Pong
    | Resumable
    | Resume
    | Resumed
    | Error
)

CLIENT_MESSAGES: tuple[type[_Message], ...] = (
    Hello,
    Register,
    Unregister,
    Connect,
    Answer,
    Reject,
    Close,
    Data,
    Ping,
    Resumable,
    Resume,
)
SERVER_MESSAGES: tuple[type[_Message], ...] = (
    Welcome,
    Registered,
    Incoming,
    Answer,
    Go,
    Rejected,
    Closed,
    Data,
    Pong,
    Resumed,
    Error,
)
_TYPES: dict[str, type[_Message]] = {cls.T: cls for cls in CLIENT_MESSAGES + SERVER_MESSAGES}
#: Fields that may be absent on the wire (decoded as None).
_OPTIONAL = {(Error, "session"), (Reject, "code"), (Rejected, "code"), (Register, "owner"),
             (Register, "key"), (Register, "sig"), (Welcome, "challenge"),
             (Welcome, "resume")}
#: Optional fields left out of the JSON when None, so that messages without them are
#: byte-for-byte what older peers sent (``error.session`` is always written, as before).
_OMIT_NONE = {(Reject, "code"), (Rejected, "code"), (Register, "owner"), (Register, "key"),
              (Register, "sig"), (Welcome, "challenge"), (Welcome, "resume")}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def decode(text: str | bytes) -> Message:
    """Decode one text frame into a message.

    Raises:
        ProtocolError: ``too-large`` if over :data:`MAX_MESSAGE_SIZE` bytes or a field
            is over its limit; ``bad-message`` for everything else that is wrong.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        if len(text) > MAX_MESSAGE_SIZE:
            raise ProtocolError(E_TOO_LARGE, f"message over {MAX_MESSAGE_SIZE} bytes")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fld.bad("message is not valid UTF-8") from exc
    elif not isinstance(text, str):
        raise fld.bad("message must be text")
    if len(text) > MAX_MESSAGE_SIZE or len(text.encode("utf-8", "surrogatepass")) > (
        MAX_MESSAGE_SIZE
    ):
        raise ProtocolError(E_TOO_LARGE, f"message over {MAX_MESSAGE_SIZE} bytes")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
        if "\\u" in text:  # only an escape can make a lone surrogate
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise fld.bad("message holds a lone UTF-16 surrogate") from exc
    except (ValueError, RecursionError) as exc:
        raise fld.bad(f"invalid JSON: {str(exc)[:100]}") from exc
    if not isinstance(obj, dict):
        raise fld.bad("message must be a JSON object")
    t = obj.get("t")
    if not isinstance(t, str):
        raise fld.bad("missing message type field 't'")
    cls = _TYPES.get(t)
    if cls is None:
        raise fld.bad(f"unknown message type {t[:40]!r}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in obj:
            if (cls, f.name) in _OPTIONAL:
                kwargs[f.name] = None
                continue
            raise fld.bad(f"{t!r} message is missing field {f.name!r}")
        kwargs[f.name] = cls.CHECKS[f.name](obj[f.name], f.name)
    return cls(**kwargs)  # type: ignore[return-value]


def encode(msg: Message) -> str:
    """Encode a message as compact JSON text (``"t"`` first). A ``reject``/``rejected``
    ``code`` of None is left out (the key is absent), which older peers also accept.

    Raises:
        ProtocolError: the message's fields fail the same checks :func:`decode` applies,
            so a peer can never be sent something it would reject.
    """
    out: dict[str, Any] = {"t": msg.T}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if value is None and (type(msg), f.name) in _OMIT_NONE:
            continue
        out[f.name] = msg.CHECKS[f.name](value, f.name)
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if len(text.encode("utf-8")) > MAX_MESSAGE_SIZE:
        raise ProtocolError(E_TOO_LARGE, f"message over {MAX_MESSAGE_SIZE} bytes")
    return text


_RELAY_HEADER = struct.Struct("!BI")


def encode_relay(session: int, payload: bytes) -> bytes:
    """Frame a relayed packet: kind 0x01, 4-byte big-endian session id, payload."""
    if not 0 <= session <= MAX_SESSION:
        raise ProtocolError(E_BAD_MESSAGE, "session id out of range")
    return _RELAY_HEADER.pack(RELAY_KIND, session) + bytes(payload)


def encode_relay_batch(session: int, datagrams: list[bytes]) -> bytes:
    """Frame several packets for one session: kind 0x02, session id, then each packet
    prefixed by its 2-byte big-endian length. One WebSocket message for many packets
    cuts the per-message cost of the relay path."""
    if not 0 <= session <= MAX_SESSION:
        raise ProtocolError(E_BAD_MESSAGE, "session id out of range")
    parts = [_RELAY_HEADER.pack(RELAY_BATCH_KIND, session)]
    for d in datagrams:
        if len(d) > 0xFFFF:
            raise ProtocolError(E_TOO_LARGE, "packet over 65535 bytes")
        parts.append(len(d).to_bytes(2, "big"))
        parts.append(d)
    return b"".join(parts)


def decode_relay(data: bytes) -> tuple[int, bytes]:
    """Parse a binary relay frame into ``(session, payload)`` (the relay's view: it
    forwards the frame unchanged and needs only the session).

    Raises:
        ProtocolError: ``bad-message`` if shorter than 5 bytes or the kind is neither
            0x01 (one packet) nor 0x02 (a batch).
    """
    if len(data) < _RELAY_HEADER.size:
        raise ProtocolError(E_BAD_MESSAGE, "binary frame shorter than 5 bytes")
    kind, session = _RELAY_HEADER.unpack_from(data)
    if kind not in (RELAY_KIND, RELAY_BATCH_KIND):
        raise ProtocolError(E_BAD_MESSAGE, f"unknown binary frame kind 0x{kind:02x}")
    return session, bytes(data[_RELAY_HEADER.size :])


def relay_packets(data: bytes) -> tuple[int, list[bytes]]:
    """Parse a binary relay frame into ``(session, packets)`` (the peers' view).

    Raises:
        ProtocolError: as :func:`decode_relay`, or a batch whose lengths do not add up.
    """
    session, payload = decode_relay(data)
    if data[0] == RELAY_KIND:
        return session, [payload]
    out, i, n = [], 0, len(payload)
    while i < n:
        if i + 2 > n:
            raise ProtocolError(E_BAD_MESSAGE, "truncated relay batch")
        size = int.from_bytes(payload[i : i + 2], "big")
        if i + 2 + size > n:
            raise ProtocolError(E_BAD_MESSAGE, "truncated relay batch")
        out.append(payload[i + 2 : i + 2 + size])
        i += 2 + size
    return session, out


def register_signed(challenge: bytes, name: str) -> bytes:
    """What a server signs with its identity key to register ``name`` on the connection
    whose ``welcome`` carried ``challenge`` (``register.sig``)."""
    return b"".join(len(p).to_bytes(4, "big") + p
                    for p in (b"quictun/2 register", challenge, name.encode()))
