"""Ask the gateway to map the tunnel's UDP port: PCP, NAT-PMP and UPnP IGD, in parallel.

Theory of operation
-------------------
:class:`PortMapper` is built for one UDP port (the tunnel socket's) and runs entirely in
the background: :meth:`PortMapper.start` returns at once and nothing on the path to the
first byte waits for it. Granted mappings are delivered later through ``on_change`` (and
:attr:`PortMapper.mappings`), to be sent to the peer as extra candidates (in the offer if
they are already there, in-band over QUIC otherwise).

1. The default gateway comes from ``/proc/net/route`` (Linux; elsewhere PCP and NAT-PMP
   are skipped and UPnP accepts an IGD on any LAN address).
2. A race, bounded in time (``PortmapConfig``): PCP MAP and NAT-PMP map to the gateway's
   port 5351, and UPnP (SSDP, description, AddAnyPortMapping/AddPortMapping). The first
   grant wins and the other attempts are cancelled: one mapping per socket, one rule on
   the router. A network whose gateway does not answer costs a few datagrams and at most
   ``udp_wait`` / ``ssdp_wait`` seconds of a background task; an ICMP "port unreachable"
   ends an attempt at once.
3. The winner is renewed at half its lifetime (lifetimes are minutes: a crashed process
   leaves little behind); when renewal keeps failing until expiry, the mapping is
   reported lost and the race runs once more.
4. :meth:`PortMapper.close` deletes the mapping, asking through every protocol that sent a
   request (a loser's request may have reached the router too). :meth:`close_sync` and
   :func:`close_all_sync` do the same without an event loop, for SIGTERM and exit paths.

:func:`probe_gateway` only asks what the gateway offers (PCP ANNOUNCE, NAT-PMP external
address, SSDP discovery), creating nothing: for ``quictun netcheck``.

Sockets: PCP and NAT-PMP requests go from a fresh ephemeral socket connected to
``gateway:5351``, not from the tunnel socket. Both protocols name the internal port in
the request and take the internal address from the request's source address, which the
kernel picks from the same route as the tunnel socket's; and their answers (first byte 0
or 2) would fall in the STUN range of the tunnel socket's demultiplexer. UPnP likewise
uses its own sockets; its internal client is our address on the HTTP connection.
Everything is logged on ``quictun.portmap`` at debug level (``-v``). How the tunnel
uses it (candidates, close, SIGTERM, netcheck): docs/portmap.md, "Integration".
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import logging
import os
import random
import socket
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ..config import PortmapConfig
from ..proto import route
from . import upnp as upnp_io
from .portmap_clients import (
    PROTOCOLS,
    MapClient,
    Mapping,
    NatPmpClient,
    PcpClient,
    UpnpClient,
    probe_natpmp,
    probe_pcp,
)

__all__ = [
    "PortmapConfig",
    "Mapping",
    "PortMapper",
    "default_gateway",
    "close_all_sync",
    "probe_gateway",
    "check_mapping",
    "GatewayOffer",
    "PROTOCOL_NAMES",
    "PROTOCOLS",
]

log = logging.getLogger("quictun.portmap")

def default_gateway() -> str | None:
    """The default IPv4 gateway from ``/proc/net/route``, or None (no default route, or
    not Linux)."""
    try:
        with open("/proc/net/route", encoding="ascii", errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    gws = route.default_gateways_v4(text, little_endian=sys.byteorder == "little")
    return gws[0].ip if gws else None


@dataclass(frozen=True)
class GatewayOffer:
    """What :func:`probe_gateway` found."""

    gateway: str | None
    """The default gateway asked (None: no default route)."""
    upnp: bool
    """An IGD with a port-mapping service answered SSDP."""
    natpmp: bool
    """The gateway answered a NAT-PMP external-address request."""
    pcp: bool
    """The gateway answered a PCP ANNOUNCE."""
    external_ip: str | None
    """The external address NAT-PMP reported, if any."""

    @property
    def names(self) -> list[str]:
        """The protocols offered, e.g. ``["UPnP", "NAT-PMP", "PCP"]``."""
        return [n for n, ok in (("UPnP", self.upnp), ("NAT-PMP", self.natpmp),
                                ("PCP", self.pcp)) if ok]

    def describe(self) -> str:
        """``"UPnP, NAT-PMP, PCP"``, a subset, or ``"none"`` (netcheck's line)."""
        return ", ".join(self.names) or "none"


PROTOCOL_NAMES = {"pcp": "PCP", "natpmp": "NAT-PMP", "upnp": "UPnP"}
"""How people write each protocol's name (:attr:`Mapping.protocol` -> text)."""


async def check_mapping(config: PortmapConfig | None = None,
                        timeout: float = 5.0) -> Mapping | None:
    """Whether the gateway really maps: a :class:`PortMapper` for a throwaway UDP socket,
    its first race (at most ``timeout`` seconds), then the mapping deleted. The mapping
    it got (already deleted), or None. For ``quictun netcheck``: a gateway may speak a
    protocol and still refuse (a deny rule). Never raises; cancelling it still deletes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        mapper = PortMapper(sock.getsockname()[1], config=config)
        mapper.start()
        try:
            got = await mapper.wait_first(timeout)
        finally:
            await mapper.close()
    return got[0] if got else None


async def probe_gateway(config: PortmapConfig | None = None) -> GatewayOffer:
    """Ask, in parallel, which port-mapping protocols the gateway speaks; maps nothing.

    Takes at most about ``max(udp_wait, ssdp_wait + http_timeout)`` seconds; never raises.
    A gateway that speaks a protocol may still refuse to map (a deny rule): only a
    :class:`PortMapper` tells.
    """
    cfg = config or PortmapConfig()
    gateway = cfg.gateway or default_gateway()

    async def no() -> None:
        return None

    async def no_natpmp() -> tuple[bool, str | None]:
        return False, None

    pcp_ok, (natpmp_ok, ext_ip), igd = await asyncio.gather(
        probe_pcp(gateway, cfg) if gateway else no(),
        probe_natpmp(gateway, cfg) if gateway else no_natpmp(),
        upnp_io.discover(gateway=gateway, local_ip=cfg.local_ip, wait=cfg.ssdp_wait,
                         http_timeout=cfg.http_timeout, ssdp_addr=cfg.ssdp_addr))
    offer = GatewayOffer(gateway=gateway, upnp=igd is not None, natpmp=natpmp_ok,
                         pcp=bool(pcp_ok), external_ip=ext_ip)
    log.debug("portmap: gateway %s offers %s", gateway or "unknown", offer.describe())
    return offer


_live: weakref.WeakSet[PortMapper] = weakref.WeakSet()
_atexit_registered: list[bool] = []


def close_all_sync(timeout: float = 0.5) -> None:
    """:meth:`PortMapper.close_sync` on every mapper whose deletions are not done (for a
    signal handler or exit path: works without a running event loop). Registered with
    ``atexit`` by the first :meth:`PortMapper.start`. Never raises."""
    for mapper in list(_live):
        with contextlib.suppress(Exception):
            mapper.close_sync(timeout)


class PortMapper:
    """Maps one UDP port on the gateway, keeps it renewed, deletes it on close.

    After :meth:`start`, ``on_change(mappings)`` is called (on the event loop) whenever
    the list of live mappings changes: a grant, a renewal that moved the external
    address, a loss. Exceptions from it are logged and swallowed. Call :meth:`close` (or
    :meth:`close_sync`) when the socket closes.
    """

    def __init__(self, internal_port: int, *, config: PortmapConfig | None = None,
                 on_change: Callable[[list[Mapping]], None] | None = None) -> None:
        if not 0 < internal_port <= 0xFFFF:
            raise ValueError(f"internal port out of range: {internal_port}")
        self.internal_port = internal_port
        self.config = config or PortmapConfig()
        unknown = set(self.config.protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown port-mapping protocols: {sorted(unknown)}")
        self.on_change = on_change
        self.mappings: list[Mapping] = []
        """The live mappings (zero or one today), newest state."""
        self.tried: dict[str, str] = {}
        """Protocol -> outcome of its last attempt (``"granted ..."``, ``"no answer"``,
        ``"refused: ..."``), for diagnostics such as netcheck."""
        self._clients: list[MapClient] = []
        self._task: asyncio.Task[None] | None = None
        self._first_done = asyncio.Event()
        self._closed = False  # close() or close_sync() was called: no new mapping
        self._released = False  # the deletions were sent: nothing left for close_all_sync
        self._closing: asyncio.Future[None] | None = None

    # -- public ------------------------------------------------------------------------
    def start(self) -> None:
        """Start mapping in the background; returns at once (needs a running loop)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())
            _live.add(self)
            if not _atexit_registered:  # exits that skip close(): best effort
                _atexit_registered.append(True)
                atexit.register(close_all_sync)

    @property
    def running(self) -> bool:
        """True while the background task maps, renews or waits to renew."""
        return self._task is not None and not self._task.done()

    async def wait_first(self, timeout: float) -> list[Mapping]:
        """Wait up to ``timeout`` for the first race to end; the mappings then (maybe
        none). Never raises on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._first_done.wait()
        return list(self.mappings)

    def external_addresses(self) -> list[tuple[str, int]]:
        """The distinct external addresses of the live mappings (candidates to send)."""
        out: list[tuple[str, int]] = []
        for m in self.mappings:
            if m.external not in out:
                out.append(m.external)
        return out

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`close_sync` was called."""
        return self._closed

    @property
    def released(self) -> bool:
        """True once the deletions went out (and, for a gateway that answers, were
        confirmed or timed out): nothing is left for :func:`close_all_sync`."""
        return self._released

    async def close(self) -> None:
        """Stop renewing and delete every mapping this mapper may have made: a gateway
        that answered gets at most ``close_timeout`` seconds to confirm, one that never
        answered gets its deletions without waiting. Idempotent (a second call waits for
        the first); never raises. If it is cancelled before the deletions went out,
        :func:`close_all_sync` (at exit) still sends them."""
        if self._released:
            return
        if self._closing is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._closing)
            return
        self._closed = True
        self._closing = asyncio.get_running_loop().create_future()
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            await self._delete_all()
            self._released = True
            _live.discard(self)
            self._set([])
        finally:
            if not self._closing.done():
                self._closing.set_result(None)

    async def _delete_all(self) -> None:
        touched = [c for c in self._clients if c.touched]
        if not touched:
            return
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await asyncio.gather(*(c.delete() for c in touched), return_exceptions=True)
        except TimeoutError:
            log.debug("portmap: deletion not confirmed in %.1f s", self.config.close_timeout)

    def close_sync(self, timeout: float = 0.5) -> None:
        """Best-effort :meth:`close` without an event loop: sends the PCP/NAT-PMP deletions
        without waiting for answers and the UPnP one with a ``timeout``-second blocking
        exchange. For signal handlers and exit paths; never raises."""
        if self._released:
            return
        self._closed = self._released = True
        _live.discard(self)
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                task.get_loop().call_soon_threadsafe(task.cancel)
        for client in self._clients:
            if client.touched:
                with contextlib.suppress(Exception):
                    client.delete_sync(timeout)
        self.mappings = []

    # -- the background task -----------------------------------------------------------
    def _set(self, mappings: list[Mapping]) -> None:
        if mappings == self.mappings:
            return
        self.mappings = mappings
        if self.on_change is not None:
            try:
                self.on_change(list(mappings))
            except Exception:
                log.exception("portmap: on_change failed")

    def _make_clients(self, gateway: str | None) -> list[MapClient]:
        cfg = self.config
        clients: list[MapClient] = []
        for name in cfg.protocols:
            if name == "pcp" and gateway is not None:
                clients.append(PcpClient(gateway, self.internal_port, cfg, os.urandom(12)))
            elif name == "natpmp" and gateway is not None:
                clients.append(NatPmpClient(gateway, self.internal_port, cfg))
            elif name == "upnp":
                clients.append(UpnpClient(gateway, self.internal_port, cfg,
                                          random.SystemRandom()))
            else:
                self.tried[name] = "skipped: no default gateway"
        return clients

    async def _run(self) -> None:
        try:
            gateway = self.config.gateway or default_gateway()
            log.debug("portmap: udp port %d, gateway %s, trying %s", self.internal_port,
                      gateway or "unknown", ", ".join(self.config.protocols))
            raced_again = False
            while True:
                winner = await self._race(gateway)
                self._first_done.set()
                if winner is None:
                    return
                await self._keep(winner)
                if raced_again:
                    return
                raced_again = True
        finally:
            self._first_done.set()

    def _usable(self, mapping: Mapping) -> bool:
        if not self.config.require_global:
            return True
        try:
            return ipaddress.ip_address(mapping.external[0]).is_global
        except ValueError:
            return False

    async def _race(self, gateway: str | None) -> tuple[MapClient, Mapping] | None:
        loop = asyncio.get_running_loop()
        clients = self._make_clients(gateway)
        self._clients.extend(clients)
        if not clients:
            return None
        started = loop.time()
        tasks = {loop.create_task(c.request()): c for c in clients}
        winner: tuple[MapClient, Mapping] | None = None
        try:
            pending = set(tasks)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    client = tasks[task]
                    mapping = None if task.exception() else task.result()
                    if task.exception():
                        log.debug("portmap: %s failed: %r", client.name, task.exception())
                    if mapping is not None and not self._usable(mapping):
                        outcome = client.outcome + " (not a global address: unused, deleted)"
                        await client.delete()
                        client.outcome, mapping = outcome, None
                    self.tried[client.name] = client.outcome
                    if mapping is not None and winner is None:
                        winner = (client, mapping)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if winner is None:
            log.debug("portmap: no mapping after %.2f s (%s)", loop.time() - started,
                      "; ".join(f"{k}: {v}" for k, v in self.tried.items()))
            return None
        client, mapping = winner
        for other in clients:
            if other is not client and other.name not in self.tried:
                self.tried[other.name] = "cancelled: another protocol won"
        log.debug("portmap: %s granted %s:%d -> udp port %d for %d s in %.0f ms",
                  mapping.protocol, mapping.external[0], mapping.external[1],
                  self.internal_port, mapping.lifetime, (loop.time() - started) * 1000)
        self._set([mapping])
        return winner

    async def _keep(self, winner: tuple[MapClient, Mapping]) -> None:
        """Renew ``winner`` until it is lost (returns) or the task is cancelled."""
        client, mapping = winner
        loop = asyncio.get_running_loop()
        while True:
            if not mapping.lifetime:  # a permanent lease: nothing to renew
                await asyncio.Event().wait()
            await asyncio.sleep(max(0.0, mapping.granted_at + mapping.lifetime / 2
                                    - loop.time()))
            while True:
                renewed = await client.renew(mapping)
                if renewed is not None:
                    break
                expires = mapping.expires_at or 0.0
                if loop.time() + self.config.retry_after >= expires:
                    await asyncio.sleep(max(0.0, expires - loop.time()))
                    log.debug("portmap: %s mapping %s:%d lost (renewal failed)",
                              mapping.protocol, *mapping.external)
                    self._set([])
                    return
                await asyncio.sleep(self.config.retry_after)
            if renewed.external != mapping.external:
                log.debug("portmap: %s mapping moved to %s:%d", renewed.protocol,
                          *renewed.external)
            moved = renewed.external != mapping.external
            mapping = renewed
            if moved:
                self._set([renewed])
            else:
                self.mappings = [renewed]  # same address: nothing to tell the peer

