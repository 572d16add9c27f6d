"""A small, pure codec for the Port Control Protocol, PCP (RFC 6887), MAP and ANNOUNCE.

Theory of operation
-------------------
A PCP client asks the gateway (UDP port 5351) to MAP an internal port of the host that
sends the request to an external address. Every message is a 24-byte header, then
opcode-specific data, then options (TLVs padded to 4 bytes); at most 1100 bytes, always a
multiple of 4 (§7).

- Request header: version 2, R=0 and the opcode, 2 reserved bytes, the requested lifetime
  in seconds, and the client's own IP address as 16 bytes (an IPv4 address is written
  IPv4-mapped, ``::ffff:a.b.c.d``).
- Response header: version 2, R=1 and the opcode, 1 reserved byte, the result code, the
  granted lifetime (for an error: how long the error is likely to last), the server's
  epoch (seconds since its mapping state began) and 12 reserved bytes.
- MAP data (§11.1): a 12-byte nonce that the client picks and that the response must echo,
  the protocol (17 UDP), 3 reserved bytes, the internal port, the suggested (request) or
  assigned (response) external port and external address. A MAP with lifetime 0 deletes
  the mapping named by the same nonce, protocol and internal port.
- ANNOUNCE (§14.1) has no data: a request learns whether PCP is there; unsolicited
  ANNOUNCE responses tell clients that the server lost its state.

:func:`decode_response` is strict and raises :class:`PcpError` on anything malformed
(wrong version, a request instead of a response, bad size, truncated option). A
well-formed refusal is not an error: it decodes with ``result != SUCCESS``. Matching a
response to the request (:func:`matches`) and the epoch check (:func:`epoch_ok`, §8.5) are
the caller's to apply. No I/O, no clock, no randomness: nonces and times are passed in.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "PCP_PORT",
    "PCP_CLIENT_PORT",
    "VERSION",
    "OP_ANNOUNCE",
    "OP_MAP",
    "PROTO_UDP",
    "PROTO_TCP",
    "HEADER_SIZE",
    "MAP_SIZE",
    "MAX_MESSAGE",
    "ResultCode",
    "PcpError",
    "PcpResponse",
    "encode_ip",
    "decode_ip",
    "map_request",
    "delete_request",
    "announce_request",
    "decode_response",
    "matches",
    "epoch_ok",
]

PCP_PORT = 5351
"""The server's port (requests go here)."""
PCP_CLIENT_PORT = 5350
"""Where servers multicast unsolicited ANNOUNCE responses (224.0.0.1, ff02::1)."""
VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
_RESPONSE_BIT = 0x80
PROTO_UDP = 17
PROTO_TCP = 6
HEADER_SIZE = 24
MAP_SIZE = 36
MAX_MESSAGE = 1100
_MAX_LIFETIME = 0xFFFFFFFF


class ResultCode(IntEnum):
    """PCP result codes (RFC 6887 §7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class PcpError(ValueError):
    """Raised for a malformed PCP message (or a bad argument to a builder)."""


def encode_ip(ip: str) -> bytes:
    """The 16-byte PCP form of ``ip``: IPv6 as is, IPv4 as ``::ffff:a.b.c.d``.

    Raises:
        PcpError: not an IP address.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError as exc:
        raise PcpError(f"not an IP address: {ip!r}") from exc
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def decode_ip(raw: bytes) -> str:
    """The address in a 16-byte PCP field; IPv4-mapped addresses come back as IPv4.

    Raises:
        PcpError: not 16 bytes.
    """
    if len(raw) != 16:
        raise PcpError(f"an address field is 16 bytes, not {len(raw)}")
    addr = ipaddress.IPv6Address(bytes(raw))
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _check_port(port: int, what: str, *, zero_ok: bool) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise PcpError(f"{what} out of range: {port!r}")
    if port == 0 and not zero_ok:
        raise PcpError(f"{what} must not be 0")


