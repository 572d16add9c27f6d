"""Wire format between relay instances of one cluster (pure: bytes in, messages out).

Instances exchange two kinds of messages about sessions whose two members sit on
different instances (see :mod:`signal_server.federation`):

* **control** (``0x00`` + one compact JSON object with a ``"k"`` field): ``incoming``,
  ``answer``, ``rejected``, ``closed``, ``error`` and ``moved``. A session is named by
  the sender's own id (``from``) and, when known, the receiver's (``to``);
* **relay** (``0x01`` + the sender's session id, 4 bytes big-endian, + the client's
  relay frame with its session id already rewritten to the receiver's id): the receiver
  forwards the inner frame unchanged.

They travel over a direct TCP link (:mod:`signal_server.peerlink`, framed by a 4-byte
big-endian length, opened by a ``hello`` frame) or over Redis pub/sub (the sender's
instance id and a newline in front). Instances trust each other (they share the Redis
that authenticates links), but a decoder never raises anything but
:class:`PeerProtocolError`, so a bug or a version mismatch cannot take an instance down.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from quictun.proto import signalling as sp

__all__ = ["PeerProtocolError", "PeerIncoming", "PeerAnswer", "PeerData", "PeerRejected",
           "PeerClosed",
           "PeerError", "PeerMoved", "PeerRelay", "PeerMessage", "encode", "decode",
           "relay_frame", "LinkHello", "encode_hello", "decode_hello", "frame",
           "FrameReader", "pack_pubsub", "unpack_pubsub", "MAX_LINK_FRAME", "LINK_VERSION"]

CONTROL, RELAY = 0x00, 0x01
LINK_VERSION = 1
#: largest frame on a link: a relayed client frame (64 KiB max) plus headers, with room
MAX_LINK_FRAME = 256 * 1024
_U32 = struct.Struct("!I")
_RELAY_HDR = struct.Struct("!BI")  # kind 0x01, sender's session id


class PeerProtocolError(ValueError):
    """A malformed message from another instance (the only exception decoders raise)."""


@dataclass(frozen=True)
class PeerIncoming:
    """A connector on the sender asks the holder ``conn`` of ``name`` for a session."""

    from_sid: int
    conn: int
    name: str
    offer: dict[str, Any]


@dataclass(frozen=True)
class PeerAnswer:
    """The holder answered: the sender's session ``from_sid`` pairs with ``to_sid``."""

    to_sid: int
    from_sid: int
    answer: dict[str, Any]


@dataclass(frozen=True)
class PeerData:
    """A sealed ``data`` message for the member of session ``to_sid`` (opaque)."""

    to_sid: int
    from_sid: int
    data: dict[str, Any]


@dataclass(frozen=True)
class PeerRejected:
    """The holder refused; ``reason`` and ``code`` pass through unchanged."""

    to_sid: int
    from_sid: int
    reason: str
    code: str | None


@dataclass(frozen=True)
class PeerClosed:
    """The sender's member left or closed; ``to_sid`` None if not yet known."""

    to_sid: int | None
    from_sid: int
    reason: str


@dataclass(frozen=True)
class PeerError:
    """The holder's instance could not offer the session (gone, busy): tell the
    connector ``code``/``message``."""

    to_sid: int
    code: str
    message: str


@dataclass(frozen=True)
class PeerMoved:
    """``name`` moved away from the receiver's connection ``conn`` (same owner)."""

    name: str
    conn: int


@dataclass(frozen=True)
class PeerRelay:
    """A relayed client frame for the receiver's session ``to_sid``."""

    from_sid: int
    to_sid: int
    #: the client frame (kind 0x01/0x02, ``to_sid``, payload), ready to forward
    frame: bytes


PeerMessage = (PeerIncoming | PeerAnswer | PeerData | PeerRejected | PeerClosed | PeerError
               | PeerMoved | PeerRelay)

_KINDS: dict[type, str] = {PeerIncoming: "incoming", PeerAnswer: "answer", PeerData: "data",
                           PeerRejected: "rejected", PeerClosed: "closed", PeerError: "error",
                           PeerMoved: "moved"}


def relay_frame(from_sid: int, to_sid: int, client_frame: bytes) -> bytes:
    """Encode a :class:`PeerRelay` straight from a client frame (one copy)."""
    return b"".join((_RELAY_HDR.pack(RELAY, from_sid), client_frame[:1],
                     _U32.pack(to_sid), memoryview(client_frame)[5:]))


def encode(msg: PeerMessage) -> bytes:
    """Bytes for ``msg`` (control messages as ``0x00`` + JSON)."""
    if isinstance(msg, PeerRelay):
        return _RELAY_HDR.pack(RELAY, msg.from_sid) + msg.frame
    fields: dict[str, Any] = {"k": _KINDS[type(msg)]}
    if isinstance(msg, PeerIncoming):
        fields.update({"from": msg.from_sid, "conn": msg.conn, "name": msg.name,
                       "offer": msg.offer})
    elif isinstance(msg, PeerAnswer):
        fields.update({"to": msg.to_sid, "from": msg.from_sid, "answer": msg.answer})
    elif isinstance(msg, PeerData):
        fields.update({"to": msg.to_sid, "from": msg.from_sid, "data": msg.data})
    elif isinstance(msg, PeerRejected):
        fields.update({"to": msg.to_sid, "from": msg.from_sid, "reason": msg.reason,
                       "code": msg.code})
    elif isinstance(msg, PeerClosed):
        fields.update({"to": msg.to_sid, "from": msg.from_sid, "reason": msg.reason})
    elif isinstance(msg, PeerError):
        fields.update({"to": msg.to_sid, "code": msg.code, "message": msg.message})
    else:
        fields.update({"name": msg.name, "conn": msg.conn})
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return bytes([CONTROL]) + text.encode("utf-8")


