"""What the peers of quictun protocol 2 send each other through the relay (pure codec).

Theory of operation
-------------------
The relay carries three JSON objects between the two peers of a session, opaque to it
(see docs/protocol.md, "Peer protocol"):

* :class:`Offer` in ``connect``/``incoming``: ``{"v": 2, "kind": "connect"|"pair",
  "pake": B64, "hint": B64}`` (``hint`` optional). The only field in clear that means
  anything is the kind; ``pake`` is the client's SPAKE2 message and ``hint`` is sealed
  to the server's box key.
* :class:`Answer` in ``answer``: ``{"v": 2, "pake": B64, "box": B64}``: the server's
  SPAKE2 message and box 0 of the server-to-client direction.
* :class:`Data` in the relay's ``data`` message: ``{"v": 2, "n": N, "box": B64}``: box
  number N of the sender's direction (the client's first is 0, the server's is 1, since
  its box 0 rode in the answer).

``B64`` is unpadded base64url, canonical (re-encoding gives the same text). Boxes are
sealed with :meth:`quictun.proto.pake.SessionKeys.seal`; inside each is one *payload*,
compact JSON padded with spaces to a multiple of :data:`PAD` bytes so that the relay
cannot count candidates: :class:`ServerHello`, :class:`ClientHello`,
:class:`CandidateUpdate` or :class:`TicketGrant` (:func:`encode_payload`,
:func:`decode_payload`).

Every decoder is strict: exactly the documented keys, exact types (a bool is not an int),
bounded sizes, canonical base64. Anything else raises :class:`OfferError`, the one error
type of this module; its ``code`` says what to do: :data:`E_VERSION` (the peer speaks
another protocol version: the message names who must upgrade), :data:`E_MALFORMED`,
:data:`E_STALE` (a timestamp outside the window, :func:`check_fresh`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .pake import HINT_SIZE, KINDS, MESSAGE_SIZE, TAG_SIZE, VERSION

__all__ = [
    "VERSION",
    "E_VERSION",
    "E_MALFORMED",
    "E_STALE",
    "PAD",
    "SKEW_MS",
    "MAX_CANDIDATES",
    "OfferError",
    "Offer",
    "Answer",
    "Data",
    "ServerHello",
    "ClientHello",
    "CandidateUpdate",
    "TicketGrant",
    "Payload",
    "decode_offer",
    "decode_answer",
    "decode_data",
    "encode_payload",
    "decode_payload",
    "check_fresh",
]

E_VERSION = "version"
E_MALFORMED = "malformed"
E_STALE = "stale"
PAD = 256  # payloads are padded to a multiple of this many bytes
MAX_BOX = 6 * 1024  # a box, before base64 (the relay's limit is 8 KiB of JSON)
MAX_CANDIDATES = 32
MAX_CANDIDATE_TEXT = 128
MAX_TICKET_TEXT = 2048
#: A timestamp may differ from our clock by this much either way (5 minutes, as
#: Kerberos allows). A server keeps its replay memory for twice this long.
SKEW_MS = 5 * 60 * 1000
_B64 = re.compile(r"[A-Za-z0-9_-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CAND = re.compile(rf"[ -~]{{1,{MAX_CANDIDATE_TEXT}}}")


class OfferError(ValueError):
    """A peer message could not be accepted.

    Attributes:
        code: :data:`E_VERSION`, :data:`E_MALFORMED` or :data:`E_STALE`.
        message: one line for people (who must do what), safe to log and to send back
            as a reject reason.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(what: str) -> OfferError:
    return OfferError(E_MALFORMED, f"malformed {what}")