def _header(opcode: int, lifetime: int, client_ip: str) -> bytes:
    if isinstance(lifetime, bool) or not 0 <= lifetime <= _MAX_LIFETIME:
        raise PcpError(f"lifetime out of range: {lifetime!r}")
    return struct.pack("!BBHI", VERSION, opcode, 0, lifetime) + encode_ip(client_ip)


def map_request(nonce: bytes, internal_port: int, client_ip: str, *, lifetime: int,
                protocol: int = PROTO_UDP, suggested_port: int = 0,
                suggested_ip: str | None = None) -> bytes:
    """Build a MAP request (60 bytes).

    Args:
        nonce: 12 bytes chosen by the caller (``os.urandom(12)``); reuse it to renew or
            delete the same mapping.
        internal_port: the port on this host that the mapping is for (not 0).
        client_ip: this host's address as the gateway sees the request's source; a
            mismatch gets ``ADDRESS_MISMATCH``.
        lifetime: requested seconds; 0 deletes the mapping.
        protocol: IANA protocol number, 17 (UDP) by default.
        suggested_port: the external port wanted, 0 for no preference.
        suggested_ip: the external address wanted; None means none, written as the
            all-zero address of ``client_ip``'s family (§11.1).

    Raises:
        PcpError: a bad nonce, port, lifetime or address.
    """
    if len(nonce) != 12:
        raise PcpError("the MAP nonce is 12 bytes")
    if not 0 < protocol <= 0xFF:
        raise PcpError(f"protocol out of range: {protocol!r}")
    _check_port(internal_port, "internal port", zero_ok=False)
    _check_port(suggested_port, "suggested port", zero_ok=True)
    if suggested_ip is None:
        suggested_ip = "0.0.0.0" if ":" not in client_ip else "::"
    body = (bytes(nonce) + struct.pack("!B3xHH", protocol, internal_port, suggested_port)
            + encode_ip(suggested_ip))
    return _header(OP_MAP, lifetime, client_ip) + body


def delete_request(nonce: bytes, internal_port: int, client_ip: str, *,
                   protocol: int = PROTO_UDP) -> bytes:
    """A MAP request with lifetime 0: deletes the mapping made with the same ``nonce``."""
    return map_request(nonce, internal_port, client_ip, lifetime=0, protocol=protocol)


def announce_request(client_ip: str) -> bytes:
    """An ANNOUNCE request (24 bytes): does the gateway speak PCP? Creates nothing."""
    return _header(OP_ANNOUNCE, 0, client_ip)


@dataclass(frozen=True)
class PcpResponse:
    """A decoded PCP response. The MAP fields are None for ANNOUNCE and for an error
    response that carries no MAP data."""

    opcode: int
    """The request's opcode (the R bit removed): ``OP_ANNOUNCE`` or ``OP_MAP``."""
    result: int
    """The result code; compare with :class:`ResultCode` (unknown codes stay ints)."""
    lifetime: int
    """Granted seconds (success), or how long the error is expected to last."""
    epoch: int
    """The server's epoch time: seconds since its mapping state began (§8.5)."""
    nonce: bytes | None = None
    """MAP: the echoed 12-byte nonce."""
    protocol: int | None = None
    """MAP: the protocol number."""
    internal_port: int | None = None
    """MAP: the internal port."""
    external_port: int | None = None
    """MAP: the assigned external port."""
    external_ip: str | None = None
    """MAP: the assigned external address (IPv4-mapped ones unmapped)."""
    options: tuple[tuple[int, bytes], ...] = ()
    """Options as ``(code, data)`` pairs in wire order, padding stripped."""

    @property
    def ok(self) -> bool:
        """True for ``SUCCESS``."""
        return self.result == ResultCode.SUCCESS

    @property
    def result_name(self) -> str:
        """The result code's name, or ``"result <n>"`` for an unknown one."""
        try:
            return ResultCode(self.result).name
        except ValueError:
            return f"result {self.result}"


