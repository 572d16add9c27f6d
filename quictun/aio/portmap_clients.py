"""The three port-mapping clients behind :class:`quictun.aio.portmap.PortMapper`.

Each client maps one internal UDP port through one protocol and exposes the same small
interface (:class:`MapClient`): ``request()``, ``renew(mapping)``, ``delete()`` and
``delete_sync(timeout)``, plus ``touched`` (the router may hold state from us, so closing
must ask it to delete) and ``outcome`` (a short text for logs and diagnostics). The wire
formats are the pure codecs of :mod:`quictun.proto`; here are only sockets and timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..config import PORTMAP_PROTOCOLS, PortmapConfig
from ..proto import natpmp, pcp, upnp
from . import upnp as upnp_io

__all__ = ["PROTOCOLS", "PortmapConfig", "Mapping", "MapClient", "PcpClient",
           "NatPmpClient", "UpnpClient", "probe_pcp", "probe_natpmp"]

log = logging.getLogger("quictun.portmap")

PROTOCOLS = PORTMAP_PROTOCOLS
T = TypeVar("T")


@dataclass(frozen=True)
class Mapping:
    """A port mapping granted by the gateway."""

    protocol: str
    """``"pcp"``, ``"natpmp"`` or ``"upnp"``."""
    external: tuple[str, int]
    """The public address and port that now reach the internal port."""
    internal_port: int
    """The tunnel socket's port."""
    lifetime: int
    """Seconds granted (0: a permanent UPnP lease, still deleted on close)."""
    gateway: str
    """Who granted it (the gateway or the UPnP device's address)."""
    granted_at: float = 0.0
    """Event-loop time of the grant or last renewal."""

    @property
    def expires_at(self) -> float | None:
        """Event-loop time when it lapses unless renewed (None for a permanent lease)."""
        return self.granted_at + self.lifetime if self.lifetime else None


class _GiveUp(Exception):
    """Raised by an ``accept`` function: stop waiting, with this reason."""


