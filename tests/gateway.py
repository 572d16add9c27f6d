"""A scriptable PCP/NAT-PMP gateway on a loopback address, for the port mapper's tests.

It speaks just enough of RFC 6887 and RFC 6886 (laid out here with ``struct``, not with
the codecs under test) to grant, renew and delete mappings, and can be told to misbehave:
send junk first, stay silent, refuse, or move the external port. Every request it gets
is recorded in ``requests`` as ``(protocol, fields)``.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field

EXTERNAL_IP = "203.0.113.7"


def loopback_ip() -> str:
    """A random 127.x.y.z address, so that parallel tests never share port 5351."""
    return f"127.{random.randint(1, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


@dataclass
class Behaviour:
    """What the gateway does; change the fields while a test runs."""

    silent: bool = False
    junk_first: bool = False
    pcp_result: int = 0
    natpmp_result: int = 0
    speak_pcp: bool = True  # False: answer PCP with NAT-PMP's "unsupported version"
    granted_lifetime: int | None = None  # None: grant what was asked
    external_port_offset: int = 0  # added to the suggested port (moves the mapping)
    drop_renewals: bool = False
    delay: float = 0.0  # seconds before each answer leaves (a slow gateway)


@dataclass
class FakeGateway(asyncio.DatagramProtocol):
    ip: str
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    epoch: int = 1000
    transport: asyncio.DatagramTransport | None = None
    mapped: dict[int, int] = field(default_factory=dict)  # internal -> external port
    external_ip: str = EXTERNAL_IP  # what it reports as its public address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        b = self.behaviour
        if len(data) >= 2 and data[0] == 2 and len(data) >= 60 and data[1] == 1:
            answers = self._pcp(data)
        elif len(data) == 24 and data[0] == 2 and data[1] == 0:  # PCP ANNOUNCE
            self.requests.append(("pcp-announce", {}))
            answers = [struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, self.epoch) + bytes(12)
                       if b.speak_pcp else struct.pack("!BBHI", 0, 0x80, 1, self.epoch)]
        elif len(data) >= 2 and data[0] == 0:
            answers = self._natpmp(data)
        else:
            answers = []
        if b.silent or self.transport is None:
            return
        if b.junk_first:
            answers = [b"\x02\x81junk", bytes(60), b"\x00\x81" + bytes(14),
                       b"\x02\x81" + bytes(58)] + answers
        for answer in answers:
            if b.delay:
                asyncio.get_running_loop().call_later(b.delay, self.transport.sendto,
                                                      answer, addr)
            else:
                self.transport.sendto(answer, addr)

    def _renewal_dropped(self, internal: int, lifetime: int) -> bool:
        return self.behaviour.drop_renewals and lifetime > 0 and internal in self.mapped

    def _pcp(self, data: bytes) -> list[bytes]:
        b = self.behaviour
        lifetime = struct.unpack_from("!I", data, 4)[0]
        nonce = data[24:36]
        proto, internal, suggested = struct.unpack_from("!B3xHH", data, 36)
        self.requests.append(("pcp", {"lifetime": lifetime, "nonce": nonce,
                                      "internal": internal, "suggested": suggested,
                                      "client": socket.inet_ntoa(data[20:24])}))
        if not b.speak_pcp:
            return [struct.pack("!BBHI", 0, 0x81, 1, self.epoch)]
        if self._renewal_dropped(internal, lifetime):
            return []
        external = (suggested or internal) + b.external_port_offset
        granted = lifetime if b.granted_lifetime is None or not lifetime else b.granted_lifetime
        if b.pcp_result == 0 and lifetime:
            self.mapped[internal] = external
        elif lifetime == 0:
            self.mapped.pop(internal, None)
        head = struct.pack("!BBBBII", 2, 0x81, 0, b.pcp_result, granted, self.epoch) + bytes(12)
        body = nonce + struct.pack("!B3xHH", proto, internal, external if lifetime else 0)
        ext_ip = bytes(10) + b"\xff\xff" + socket.inet_aton(self.external_ip)
        return [head + body + ext_ip]

    def _natpmp(self, data: bytes) -> list[bytes]:
        b = self.behaviour
        if data[1] == 0:
            self.requests.append(("natpmp-address", {}))
            return [struct.pack("!BBHI", 0, 128, b.natpmp_result, self.epoch)
                    + socket.inet_aton(self.external_ip)]
        if data[1] != 1 or len(data) < 12:
            return []
        internal, suggested, lifetime = struct.unpack_from("!HHI", data, 4)
        self.requests.append(("natpmp", {"lifetime": lifetime, "internal": internal,
                                         "suggested": suggested}))
        if self._renewal_dropped(internal, lifetime):
            return []
        if b.natpmp_result:
            return [struct.pack("!BBHI", 0, 129, b.natpmp_result, self.epoch)]
        external = (suggested or internal) + b.external_port_offset if lifetime else 0
        granted = lifetime if b.granted_lifetime is None or not lifetime else b.granted_lifetime
        if lifetime:
            self.mapped[internal] = external
        else:
            self.mapped.pop(internal, None)
        return [struct.pack("!BBHIHHI", 0, 129, 0, self.epoch, internal, external, granted)]


async def start_gateway(ip: str | None = None, *, external_ip: str = EXTERNAL_IP
                        ) -> FakeGateway:
    """A gateway listening on ``ip`` (random loopback address by default), port 5351,
    that reports ``external_ip`` as its public address (pass its own loopback address
    for mappings that really reach a socket bound to all addresses, on this host)."""
    loop = asyncio.get_running_loop()
    gw = FakeGateway(ip or loopback_ip(), external_ip=external_ip)
    await loop.create_datagram_endpoint(lambda: gw, local_addr=(gw.ip, 5351))
    return gw
