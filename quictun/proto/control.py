"""What the two peers say to each other inside the QUIC connection (pure).

Theory of operation
-------------------
Stream 0, the client's first bidirectional stream, is the **control stream**. Right after
the handshake the client writes its **proof** there (:data:`PROOF_SIZE` bytes), and the
server answers with its own (:data:`SERVER_PROOF_SIZE` bytes) once the client's verified::

    client: mac (32) = proof key MAC("client proof", cb, server_fp, client_fp)
            pub (32) = the client's raw Ed25519 identity key (the one its ClientHello named)
            sig (64) = Ed25519 by that key over ("client signature", cb, TH, server_fp)
    server: mac (32) = proof key MAC("server proof", cb, server_fp, client_fp)

``cb`` is the TLS channel binding of this QUIC connection (:mod:`quictun.quic.binding`),
TH the exchange's transcript and the proof key comes from the PAKE
(:meth:`quictun.proto.pake.SessionKeys.proof`): a proof is useless on any other
connection, and only a peer that knows the secret can make one. The server runs a
:class:`ProofGate`: until the proof verifies it holds every other stream's data (at most
``hold_limit`` bytes) and connects nothing; past ``deadline`` without a proof, or past
the limit, it refuses the connection. The client closes a connection whose server proof
is wrong or late (:func:`check_server_proof`).

Every other client bidirectional stream is one forwarded connection; it starts with
:data:`STREAM_PREAMBLE` (the stream format version), so the server learns of it, and
connects its target, before the local client has said anything. Version 0 (the single
byte ``0x00``) opens the default stream service and gets no reply; version 1 is a typed
**open request** (:class:`OpenRequest`, see "Open requests" below) that the server
answers with a status (:class:`OpenReply`) before any byte of the target.

Unidirectional streams carry **candidate updates** (after a NAT moved a peer): one JSON
list of candidate texts per stream (:func:`encode_candidates`), at most
:data:`CANDIDATES_LIMIT` bytes.

Error codes in CONNECTION_CLOSE / RESET_STREAM are named here too.

Open requests
-------------
::

    request := 0x01 op(1) len(1) body(len)
      op 1 STREAM    body = service name ("" = the default one)   then the bytes, both ways
      op 2 TARGET    body = port (u16) host (ASCII)                a proxy (SOCKS) target
      op 3 DATAGRAM  body = service name ("" = default)            a UDP flow, see below
      op 4 LIST      body = ""                                     the service listing
    reply   := status(1) len(1) text(len)    status 0 (ST_OK): what follows is the
               target's bytes (STREAM, TARGET), nothing (DATAGRAM: the stream stays open
               as the flow's lifetime) or the listing (LIST, JSON, then FIN); any other
               status: ``text`` says why, and the server ends the stream.

The server reads requests only after the client's proof, so the listing and every
target are told to authenticated clients only. A UDP flow is the stream that opened
it: its DATAGRAM frames (RFC 9221) carry ``varint(stream_id / 4)`` then one UDP
payload (the "quarter stream id" of RFC 9297); closing the stream ends the flow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .identity import Identity, fingerprint_of_raw, verify_signature
from .pake import SessionKeys

__all__ = [
    "CANDIDATES_LIMIT", "CONTROL_STREAM", "ERR_AUTH", "ERR_BINDING", "ERR_FINGERPRINT",
    "ERR_LOCAL_RESET", "ERR_TARGET_UNREACHABLE", "PROOF_SIZE", "SERVER_PROOF_SIZE",
    "STREAM_PREAMBLE", "Authenticated", "ProofGate", "Refused", "check_server_proof",
    "decode_candidates_update", "encode_candidates", "make_proof",
    "OP_DATAGRAM", "OP_LIST", "OP_STREAM", "OP_TARGET", "ERR_NO_DEFAULT", "ST_OK",
    "ERR_TARGET_REFUSED", "ERR_TARGET_TIMEOUT", "describe_refusal", "reset_for_status",
    "TARGET_FAILURES",
    "Listing", "OpenReply", "OpenRequest", "ProtocolError", "decode_datagram",
    "decode_listing", "encode_datagram", "encode_listing", "parse_open", "parse_reply",
]

CONTROL_STREAM = 0
STREAM_PREAMBLE = b"\x00"  # first byte of every forwarded stream: format version 0
PROOF_SIZE = 32 + 32 + 64
SERVER_PROOF_SIZE = 32
CANDIDATES_LIMIT = 4096
MAX_UPDATE_CANDIDATES = 32

ERR_TARGET_UNREACHABLE = 0x51  # RESET_STREAM: the server could not connect the target
ERR_LOCAL_RESET = 0x52  # RESET_STREAM: the local socket was reset
ERR_NO_DEFAULT = 0x53  # RESET_STREAM: a version-0 stream, and no default stream service
ERR_TARGET_REFUSED = 0x54  # RESET_STREAM (version 0): the target refused the connection
ERR_TARGET_TIMEOUT = 0x55  # RESET_STREAM (version 0): the target did not answer in time
ERR_AUTH = 0x101  # CONNECTION_CLOSE: the client's proof did not verify (or never came)
ERR_FINGERPRINT = 0x102  # CONNECTION_CLOSE: the server's certificate is not the pinned one
ERR_BINDING = 0x103  # CONNECTION_CLOSE: this QUIC engine gives no TLS channel binding


def make_proof(keys: SessionKeys, binding: bytes, server_fp: str, identity: Identity) -> bytes:
    """The client's proof for this connection (see the module docstring)."""
    mac = keys.proof("client", binding, server_fp, identity.fingerprint)
    sig = identity.sign(keys.client_signature_input(binding, server_fp))
    return mac + identity.public_bytes + sig


