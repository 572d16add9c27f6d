"""Candidate gathering: where this machine may be reached, learned for one UDP socket.

Host candidates are the interface addresses (``ifaddr``); server-reflexive ones come
from STUN Binding queries to the relay's reflectors on the same socket
(:meth:`~quictun.aio.udp.UdpEndpoint.stun_query`); a port mapping the gateway grants
(:class:`~quictun.aio.portmap.PortMapper`, started as soon as the socket is bound) is a
``portmap`` candidate. Used when an offer or answer is made, and again, in-band,
whenever the path manager asks (:class:`~quictun.punch.types.GatherWanted`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from ..config import PortmapConfig
from ..proto.addr import Addr, Candidate, format_addr
from .portmap import PortMapper
from .relay import SignalClient
from .udp import UdpEndpoint

log = logging.getLogger("quictun.portmap")


def _interfaces() -> list[tuple[str, int]]:
    """(ip, prefix length) of every configured interface address."""
    import ifaddr  # lazy: enumerating adapters is only needed once a session starts

    out: list[tuple[str, int]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            out.append((addr.split("%")[0], ip.network_prefix))
    return out


def local_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Networks this host is directly attached to (LAN ranking), loopback included."""
    nets = []
    for ip, prefix in _interfaces():
        try:
            nets.append(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        except ValueError:
            continue
    return nets


def host_candidates(port: int, *, ipv6: bool) -> list[Candidate]:
    """Host candidates: every non-loopback, non-link-local interface address."""
    cands = []
    for ip, _prefix in _interfaces():
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified:
            continue
        if a.version == 6 and not ipv6:
            continue
        cands.append(Candidate((str(a), port), "host"))
    # IPv4 first, then IPv6: order only matters for probing order
    return sorted(cands, key=lambda c: ":" in c.addr[0])[:16]


async def gather(
    ep: UdpEndpoint, stun_servers: list[Addr], *, timeout: float = 1.5
) -> list[Candidate]:
    """Host candidates plus server-reflexive ones learned from ``stun_servers``."""
    cands = host_candidates(ep.port, ipv6=ep.dual_stack)
    usable = [s for s in stun_servers if ep.dual_stack or ":" not in s[0]]
    results = await asyncio.gather(*(ep.stun_query(s, timeout) for s in usable))
    seen = {c.addr for c in cands}
    for mapped in results:
        if mapped is not None and mapped not in seen:
            seen.add(mapped)
            cands.append(Candidate(mapped, "srflx"))
    return cands


async def resolve(host: str, port: int) -> list[Addr]:
    """Resolve a relay host name to UDP addresses (IPv4 first)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return []
    addrs: list[Addr] = []
    for _family, *_rest, sockaddr in sorted(infos, key=lambda i: i[0] != socket.AF_INET):
        a = (sockaddr[0], sockaddr[1])
        if a not in addrs:
            addrs.append(a)
    return addrs


async def stun_servers(signal: SignalClient) -> list[Addr]:
    """The relay's reflectors: its first IPv4 and IPv6 address, each at both STUN ports."""
    assert signal.welcome is not None
    addrs = await resolve(signal.host, signal.port)
    v4 = [a[0] for a in addrs if ":" not in a[0]][:1]
    v6 = [a[0] for a in addrs if ":" in a[0]][:1]
    return [(ip, p) for ip in v4 + v6 for p in signal.welcome.stun[:2]]


def portmap_candidates(mapper: PortMapper | None) -> list[Candidate]:
    """The ``portmap`` candidates of the mappings ``mapper`` holds now (none without)."""
    out = []
    for addr in mapper.external_addresses() if mapper is not None else []:
        try:
            out.append(Candidate(addr, "portmap"))
        except ValueError:  # e.g. a gateway that reports 0.0.0.0: nothing to tell a peer
            log.debug("portmap: unusable external address %s", format_addr(*addr))
    return out


def start_portmap(ep: UdpEndpoint, mode: str,
                  config: PortmapConfig | None) -> PortMapper | None:
    """A started :class:`PortMapper` for ``ep``'s port, or None: relay-only tunnels send
    no UDP, and ``config.enabled`` may be off. Returns at once (the mapping comes later)."""
    if mode == "relay" or config is None or not config.enabled:
        return None
    mapper = PortMapper(ep.port, config=config)
    mapper.start()
    return mapper


async def open_and_gather(
    signal: SignalClient, mode: str, stun_wait: float, portmap: PortmapConfig | None = None,
) -> tuple[UdpEndpoint, list[Candidate], PortMapper | None]:
    """A new socket, its candidates (none in relay mode: no UDP is ever sent) and its
    port mapper (None when off). Waits at most ``stun_wait`` for the reflectors, and
    never for the mapper: a mapping granted meanwhile is among the candidates, a later
    one is the session's to send in-band, like late reflexive candidates. The caller
    closes the mapper with the socket."""
    ep = await UdpEndpoint.bind()
    if mode == "relay":
        return ep, [], None
    mapper = start_portmap(ep, mode, portmap)
    try:
        cands = await gather(ep, await stun_servers(signal), timeout=stun_wait)
    except BaseException:
        ep.close()
        if mapper is not None:
            await mapper.close()
        raise
    mapped = portmap_candidates(mapper)
    if mapped:
        log.debug("portmap: %s signalled with the candidates",
                  ", ".join(format_addr(*c.addr) for c in mapped))
    return ep, cands + mapped, mapper


async def regather(signal: SignalClient, ep: UdpEndpoint, mode: str) -> list[Candidate]:
    """Candidates of an existing socket, re-learned (after the NAT may have moved it)."""
    if mode == "relay" or signal.welcome is None:
        return []
    return await gather(ep, await stun_servers(signal))