def b64(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(value: object, what: str, size: int | None = None, max_size: int = MAX_BOX) -> bytes:
    if not isinstance(value, str) or len(value) > (max_size * 4 + 2) // 3 + 1:
        raise _bad(what)
    if not _B64.fullmatch(value) or len(value) % 4 == 1:
        raise _bad(what)
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise _bad(what) from None
    if b64(raw) != value or (size is not None and len(raw) != size) or len(raw) > max_size:
        raise _bad(what)  # non-canonical (stray low bits) or the wrong size
    return raw


_OTHER = {"connecting machine": "serving machine", "serving machine": "connecting machine"}


def _version(obj: object, what: str, peer: str) -> dict[str, Any]:
    """Check the object and its ``v`` before anything else, so that another version
    gets the upgrade message, not "malformed". ``peer`` names the sender's machine."""
    if not isinstance(obj, dict):
        raise _bad(what)
    v = obj.get("v")
    if v == VERSION and type(v) is int:
        return obj
    old_shape = v is None and ("mac" in obj or "nonce" in obj)  # protocol 1's fields
    me = _OTHER.get(peer, "receiving machine")
    if (type(v) is int and v < VERSION) or old_shape:
        raise OfferError(E_VERSION, f"the {peer} runs an older quictun (protocol "
                         f"{v if v is not None else 1}); upgrade quictun on the {peer} "
                         f"(the {me} speaks protocol {VERSION})")
    if type(v) is int:
        raise OfferError(E_VERSION, f"the {peer} speaks quictun protocol {v}, the {me} "
                         f"protocol {VERSION}; upgrade quictun on the {me}")
    raise _bad(what)


def _keys(obj: dict[str, Any], required: set[str], optional: set[str], what: str) -> None:
    keys = set(obj)
    if not required <= keys or not keys <= required | optional:
        raise _bad(what)


@dataclass(frozen=True)
class Offer:
    """The client's first message (rides in ``connect``, arrives in ``incoming``)."""

    kind: str
    pake: bytes
    hint: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"v": VERSION, "kind": self.kind, "pake": b64(self.pake)}
        if self.hint is not None:
            obj["hint"] = b64(self.hint)
        return obj


def decode_offer(obj: object) -> Offer:
    """The :class:`Offer` in an ``incoming``'s offer object. Raises :class:`OfferError`
    (:data:`E_VERSION` for a client of another protocol version)."""
    d = _version(obj, "offer", "connecting machine")
    _keys(d, {"v", "kind", "pake"}, {"hint"}, "offer")
    if d["kind"] not in KINDS:
        raise _bad("offer (unknown kind)")
    pake = _unb64(d["pake"], "offer (pake)", MESSAGE_SIZE)
    hint = _unb64(d["hint"], "offer (hint)", HINT_SIZE) if "hint" in d else None
    return Offer(kind=d["kind"], pake=pake, hint=hint)


@dataclass(frozen=True)
class Answer:
    """The server's reply (rides in ``answer``): its PAKE message and box 0."""

    pake: bytes
    box: bytes

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "pake": b64(self.pake), "box": b64(self.box)}


def decode_answer(obj: object) -> Answer:
    """The :class:`Answer` in an ``answer``'s object. Raises :class:`OfferError`."""
    d = _version(obj, "answer", "serving machine")
    _keys(d, {"v", "pake", "box"}, set(), "answer")
    box = _unb64(d["box"], "answer (box)")
    if len(box) < TAG_SIZE:
        raise _bad("answer (box)")
    return Answer(pake=_unb64(d["pake"], "answer (pake)", MESSAGE_SIZE), box=box)


@dataclass(frozen=True)
class Data:
    """One later box (rides in the relay's ``data`` message), numbered ``n``."""

    n: int
    box: bytes

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "n": self.n, "box": b64(self.box)}


def decode_data(obj: object) -> Data:
    """The :class:`Data` in a ``data`` message. Raises :class:`OfferError`."""
    d = _version(obj, "data", "other machine")
    _keys(d, {"v", "n", "box"}, set(), "data")
    n = d["n"]
    if type(n) is not int or not 0 <= n < 1 << 32:
        raise _bad("data (n)")
    box = _unb64(d["box"], "data (box)")
    if len(box) < TAG_SIZE:
        raise _bad("data (box)")
    return Data(n=n, box=box)


# -- payloads (inside boxes) -------------------------------------------------------------
@dataclass(frozen=True)
class ServerHello:
    """Server box 0: who it is (pinned against the ticket), where it is, when."""

    fingerprint: str  # 64 lowercase hex: SHA-256 of the server identity's SPKI
    candidates: tuple[str, ...]
    ts_ms: int
    box_key: bytes | None = None  # the server's X25519 box key (sent when pairing)


@dataclass(frozen=True)
class ClientHello:
    """Client box 0: its identity public key (raw Ed25519), candidates, time."""

    public: bytes
    candidates: tuple[str, ...]
    ts_ms: int