def check_server_proof(keys: SessionKeys, given: bytes, binding: bytes, server_fp: str,
                       client_fp: str) -> bool:
    """Whether ``given`` is the server's proof for this connection."""
    return keys.check_proof("server", given, binding, server_fp, client_fp)


def encode_candidates(cands: list[str]) -> bytes:
    """One candidate update (the payload of one unidirectional stream)."""
    return json.dumps(cands).encode()


def decode_candidates_update(raw: bytes) -> list[str]:
    """The candidate texts of one update; [] for anything that is not a JSON list (the
    texts themselves are checked by :func:`quictun.proto.addr.decode_candidates`)."""
    try:
        cands = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(cands, list):
        return []
    return [c for c in cands if isinstance(c, str)][:MAX_UPDATE_CANDIDATES]


@dataclass(frozen=True)
class Authenticated:
    """The proof verified: send ``reply`` on the control stream, deliver ``held`` (in
    order) and serve the client."""

    client_fp: str
    held: tuple[tuple[int, bytes, bool], ...]
    """``(stream_id, data, end)`` of every stream event held before the proof."""
    reply: bytes
    """The server's proof, for the control stream."""


@dataclass(frozen=True)
class Refused:
    """Close the connection with :data:`ERR_AUTH`."""

    reason: str


