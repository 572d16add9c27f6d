"""A small, pure codec for NAT-PMP (RFC 6886): external address and UDP/TCP mappings.

Theory of operation
-------------------
NAT-PMP is PCP's predecessor, still spoken by many home gateways on the same UDP port
5351. Every message starts with a version byte (0) and an opcode; a response's opcode is
the request's plus 128 and carries a 16-bit result code and the gateway's epoch
("seconds since start of epoch", §3.6).

- External address: request ``00 00`` (2 bytes); response (12 bytes) adds the gateway's
  external IPv4 address.
- Mapping (§3.3): request (12 bytes) opcode 1 (UDP) or 2 (TCP), 2 reserved bytes, the
  internal port, the suggested external port and the requested lifetime; the response
  (16 bytes) echoes the internal port and gives the mapped external port and the granted
  lifetime. The internal address is the request's source address. A request with lifetime
  0 and external port 0 deletes the mapping.
- An error response may stop after the 8-byte common part (opcode, result, epoch), e.g.
  "unsupported version" (§3.5).

:func:`decode_response` is strict: :class:`NatPmpError` for anything malformed (wrong
version, a request, a size that fits no response). A well-formed refusal decodes with
``result != SUCCESS``. :func:`epoch_ok` is the reboot check of §3.6. No I/O, no clock, no
randomness.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "NATPMP_PORT",
    "VERSION",
    "OP_EXTERNAL_ADDRESS",
    "OP_MAP_UDP",
    "OP_MAP_TCP",
    "ResultCode",
    "NatPmpError",
    "NatPmpResponse",
    "external_address_request",
    "map_request",
    "delete_request",
    "decode_response",
    "epoch_ok",
]

NATPMP_PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
_RESPONSE_BIT = 0x80
_SIZES = {OP_EXTERNAL_ADDRESS: 12, OP_MAP_UDP: 16, OP_MAP_TCP: 16}
_COMMON = 8
_MAX_LIFETIME = 0xFFFFFFFF


class ResultCode(IntEnum):
    """NAT-PMP result codes (RFC 6886 §3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class NatPmpError(ValueError):
    """Raised for a malformed NAT-PMP message (or a bad argument to a builder)."""


def external_address_request() -> bytes:
    """The 2-byte "what is your external address?" request; creates nothing."""
    return bytes((VERSION, OP_EXTERNAL_ADDRESS))


def _check_port(port: int, what: str, *, zero_ok: bool) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise NatPmpError(f"{what} out of range: {port!r}")
    if port == 0 and not zero_ok:
        raise NatPmpError(f"{what} must not be 0")


def map_request(internal_port: int, *, lifetime: int, suggested_port: int = 0,
                tcp: bool = False) -> bytes:
    """Build a mapping request (12 bytes) for ``internal_port`` on the sending host.

    Args:
        internal_port: the port the mapping is for (not 0).
        lifetime: requested seconds; 0 deletes (then ``suggested_port`` must be 0).
        suggested_port: the external port wanted, 0 for no preference.
        tcp: map TCP instead of UDP.

    Raises:
        NatPmpError: a bad port or lifetime.
    """
    _check_port(internal_port, "internal port", zero_ok=False)
    _check_port(suggested_port, "suggested port", zero_ok=True)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not (
            0 <= lifetime <= _MAX_LIFETIME):
        raise NatPmpError(f"lifetime out of range: {lifetime!r}")
    if lifetime == 0 and suggested_port:
        raise NatPmpError("a delete request suggests no external port (RFC 6886 §3.4)")
    op = OP_MAP_TCP if tcp else OP_MAP_UDP
    return struct.pack("!BBHHHI", VERSION, op, 0, internal_port, suggested_port, lifetime)


def delete_request(internal_port: int, *, tcp: bool = False) -> bytes:
    """A mapping request with lifetime 0 and external port 0: deletes the mapping."""
    return map_request(internal_port, lifetime=0, tcp=tcp)


@dataclass(frozen=True)
class NatPmpResponse:
    """A decoded NAT-PMP response; fields that the opcode does not carry are None."""

    opcode: int
    """The request's opcode (the response bit removed)."""
    result: int
    """The result code; compare with :class:`ResultCode`."""
    epoch: int
    """Seconds since the gateway's mapping state began (§3.6)."""
    external_ip: str | None = None
    """External-address response: the gateway's external IPv4 address."""
    internal_port: int | None = None
    """Mapping response: the internal port (matches the request)."""
    external_port: int | None = None
    """Mapping response: the mapped external port."""
    lifetime: int | None = None
    """Mapping response: the granted lifetime in seconds."""

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


def decode_response(data: bytes) -> NatPmpResponse:
    """Parse a NAT-PMP response.

    Success responses must have the opcode's exact size (12 or 16 bytes) and, for a
    mapping with a lifetime, non-zero ports (a deletion is confirmed with external port
    and lifetime 0); an error response may be 8 bytes or full size.

    Raises:
        NatPmpError: not a well-formed NAT-PMP response (a PCP message, version 2,
            raises too).
    """
    data = bytes(data)
    if len(data) < _COMMON:
        raise NatPmpError(f"{len(data)} bytes is shorter than any NAT-PMP response")
    version, op_r, result, epoch = struct.unpack_from("!BBHI", data, 0)
    if version != VERSION:
        raise NatPmpError(f"version {version}, not NAT-PMP version 0")
    if not op_r & _RESPONSE_BIT:
        raise NatPmpError("a request, not a response")
    opcode = op_r & 0x7F
    size = _SIZES.get(opcode)
    if size is None:
        if len(data) != _COMMON or result == ResultCode.SUCCESS:
            raise NatPmpError(f"unknown opcode {opcode}")
        return NatPmpResponse(opcode, result, epoch)
    if result != ResultCode.SUCCESS and len(data) == _COMMON:
        return NatPmpResponse(opcode, result, epoch)
    if len(data) != size:
        raise NatPmpError(f"a response to opcode {opcode} is {size} bytes, not {len(data)}")
    if opcode == OP_EXTERNAL_ADDRESS:
        ip = str(ipaddress.IPv4Address(data[8:12]))
        return NatPmpResponse(opcode, result, epoch, external_ip=ip)
    internal_port, external_port, lifetime = struct.unpack_from("!HHI", data, 8)
    if result == ResultCode.SUCCESS and lifetime and not (external_port and internal_port):
        raise NatPmpError("mapping success without a port")
    return NatPmpResponse(opcode, result, epoch, internal_port=internal_port,
                          external_port=external_port, lifetime=lifetime)


def epoch_ok(previous: tuple[float, int] | None, now: float, epoch: int) -> bool:
    """The client's reboot check (RFC 6886 §3.6): False when the gateway lost its state.

    ``previous`` is ``(client time, epoch)`` of the last response from this gateway (None
    for the first: always fine); ``now`` is the client's clock when this one arrived. The
    epoch must have advanced by at least 7/8 of the client's elapsed time, less 2 s.
    """
    if previous is None:
        return True
    prev_client, prev_epoch = previous
    expected = prev_epoch + (now - prev_client) * 7 / 8
    return epoch >= expected - 2