@dataclass(frozen=True)
class CandidateUpdate:
    """A later box: fresh candidates (after a network change)."""

    candidates: tuple[str, ...]


@dataclass(frozen=True)
class TicketGrant:
    """Pairing only, server box 1: the ticket (text) the client keeps."""

    ticket: str


Payload = ServerHello | ClientHello | CandidateUpdate | TicketGrant
_TYPES: dict[str, type] = {"server": ServerHello, "client": ClientHello,
                           "cands": CandidateUpdate, "ticket": TicketGrant}


def encode_payload(p: Payload) -> bytes:
    """Compact JSON of ``p``, padded with spaces to a multiple of :data:`PAD` bytes."""
    if isinstance(p, ServerHello):
        obj: dict[str, Any] = {"t": "server", "fp": p.fingerprint,
                               "cands": list(p.candidates), "ts": p.ts_ms}
        if p.box_key is not None:
            obj["box"] = b64(p.box_key)
    elif isinstance(p, ClientHello):
        obj = {"t": "client", "pub": b64(p.public), "cands": list(p.candidates),
               "ts": p.ts_ms}
    elif isinstance(p, CandidateUpdate):
        obj = {"t": "cands", "cands": list(p.candidates)}
    elif isinstance(p, TicketGrant):
        obj = {"t": "ticket", "ticket": p.ticket}
    else:
        raise TypeError(f"not a payload: {p!r}")
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()
    return raw + b" " * (-len(raw) % PAD)


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a number")


def _cands(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
        raise _bad("payload (cands)")
    if not all(isinstance(c, str) and _CAND.fullmatch(c) for c in value):
        raise _bad("payload (cands)")
    return tuple(value)


def _ts(value: object) -> int:
    if type(value) is not int or not 0 <= value < 1 << 53:
        raise _bad("payload (ts)")
    return value


def decode_payload(raw: bytes, *expected: type) -> Payload:
    """Parse an opened box. ``expected`` lists the payload types acceptable at this point
    of the exchange; any other raises :class:`OfferError` (:data:`E_MALFORMED`)."""
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_BOX:
        raise _bad("payload")
    try:
        obj = json.loads(bytes(raw).rstrip(b" ").decode("utf-8"),
                         parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad("payload") from None
    t = obj.get("t") if isinstance(obj, dict) else None
    if not isinstance(t, str) or _TYPES.get(t) not in expected:
        raise _bad("payload (unexpected type)")
    if t == "server":
        _keys(obj, {"t", "fp", "cands", "ts"}, {"box"}, "payload")
        if not isinstance(obj["fp"], str) or not _HEX64.fullmatch(obj["fp"]):
            raise _bad("payload (fp)")
        box = _unb64(obj["box"], "payload (box)", 32) if "box" in obj else None
        return ServerHello(obj["fp"], _cands(obj["cands"]), _ts(obj["ts"]), box)
    if t == "client":
        _keys(obj, {"t", "pub", "cands", "ts"}, set(), "payload")
        return ClientHello(_unb64(obj["pub"], "payload (pub)", 32), _cands(obj["cands"]),
                           _ts(obj["ts"]))
    if t == "cands":
        _keys(obj, {"t", "cands"}, set(), "payload")
        return CandidateUpdate(_cands(obj["cands"]))
    _keys(obj, {"t", "ticket"}, set(), "payload")
    ticket = obj["ticket"]
    if not isinstance(ticket, str) or not 0 < len(ticket) <= MAX_TICKET_TEXT \
            or not ticket.isascii() or not ticket.isprintable():
        raise _bad("payload (ticket)")
    return TicketGrant(ticket)


def check_fresh(ts_ms: int, now_ms: int, skew_ms: int = SKEW_MS) -> None:
    """Refuse a timestamp more than ``skew_ms`` from ``now_ms`` (both ms since the epoch).

    Raises:
        OfferError: :data:`E_STALE`, with the difference in the message (a recorded
            message replayed later, or a clock that is off: the message says both).
    """
    diff = now_ms - ts_ms
    if not math.isfinite(diff) or abs(diff) > skew_ms:
        way = "behind" if diff > 0 else "ahead of"
        raise OfferError(E_STALE, f"the peer's timestamp is {abs(diff) / 1000:.0f} s {way} "
                         f"this clock (more than {skew_ms // 1000} s): a replayed message, "
                         "or a clock to fix")