class ProofGate:
    """The server's side of the client proof, for one connection (time passed in).

    After creating it, feed :meth:`control_data` (stream 0) and :meth:`hold` (any other
    stream's data before the proof), :meth:`set_binding` once the TLS handshake is done,
    arm a timer for :meth:`get_timer` and call :meth:`handle_timer` when it fires. Each
    returns None, or the one verdict (:class:`Authenticated` or :class:`Refused`); after
    a verdict the gate is done and returns None for everything.
    """

    def __init__(self, keys: SessionKeys, server_fp: str, client_pub: bytes, *,
                 now: float, deadline: float, hold_limit: int) -> None:
        self._keys = keys
        self._server_fp = server_fp
        self.client_pub = client_pub
        self.client_fp = fingerprint_of_raw(client_pub)
        self._deadline: float | None = now + deadline
        self._deadline_secs = deadline
        self._hold_limit = hold_limit
        self._control = bytearray()
        self._binding: bytes | None = None
        self._held: list[tuple[int, bytes, bool]] = []
        self._held_bytes = 0
        self.done = False
        self.authenticated = False

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called (the proof deadline), or None."""
        return None if self.done else self._deadline

    def handle_timer(self, now: float) -> Refused | None:
        if self.done or self._deadline is None or now < self._deadline:
            return None
        return self._refuse(f"no valid proof within {self._deadline_secs:.0f} s")

    def hold(self, stream_id: int, data: bytes, end: bool) -> Refused | None:
        """Keep one stream event until the proof verifies."""
        if self.done:
            return None
        self._held.append((stream_id, data, end))
        self._held_bytes += len(data)
        if self._held_bytes > self._hold_limit:
            return self._refuse("too much data before authentication")
        return None

    def set_binding(self, binding: bytes) -> Authenticated | Refused | None:
        """The TLS channel binding of this connection (the proof may be checked now)."""
        self._binding = binding
        return self._verify()

    def control_data(self, data: bytes) -> Authenticated | Refused | None:
        """Bytes of the control stream (the caller has consumed them)."""
        if self.done:
            return None
        self._control.extend(data)
        if len(self._control) > PROOF_SIZE:
            return self._refuse("more than a proof on the control stream")
        return self._verify()

    def _verify(self) -> Authenticated | Refused | None:
        if self.done or self._binding is None or len(self._control) < PROOF_SIZE:
            return None
        blob, cb = bytes(self._control), self._binding
        mac, pub, sig = blob[:32], blob[32:64], blob[64:]
        keys, fp = self._keys, self._server_fp
        if not (keys.check_proof("client", mac, cb, fp, self.client_fp)
                and pub == self.client_pub
                and verify_signature(pub, sig, keys.client_signature_input(cb, fp))):
            return self._refuse("client proof did not verify")
        self.done = self.authenticated = True
        held, self._held = tuple(self._held), []
        return Authenticated(self.client_fp, held, keys.proof("server", cb, fp, self.client_fp))

    def _refuse(self, reason: str) -> Refused:
        self.done = True
        self._held = []
        return Refused(reason)


# -- open requests (see "Open requests" in the module docstring) ------------------------
OPEN_V1 = 0x01
OP_STREAM, OP_TARGET, OP_DATAGRAM, OP_LIST = 1, 2, 3, 4
REQUEST_LIMIT = 3 + 255
LISTING_LIMIT = 16384

# reply statuses; 2-8 are RFC 1928's SOCKS5 reply codes, so a proxy passes them through
ST_OK = 0
ST_FAILURE = 1
ST_NOT_ALLOWED = 2
ST_NET_UNREACHABLE = 3
ST_HOST_UNREACHABLE = 4
ST_REFUSED = 5
ST_TIMEOUT = 6
ST_NOT_SUPPORTED = 7
ST_BAD_ADDRESS = 8
ST_UNKNOWN_SERVICE = 9
ST_NAME_NOT_FOUND = 10


class ProtocolError(ValueError):
    """A malformed open request or reply: the stream is reset."""


@dataclass(frozen=True)
class OpenRequest:
    """What a client stream asks for. ``version`` 0 is the bare preamble (the default
    stream service, no reply); 1 is a typed request of operation ``op``."""

    op: int
    service: str | None = None
    """STREAM, DATAGRAM: the service name, None for the default."""
    host: str = ""
    port: int = 0
    version: int = 1

    def encode(self) -> bytes:
        if self.version == 0:
            return STREAM_PREAMBLE
        if self.op == OP_TARGET:
            body = self.port.to_bytes(2, "big") + self.host.encode("ascii")
        elif self.op in (OP_STREAM, OP_DATAGRAM):
            body = (self.service or "").encode("ascii")
        else:
            body = b""
        if len(body) > 255:
            raise ValueError("open request too long")
        return bytes([OPEN_V1, self.op, len(body)]) + body


def parse_open(buf: bytes) -> tuple[OpenRequest, int] | None:
    """The request at the start of a client stream and its length, or None (need more
    bytes). Raises :class:`ProtocolError`."""
    if not buf:
        return None
    if buf[0] == STREAM_PREAMBLE[0]:
        return OpenRequest(OP_STREAM, version=0), 1
    if buf[0] != OPEN_V1:
        raise ProtocolError(f"unknown stream format {buf[0]}")
    if len(buf) < 3 or len(buf) < 3 + buf[2]:
        return None
    op, body = buf[1], bytes(buf[3:3 + buf[2]])
    used = 3 + buf[2]
    if op in (OP_STREAM, OP_DATAGRAM):
        return OpenRequest(op, service=_ascii(body) or None), used
    if op == OP_TARGET:
        if len(body) < 3:
            raise ProtocolError("target request without a host")
        return OpenRequest(op, host=_ascii(body[2:]),
                           port=int.from_bytes(body[:2], "big")), used
    if op == OP_LIST:
        return OpenRequest(op), used
    raise ProtocolError(f"unknown open operation {op}")


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("open request is not ASCII") from None


@dataclass(frozen=True)
class OpenReply:
    """The server's answer to a version-1 request."""

    status: int
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == ST_OK

    def encode(self) -> bytes:
        raw = self.text.encode("utf-8", "replace")[:255]
        return bytes([self.status, len(raw)]) + raw


def reset_for_status(status: int) -> int:
    """The RESET_STREAM code that tells a version-0 client (no reply) why its target
    failed: refused, timed out, or just unreachable."""
    return {ST_REFUSED: ERR_TARGET_REFUSED, ST_TIMEOUT: ERR_TARGET_TIMEOUT}.get(
        status, ERR_TARGET_UNREACHABLE)