def _sid(obj: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if type(value) is not int or not 0 <= value <= sp.MAX_SESSION:
        raise PeerProtocolError(f"field {key!r} is not a session id")
    return value


def _conn(obj: dict[str, Any]) -> int:
    value = obj.get("conn")
    if type(value) is not int or value < 0:
        raise PeerProtocolError("field 'conn' is not a connection id")
    return value


def _text(obj: dict[str, Any], key: str, limit: int, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise PeerProtocolError(f"field {key!r} is not a string of at most {limit}")
    return value


def _obj(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise PeerProtocolError(f"field {key!r} is not an object")
    return value


def _name(obj: dict[str, Any]) -> str:
    value = obj.get("name")
    if not isinstance(value, str) or not sp.valid_name(value):
        raise PeerProtocolError("field 'name' is not a valid name")
    return value


def decode(data: bytes) -> PeerMessage:
    """Parse one message from another instance.

    Raises:
        PeerProtocolError: empty, unknown kind, bad JSON, or a field of the wrong type.
    """
    if not data:
        raise PeerProtocolError("empty message")
    if data[0] == RELAY:
        if len(data) < _RELAY_HDR.size + 5 or data[5] not in (sp.RELAY_KIND,
                                                              sp.RELAY_BATCH_KIND):
            raise PeerProtocolError("malformed relay message")
        from_sid = _RELAY_HDR.unpack_from(data)[1]
        to_sid = _U32.unpack_from(data, 6)[0]
        return PeerRelay(from_sid, to_sid, bytes(data[5:]))
    if data[0] != CONTROL:
        raise PeerProtocolError(f"unknown message kind 0x{data[0]:02x}")
    try:
        obj = json.loads(bytes(data[1:]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PeerProtocolError(f"bad JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise PeerProtocolError("control message is not an object")
    kind = obj.get("k")
    if kind == "incoming":
        return PeerIncoming(_sid(obj, "from"), _conn(obj), _name(obj), _obj(obj, "offer"))
    if kind == "answer":
        return PeerAnswer(_sid(obj, "to"), _sid(obj, "from"), _obj(obj, "answer"))
    if kind == "data":
        return PeerData(_sid(obj, "to"), _sid(obj, "from"), _obj(obj, "data"))
    if kind == "rejected":
        return PeerRejected(_sid(obj, "to"), _sid(obj, "from"), _text(obj, "reason", 256),
                            _text(obj, "code", 256, optional=True))
    if kind == "closed":
        return PeerClosed(_sid(obj, "to", optional=True), _sid(obj, "from"),
                          _text(obj, "reason", 256))
    if kind == "error":
        return PeerError(_sid(obj, "to"), _text(obj, "code", 64), _text(obj, "message", 1024))
    if kind == "moved":
        return PeerMoved(_name(obj), _conn(obj))
    raise PeerProtocolError(f"unknown control message {kind!r}")


# --- links and pub/sub envelopes -------------------------------------------------------


@dataclass(frozen=True)
class LinkHello:
    """First frame a dialing instance sends: who it is, and the token the listening
    instance published in Redis (proof that the dialer can read the cluster's Redis)."""

    instance: str
    token: str


def encode_hello(hello: LinkHello) -> bytes:
    return json.dumps({"v": LINK_VERSION, "inst": hello.instance,
                       "token": hello.token}).encode("ascii")


def decode_hello(data: bytes) -> LinkHello:
    """Raises :class:`PeerProtocolError` for anything but a version-1 hello."""
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PeerProtocolError(f"bad link hello ({exc})") from None
    if not isinstance(obj, dict) or obj.get("v") != LINK_VERSION:
        raise PeerProtocolError("link hello of another version")
    inst, token = obj.get("inst"), obj.get("token")
    if not (isinstance(inst, str) and 0 < len(inst) <= 64 and isinstance(token, str)
            and len(token) <= 128):
        raise PeerProtocolError("malformed link hello")
    return LinkHello(inst, token)


def frame(data: bytes) -> bytes:
    """One length-prefixed link frame."""
    return _U32.pack(len(data)) + data


class FrameReader:
    """Splits a link's byte stream into frames (pure; feed it what the socket read)."""

    def __init__(self, limit: int = MAX_LINK_FRAME) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """Return every complete frame now buffered.

        Raises:
            PeerProtocolError: a frame announces more than the limit.
        """
        self._buf += data
        out: list[bytes] = []
        pos, buf = 0, self._buf
        while len(buf) - pos >= 4:
            size = _U32.unpack_from(buf, pos)[0]
            if size > self._limit:
                raise PeerProtocolError(f"link frame of {size} bytes (limit {self._limit})")
            if len(buf) - pos - 4 < size:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out


def pack_pubsub(instance: str, data: bytes) -> bytes:
    """A pub/sub message: the sender's instance id, a newline, the message."""
    return instance.encode("ascii") + b"\n" + data


def unpack_pubsub(message: bytes) -> tuple[str, bytes]:
    """``(sender instance, message)``; :class:`PeerProtocolError` if malformed."""
    head, sep, rest = message.partition(b"\n")
    if not sep or not head or len(head) > 64:
        raise PeerProtocolError("pub/sub message without a sender")
    try:
        return head.decode("ascii"), rest
    except UnicodeDecodeError:
        raise PeerProtocolError("pub/sub sender is not ASCII") from None