def _options(data: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    while pos < len(data):
        if pos + 4 > len(data):
            raise PcpError("truncated option header")
        code, _, length = struct.unpack_from("!BBH", data, pos)
        end = pos + 4 + length
        padded = end + (-length % 4)
        if padded > len(data):
            raise PcpError(f"truncated option {code}")
        out.append((code, data[pos + 4:end]))
        pos = padded
    return tuple(out)


def decode_response(data: bytes) -> PcpResponse:
    """Parse a PCP response (ANNOUNCE or MAP).

    A MAP success must carry the 36 bytes of MAP data and, unless it confirms a deletion
    (lifetime 0), an external address and port; a MAP error may carry them or stop
    after the header. Other opcodes' data is not
    parsed: the response then has no MAP fields and no options.

    Raises:
        PcpError: not a well-formed PCP version 2 response. A NAT-PMP gateway answers a
            PCP request with a version-0 message: that raises too (``"version 0"``).
    """
    data = bytes(data)
    if len(data) < 4:
        raise PcpError(f"{len(data)} bytes is shorter than any PCP message")
    if data[0] != VERSION:
        raise PcpError(f"version {data[0]}, not PCP version 2")
    if len(data) < HEADER_SIZE or len(data) > MAX_MESSAGE or len(data) % 4:
        raise PcpError(f"bad PCP message size {len(data)}")
    op_r, result, lifetime, epoch = struct.unpack_from("!BxBII", data, 1)
    if not op_r & _RESPONSE_BIT:
        raise PcpError("a request, not a response")
    opcode = op_r & 0x7F
    if opcode == OP_ANNOUNCE:
        return PcpResponse(OP_ANNOUNCE, result, lifetime, epoch,
                           options=_options(data, HEADER_SIZE))
    if opcode != OP_MAP:
        return PcpResponse(opcode, result, lifetime, epoch)
    if len(data) < HEADER_SIZE + MAP_SIZE:
        if result == ResultCode.SUCCESS:
            raise PcpError("MAP success without MAP data")
        return PcpResponse(OP_MAP, result, lifetime, epoch)
    body = data[HEADER_SIZE:HEADER_SIZE + MAP_SIZE]
    protocol, internal_port, external_port = struct.unpack_from("!B3xHH", body, 12)
    external_ip = decode_ip(body[20:36])
    unassigned = external_port == 0 or external_ip in ("0.0.0.0", "::")
    if result == ResultCode.SUCCESS and lifetime and unassigned:
        raise PcpError("MAP success without an external address")
    return PcpResponse(OP_MAP, result, lifetime, epoch, nonce=body[:12], protocol=protocol,
                       internal_port=internal_port, external_port=external_port,
                       external_ip=external_ip,
                       options=_options(data, HEADER_SIZE + MAP_SIZE))


def matches(resp: PcpResponse, nonce: bytes, internal_port: int,
            protocol: int = PROTO_UDP) -> bool:
    """True when ``resp`` answers the MAP request made with these values (§11.3)."""
    return (resp.opcode == OP_MAP and resp.nonce == nonce
            and resp.internal_port == internal_port and resp.protocol == protocol)


def epoch_ok(previous: tuple[float, int] | None, now: float, epoch: int) -> bool:
    """The client's epoch check (RFC 6887 §8.5): False when the server lost its state.

    Args:
        previous: ``(client time, server epoch)`` of the last response from this
            server, or None for the first one (always fine).
        now: the client's clock (seconds, any origin) when this response arrived.
        epoch: this response's epoch.

    When False, every mapping made with this server must be requested again.
    """
    if previous is None:
        return True
    prev_client, prev_epoch = previous
    if epoch + 2 < prev_epoch:
        return False
    client_delta = now - prev_client
    server_delta = epoch - prev_epoch
    if client_delta + 2 < server_delta - server_delta / 16:
        return False
    return not server_delta + 2 < client_delta - client_delta / 16