_CAUSES = {ST_REFUSED: "refused the connection", ST_TIMEOUT: "did not answer in time",
           ST_NET_UNREACHABLE: "is on an unreachable network",
           ST_HOST_UNREACHABLE: "is on an unreachable host",
           ST_NAME_NOT_FOUND: "has a name that does not resolve"}
_RESET_CAUSES = {ERR_TARGET_REFUSED: ST_REFUSED, ERR_TARGET_TIMEOUT: ST_TIMEOUT}
TARGET_FAILURES = frozenset(_CAUSES)
"""Reply statuses that mean "the target itself failed" (not "you may not", "no such")."""


def describe_refusal(name: str, service: str | None, status: int, target: str = "",
                     detail: str = "") -> str:
    """One line for a client whose stream ``name``'s server could not connect: e.g.
    "the service behind 'x' (127.0.0.1:9) refused the connection". ``status`` is the
    reply's, or a version-0 reset code; ``target`` the service's target, if known."""
    status = _RESET_CAUSES.get(status, status)
    what = f"the service {service!r} of {name!r}" if service else f"the service behind {name!r}"
    cause = _CAUSES.get(status, "could not be connected")
    line = f"{what}{f' ({target})' if target else ''} {cause}"
    if detail and not target:
        line += f" ({detail})"
    return line + ("; check that it runs on the serving machine" if status == ST_REFUSED else "")


def parse_reply(buf: bytes) -> tuple[OpenReply, int] | None:
    """The reply at the start of a server stream and its length, or None (need more)."""
    if len(buf) < 2 or len(buf) < 2 + buf[1]:
        return None
    text = bytes(buf[2:2 + buf[1]]).decode("utf-8", "replace")
    return OpenReply(buf[0], text), 2 + buf[1]


# -- DATAGRAM frames: varint(flow id) + payload (RFC 9000 section 16 varints) ----------
def varint_size(v: int) -> int:
    return 1 if v < 0x40 else 2 if v < 0x4000 else 4 if v < 0x40000000 else 8


def encode_datagram(flow_id: int, payload: bytes) -> bytes:
    """One DATAGRAM frame's payload for flow ``flow_id`` (its stream id / 4)."""
    n = varint_size(flow_id)
    tag = {1: 0, 2: 0x4000, 4: 0x8000_0000, 8: 0xC000_0000_0000_0000}[n]
    return (flow_id | tag).to_bytes(n, "big") + payload


def decode_datagram(data: bytes) -> tuple[int, bytes] | None:
    """(flow id, payload) of a received DATAGRAM frame; None if it is too short."""
    if not data:
        return None
    n = 1 << (data[0] >> 6)
    if len(data) < n:
        return None
    flow = int.from_bytes(data[:n], "big") & ((1 << (8 * n - 2)) - 1)
    return flow, data[n:]


# -- the service listing (the LIST reply) ------------------------------------------------
@dataclass(frozen=True)
class Listing:
    """What ``connect --list`` shows: the services (name, kind, whether default) and the
    proxy rules (empty: no SOCKS)."""

    services: tuple[tuple[str, str, bool], ...]
    allow: tuple[str, ...] = field(default=())
    targets: tuple[tuple[str, str], ...] = field(default=())
    """(service, its target) as ``serve`` has it, so that a client can say which one
    refused (an older server sends none)."""

    def target_of(self, service: str | None) -> str:
        """The target of ``service`` (None: the default stream service), or ""."""
        if service is None:
            service = next((n for n, k, d in self.services if d and k != "udp"), None)
        return dict(self.targets).get(service or "", "")


def encode_listing(listing: Listing) -> bytes:
    targets = dict(listing.targets)
    return json.dumps({"services": [{"name": n, "kind": k, "default": d,
                                     **({"target": targets[n]} if n in targets else {})}
                                    for n, k, d in listing.services],
                       "allow": list(listing.allow)}).encode()[:LISTING_LIMIT]


def decode_listing(raw: bytes) -> Listing:
    """Raises :class:`ProtocolError` for anything that is not a listing."""
    try:
        obj = json.loads(raw)
        services = tuple((str(s["name"]), str(s["kind"]), bool(s.get("default")))
                         for s in obj["services"])
        allow = tuple(str(a) for a in obj.get("allow", []))
        targets = tuple((str(s["name"]), str(s["target"])[:300]) for s in obj["services"]
                        if "target" in s)
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("malformed service listing") from None
    return Listing(services, allow, targets)