class _UdpChannel:
    """A fresh UDP socket connected to ``gateway:port`` (so only its answers arrive and
    an ICMP "port unreachable" shows up as ConnectionRefusedError)."""

    def __init__(self, gateway: str, port: int, local_ip: str | None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind((local_ip or "0.0.0.0", 0))
            self.sock.connect((gateway, port))
        except BaseException:
            self.sock.close()
            raise
        self.client_ip: str = self.sock.getsockname()[0]

    def close(self) -> None:
        self.sock.close()

    async def exchange(self, payload: bytes, accept: Callable[[bytes], T | None],
                       cfg: PortmapConfig) -> T | None:
        """Send ``payload`` at ``cfg.retransmits`` until ``accept`` returns non-None for
        an answer, up to ``cfg.udp_wait`` s; None on timeout or ICMP refusal.

        Raises:
            _GiveUp: from ``accept``.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + cfg.udp_wait
        sends = sorted(cfg.retransmits)
        while True:
            now = loop.time()
            while sends and start + sends[0] <= now:
                sends.pop(0)
                try:
                    self.sock.send(payload)
                except OSError as exc:  # e.g. ENETUNREACH, or an earlier ICMP error
                    raise _GiveUp(f"send failed: {exc}") from exc
            if now >= deadline:
                return None
            wake = min(deadline, start + sends[0]) if sends else deadline
            try:
                async with asyncio.timeout(max(0.0, wake - now)):
                    data = await loop.sock_recv(self.sock, 2048)
            except TimeoutError:
                continue
            except ConnectionRefusedError as exc:
                raise _GiveUp("port unreachable (ICMP)") from exc
            result = accept(data)
            if result is not None:
                return result


class MapClient:
    """One protocol's client for one internal port (see the module docstring)."""

    name = "?"

    def __init__(self, gateway: str | None, internal_port: int, cfg: PortmapConfig) -> None:
        self.gateway = gateway
        self.port = internal_port
        self.cfg = cfg
        self.touched = False
        self.answered = False  # the gateway answered one of our requests
        self.outcome = "not tried"

    async def request(self) -> Mapping | None:
        """Ask for a new mapping; None if refused or unanswered (``outcome`` says why)."""
        raise NotImplementedError

    async def renew(self, mapping: Mapping) -> Mapping | None:
        """Extend ``mapping`` (asking for the same external address); None on failure."""
        raise NotImplementedError

    async def delete(self) -> None:
        """Ask the router to delete what this client mapped; never raises."""
        raise NotImplementedError

    def delete_sync(self, timeout: float) -> None:
        """Blocking best-effort :meth:`delete` (no event loop needed); never raises."""
        raise NotImplementedError

    def _now(self) -> float:
        return asyncio.get_running_loop().time()


def _unsupported_version(data: bytes) -> bool:
    """A NAT-PMP gateway's answer to a PCP request (RFC 6887 §9: version negotiation)."""
    try:
        return natpmp.decode_response(data).result == natpmp.ResultCode.UNSUPPORTED_VERSION
    except natpmp.NatPmpError:
        return False


class PcpClient(MapClient):
    """PCP MAP (RFC 6887) with one nonce for the life of the mapping."""

    name = "pcp"

    def __init__(self, gateway: str, internal_port: int, cfg: PortmapConfig,
                 nonce: bytes) -> None:
        super().__init__(gateway, internal_port, cfg)
        self.nonce = nonce
        self.client_ip: str | None = None
        self._epoch: tuple[float, int] | None = None

    def _accept(self, data: bytes) -> pcp.PcpResponse | None:
        try:
            resp = pcp.decode_response(data)
        except pcp.PcpError as exc:
            if _unsupported_version(data):
                raise _GiveUp("the gateway speaks NAT-PMP, not PCP") from exc
            log.debug("portmap: pcp: answer ignored: %s", exc)
            return None
        if resp.opcode != pcp.OP_MAP:
            return None
        if resp.nonce is None and not resp.ok:
            return resp  # an error without MAP data: the socket only hears the gateway
        return resp if pcp.matches(resp, self.nonce, self.port) else None

    async def _map(self, lifetime: int, suggested: tuple[str, int] | None
                   ) -> pcp.PcpResponse | None:
        assert self.gateway is not None
        try:
            chan = _UdpChannel(self.gateway, pcp.PCP_PORT, self.cfg.local_ip)
        except OSError as exc:
            self.outcome = f"no socket: {exc}"
            return None
        try:
            self.client_ip = chan.client_ip
            ip, port = suggested if suggested else (None, self.port)
            payload = pcp.map_request(self.nonce, self.port, chan.client_ip,
                                      lifetime=lifetime, suggested_port=port,
                                      suggested_ip=ip)
            self.touched = True
            resp = await chan.exchange(payload, self._accept, self.cfg)
        except _GiveUp as exc:
            self.outcome = str(exc)
            return None
        finally:
            chan.close()
        if resp is None:
            self.outcome = f"no answer from {self.gateway} in {self.cfg.udp_wait} s"
            return None
        self.answered = True
        now = self._now()
        if not pcp.epoch_ok(self._epoch, now, resp.epoch):
            log.debug("portmap: pcp: the gateway lost its state (epoch %d)", resp.epoch)
        self._epoch = (now, resp.epoch)
        if not resp.ok:
            self.outcome = f"refused: {resp.result_name}"
            return None
        return resp

    async def request(self) -> Mapping | None:
        log.debug("portmap: pcp: MAP udp port %d at %s:%d for %d s", self.port,
                  self.gateway, pcp.PCP_PORT, self.cfg.lifetime)
        return self._mapping(await self._map(self.cfg.lifetime, None))

    async def renew(self, mapping: Mapping) -> Mapping | None:
        return self._mapping(await self._map(self.cfg.lifetime, mapping.external))

    def _mapping(self, resp: pcp.PcpResponse | None) -> Mapping | None:
        if resp is None or resp.external_ip is None or resp.external_port is None:
            return None
        self.outcome = f"granted {resp.external_ip}:{resp.external_port}"
        assert self.gateway is not None
        return Mapping("pcp", (resp.external_ip, resp.external_port), self.port,
                       resp.lifetime, self.gateway, self._now())

    async def delete(self) -> None:
        if not self.answered:  # nobody answered (yet): one datagram, no waiting
            self.delete_sync(0.0)
            log.debug("portmap: pcp: delete sent (the gateway never answered)")
            return
        with contextlib.suppress(Exception):
            resp = await self._map(0, None)
            log.debug("portmap: pcp: delete %s", "confirmed" if resp else self.outcome)

    def delete_sync(self, timeout: float) -> None:
        if self.gateway is None or self.client_ip is None:
            return
        with contextlib.suppress(OSError, pcp.PcpError), \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.bind((self.cfg.local_ip or "0.0.0.0", 0))
            sock.sendto(pcp.delete_request(self.nonce, self.port, self.client_ip),
                        (self.gateway, pcp.PCP_PORT))


class NatPmpClient(MapClient):
    """NAT-PMP (RFC 6886): the external address and a UDP mapping, asked in parallel."""

    name = "natpmp"

    def __init__(self, gateway: str, internal_port: int, cfg: PortmapConfig) -> None:
        super().__init__(gateway, internal_port, cfg)
        self._epoch: tuple[float, int] | None = None

    def _accepter(self, opcode: int) -> Callable[[bytes], natpmp.NatPmpResponse | None]:
        def accept(data: bytes) -> natpmp.NatPmpResponse | None:
            try:
                resp = natpmp.decode_response(data)
            except natpmp.NatPmpError as exc:
                log.debug("portmap: natpmp: answer ignored: %s", exc)
                return None
            if resp.opcode != opcode:
                return None
            if opcode == natpmp.OP_MAP_UDP and resp.ok and resp.internal_port != self.port:
                return None
            return resp
        return accept

    async def _ask(self, payload: bytes, opcode: int) -> natpmp.NatPmpResponse | None:
        assert self.gateway is not None
        try:
            chan = _UdpChannel(self.gateway, natpmp.NATPMP_PORT, self.cfg.local_ip)
        except OSError as exc:
            self.outcome = f"no socket: {exc}"
            return None
        try:
            if opcode == natpmp.OP_MAP_UDP:
                self.touched = True
            resp = await chan.exchange(payload, self._accepter(opcode), self.cfg)
        except _GiveUp as exc:
            self.outcome = str(exc)
            return None
        finally:
            chan.close()
        if resp is None:
            self.outcome = f"no answer from {self.gateway} in {self.cfg.udp_wait} s"
            return None
        self.answered = True
        now = self._now()
        if not natpmp.epoch_ok(self._epoch, now, resp.epoch):
            log.debug("portmap: natpmp: the gateway lost its state (epoch %d)", resp.epoch)
        self._epoch = (now, resp.epoch)
        if not resp.ok:
            self.outcome = f"refused: {resp.result_name}"
            return None
        return resp

    async def _map(self, suggested_port: int) -> Mapping | None:
        ext, mapped = await asyncio.gather(
            self._ask(natpmp.external_address_request(), natpmp.OP_EXTERNAL_ADDRESS),
            self._ask(natpmp.map_request(self.port, lifetime=self.cfg.lifetime,
                                         suggested_port=suggested_port),
                      natpmp.OP_MAP_UDP))
        if ext is None or mapped is None or ext.external_ip is None:
            return None
        if mapped.external_port is None or mapped.lifetime is None:
            return None
        self.outcome = f"granted {ext.external_ip}:{mapped.external_port}"
        assert self.gateway is not None
        return Mapping("natpmp", (ext.external_ip, mapped.external_port), self.port,
                       mapped.lifetime, self.gateway, self._now())

    async def request(self) -> Mapping | None:
        log.debug("portmap: natpmp: map udp port %d at %s:%d for %d s", self.port,
                  self.gateway, natpmp.NATPMP_PORT, self.cfg.lifetime)
        return await self._map(self.port)

    async def renew(self, mapping: Mapping) -> Mapping | None:
        return await self._map(mapping.external[1])

    async def delete(self) -> None:
        if not self.answered:  # nobody answered (yet): one datagram, no waiting
            self.delete_sync(0.0)
            log.debug("portmap: natpmp: delete sent (the gateway never answered)")
            return
        with contextlib.suppress(Exception):
            resp = await self._ask(natpmp.delete_request(self.port), natpmp.OP_MAP_UDP)
            log.debug("portmap: natpmp: delete %s", "confirmed" if resp else self.outcome)

    def delete_sync(self, timeout: float) -> None:
        if self.gateway is None:
            return
        with contextlib.suppress(OSError), \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.bind((self.cfg.local_ip or "0.0.0.0", 0))
            sock.sendto(natpmp.delete_request(self.port), (self.gateway, natpmp.NATPMP_PORT))


class UpnpClient(MapClient):
    """UPnP IGD: discovery, GetExternalIPAddress, AddAnyPortMapping or AddPortMapping.

    Only a mapping the device confirmed is deleted on close (``touched``): an
    unconfirmed AddPortMapping may have failed on a port that is someone else's, and
    deleting that would break their mapping. An unconfirmed one expires by its lease.
    """

    name = "upnp"
    _CONFLICT_RETRIES = 3

    def __init__(self, gateway: str | None, internal_port: int, cfg: PortmapConfig,
                 rng: random.Random) -> None:
        super().__init__(gateway, internal_port, cfg)
        self.rng = rng
        self.igd: upnp_io.Igd | None = None
        self.external_port: int | None = None
        self.lease = cfg.lifetime

    async def _soap(self, request: bytes, action: str) -> tuple[dict[str, str], str]:
        assert self.igd is not None
        return await upnp_io.soap(self.igd, request, action, timeout=self.cfg.http_timeout)

    async def _add(self, wish: int, internal_client: str) -> int:
        """Map and return the external port; raises UpnpError/UpnpFault."""
        assert self.igd is not None
        svc, cfg = self.igd.service, self.cfg
        if svc.version >= 2:
            try:
                values, _ = await self._soap(upnp.add_any_port_mapping_request(
                    svc, wish, self.port, internal_client, description=cfg.description,
                    lease=self.lease), "AddAnyPortMapping")
                return upnp.reserved_port_of(values)
            except upnp.UpnpFault as fault:
                if fault.code not in (401, 602):  # not implemented: AddPortMapping below
                    raise
        wishes = [wish] + [self.rng.randint(1024, 65535) for _ in range(self._CONFLICT_RETRIES)]
        for i, port in enumerate(wishes):
            try:
                await self._soap(upnp.add_port_mapping_request(
                    svc, port, self.port, internal_client, description=cfg.description,
                    lease=self.lease), "AddPortMapping")
                return port
            except upnp.UpnpFault as fault:
                if fault.code == upnp.FAULT_ONLY_PERMANENT_LEASES and self.lease:
                    log.debug("portmap: upnp: only permanent leases: asking for one "
                              "(deleted on close)")
                    self.lease = 0
                    return await self._add(port, internal_client)
                if fault.code != upnp.FAULT_CONFLICT or i == len(wishes) - 1:
                    raise
                log.debug("portmap: upnp: external port %d taken, trying another", port)
        raise upnp.UpnpError("unreachable")

    async def _map(self, wish: int) -> Mapping | None:
        assert self.igd is not None
        try:
            values, local_ip = await self._soap(
                upnp.get_external_ip_request(self.igd.service), "GetExternalIPAddress")
            external_ip = upnp.external_ip_of(values)
            port = await self._add(wish, self.cfg.local_ip or local_ip)
        except upnp.UpnpError as exc:
            self.outcome = f"refused: {exc}"
            return None
        self.external_port = port
        self.touched = True
        self.outcome = f"granted {external_ip}:{port}"
        return Mapping("upnp", (external_ip, port), self.port, self.lease,
                       self.igd.responder, self._now())

    async def request(self) -> Mapping | None:
        log.debug("portmap: upnp: searching for an IGD (%.1f s)", self.cfg.ssdp_wait)
        self.igd = await upnp_io.discover(gateway=self.gateway, local_ip=self.cfg.local_ip,
                                          wait=self.cfg.ssdp_wait,
                                          http_timeout=self.cfg.http_timeout,
                                          ssdp_addr=self.cfg.ssdp_addr)
        if self.igd is None:
            self.outcome = "no IGD found"
            return None
        return await self._map(self.port)

    async def renew(self, mapping: Mapping) -> Mapping | None:
        return await self._map(mapping.external[1])

    def _delete_request(self) -> bytes | None:
        if self.igd is None or self.external_port is None:
            return None
        return upnp.delete_port_mapping_request(self.igd.service, self.external_port)

    async def delete(self) -> None:
        request = self._delete_request()
        if request is None:
            return
        try:
            await self._soap(request, "DeletePortMapping")
            log.debug("portmap: upnp: delete confirmed")
        except upnp.UpnpError as exc:
            log.debug("portmap: upnp: delete failed: %s", exc)

    def delete_sync(self, timeout: float) -> None:
        request = self._delete_request()
        if request is None or self.igd is None:
            return
        with contextlib.suppress(upnp.UpnpError):
            upnp_io.soap_sync(self.igd, request, "DeletePortMapping", timeout=timeout)


async def probe_pcp(gateway: str, cfg: PortmapConfig) -> bool:
    """Does ``gateway`` speak PCP? An ANNOUNCE request (creates nothing); never raises."""
    def accept(data: bytes) -> bool | None:
        try:
            resp = pcp.decode_response(data)
        except pcp.PcpError:
            return False if _unsupported_version(data) else None
        return (resp.opcode == pcp.OP_ANNOUNCE and resp.ok) or None

    try:
        chan = _UdpChannel(gateway, pcp.PCP_PORT, cfg.local_ip)
    except OSError:
        return False
    try:
        return bool(await chan.exchange(pcp.announce_request(chan.client_ip), accept, cfg))
    except _GiveUp:
        return False
    finally:
        chan.close()


async def probe_natpmp(gateway: str, cfg: PortmapConfig) -> tuple[bool, str | None]:
    """Does ``gateway`` speak NAT-PMP, and which external address does it report? An
    external-address request (creates nothing): ``(answered, address or None)``; a
    refusal is an answer without an address. Never raises."""
    def accept(data: bytes) -> natpmp.NatPmpResponse | None:
        try:
            resp = natpmp.decode_response(data)
        except natpmp.NatPmpError:
            return None
        return resp if resp.opcode == natpmp.OP_EXTERNAL_ADDRESS else None

    try:
        chan = _UdpChannel(gateway, natpmp.NATPMP_PORT, cfg.local_ip)
    except OSError:
        return False, None
    try:
        resp = await chan.exchange(natpmp.external_address_request(), accept, cfg)
    except _GiveUp:
        return False, None
    finally:
        chan.close()
    if resp is None:
        return False, None
    if not resp.ok or resp.external_ip in (None, "0.0.0.0"):
        return True, None
    return True, resp.external_ip
