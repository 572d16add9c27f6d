"""``quictun netcheck``: what this network allows, in plain words.

Two halves: :func:`probe` talks to the relay (WebSocket ping, STUN to both of its UDP
reflector ports over IPv4 and, when the relay has an IPv6 address, IPv6) and, at the
same time, to the default gateway (which port-mapping protocols it speaks, and whether
it really maps: one mapping for a throwaway socket, deleted at once), and returns raw
:class:`Observations`; :func:`report` turns observations into a :class:`Report` with a
verdict. :func:`report` is pure, so every verdict is unit-tested.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import click

from ..config import DEFAULT_SIGNAL, PortmapConfig
from ..proto.addr import Addr, format_addr
from .common import ENV_SIGNAL, SIGNAL_HELP, UserError, portmap_option, verbose_option

VERDICT_DIRECT = "direct connections should work"
VERDICT_SYMMETRIC = ("your NAT is symmetric: peers behind ordinary NATs or firewalls are "
                     "reached directly after a few seconds of birthday probing; a peer "
                     "behind another symmetric NAT will be relayed")
VERDICT_BLOCKED = ("UDP is blocked: every tunnel will be relayed through the signalling "
                   "server")
VERDICT_BLOCKED_NO_RELAY = ("UDP is blocked and this relay does not relay: tunnels will "
                            "fail (use another network or a relay that relays)")
VERDICT_UNKNOWN = ("UDP works, but only one reflector answered, so the NAT type is "
                   "unknown; direct connections will probably work")
VERDICT_PORTMAP = ("direct connections should work: the router maps a port for quictun "
                   "({protocol}), so peers reach this machine even through its NAT")


@dataclass
class Observations:
    """What :func:`probe` saw. ``stun4``/``stun6`` map each reflector (ip, port) asked to
    the mapped address it reported, or None when it did not answer."""

    relay_url: str
    relay_rtt_ms: float | None = None
    relay_relays: bool = True
    relay_sees: str | None = None  # our address as the relay's WebSocket saw it
    stun4: list[tuple[Addr, Addr | None]] = field(default_factory=list)
    stun6: list[tuple[Addr, Addr | None]] = field(default_factory=list)
    portmap: str | None = None  # what the gateway offers ("UPnP, PCP", "none"); None: off
    portmap_mapped: tuple[str, Addr] | None = None  # (protocol name, external address)


@dataclass
class Report:
    udp: bool
    public_addr: str | None
    mapping: str | None
    ipv6: bool
    relay_rtt_ms: float | None
    relay_url: str
    verdict: str
    portmap: str = "off"
    """Port-mapping protocols the gateway speaks (``"UPnP, NAT-PMP, PCP"``, a subset,
    ``"none"``), or ``"off"`` (not asked: ``--no-portmap``)."""
    portmap_mapped: str | None = None
    """The external address of the test mapping the gateway granted (deleted since)."""
    portmap_protocol: str | None = None
    """The protocol that granted it (``"PCP"``, ``"NAT-PMP"``, ``"UPnP"``)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_text(self) -> str:
        yes = {True: "yes", False: "no"}
        rtt = f"{self.relay_rtt_ms:.1f} ms" if self.relay_rtt_ms is not None else "-"
        rows = [
            ("relay", self.relay_url),
            ("relay rtt", rtt),
            ("udp", yes[self.udp]),
            ("public address", self.public_addr or "-"),
            ("mapping", self.mapping or "-"),
            ("ipv6", yes[self.ipv6]),
            ("portmap", self.portmap),
            ("port mapping", self._mapped_text()),
        ]
        lines = ["netcheck report:"] + [f"  {k + ':':<16}{v}" for k, v in rows]
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def _mapped_text(self) -> str:
        if self.portmap_mapped is not None:
            return f"granted {self.portmap_mapped} ({self.portmap_protocol})"
        return "refused" if self.portmap not in ("off", "none") else "-"


def _mapping(results: list[tuple[Addr, Addr | None]]) -> str | None:
    """endpoint-independent / endpoint-dependent from answers by different reflectors."""
    answers = {server: mapped for server, mapped in results if mapped is not None}
    if len(answers) < 2:
        return None
    return "endpoint-independent" if len(set(answers.values())) == 1 else "endpoint-dependent"


def report(obs: Observations) -> Report:
    """Turn observations into a report with a plain-words verdict (pure)."""
    v4 = [m for _s, m in obs.stun4 if m is not None]
    v6 = [m for _s, m in obs.stun6 if m is not None]
    udp = bool(v4 or v6)
    public = format_addr(*v4[0]) if v4 else format_addr(*v6[0]) if v6 else None
    # IPv4 decides the NAT type when it works (IPv6 is rarely NATed)
    mapping = _mapping(obs.stun4) if v4 else _mapping(obs.stun6)
    if not udp:
        verdict = VERDICT_BLOCKED if obs.relay_relays else VERDICT_BLOCKED_NO_RELAY
    elif mapping == "endpoint-independent":
        verdict = VERDICT_DIRECT
    elif mapping == "endpoint-dependent":
        verdict = VERDICT_SYMMETRIC
        if v6 and _mapping(obs.stun6) == "endpoint-independent":
            verdict += " (over IPv4; IPv6 peers connect directly)"
    else:
        verdict = VERDICT_UNKNOWN
    granted = obs.portmap_mapped
    if udp and granted is not None and mapping != "endpoint-independent":
        verdict = VERDICT_PORTMAP.format(protocol=granted[0])
    return Report(udp=udp, public_addr=public, mapping=mapping if udp else None,
                  ipv6=bool(v6), relay_rtt_ms=obs.relay_rtt_ms, relay_url=obs.relay_url,
                  verdict=verdict, portmap=obs.portmap or "off",
                  portmap_mapped=format_addr(*granted[1]) if granted else None,
                  portmap_protocol=granted[0] if granted else None)


async def probe_portmap(config: PortmapConfig) -> tuple[str, tuple[str, Addr] | None]:
    """What the gateway offers (:meth:`GatewayOffer.describe`) and the mapping it
    granted for a throwaway socket (protocol name, external address; deleted again),
    both asked at once. Never raises."""
    from ..aio import portmap

    offer, granted = await asyncio.gather(portmap.probe_gateway(config),
                                          portmap.check_mapping(config))
    if granted is None:
        return offer.describe(), None
    return offer.describe(), (portmap.PROTOCOL_NAMES[granted.protocol], granted.external)


async def probe(url: str, *, token: str | None = None, timeout: float = 1.5,
                pings: int = 3, portmap: PortmapConfig | None = None) -> Observations:
    """Ask the relay at ``url`` and, with ``portmap`` enabled, the gateway meanwhile.
    Raises :class:`~quictun.errors.TunnelError` (one line) when the relay cannot be
    reached."""
    gateway = (asyncio.ensure_future(probe_portmap(portmap))
               if portmap is not None and portmap.enabled else None)
    try:
        obs = await _probe_relay(url, token=token, timeout=timeout, pings=pings)
    except BaseException:
        if gateway is not None:
            gateway.cancel()  # deletes a test mapping it may have made
            await asyncio.gather(gateway, return_exceptions=True)
        raise
    if gateway is not None:
        obs.portmap, obs.portmap_mapped = await gateway
    return obs


async def _probe_relay(url: str, *, token: str | None, timeout: float,
                       pings: int) -> Observations:
    from ..aio.candidates import resolve
    from ..aio.relay import SignalClient
    from ..aio.udp import UdpEndpoint
    from ..proto import signalling as sigproto

    sc = SignalClient(url, token=token)
    welcome = await sc.open()
    try:
        obs = Observations(relay_url=url, relay_relays=welcome.relay,
                           relay_sees=welcome.addr or None)
        rtts = []
        for i in range(1, pings + 1):
            t0 = time.monotonic()
            await sc.request(sigproto.Ping(id=i),
                             lambda m, i=i: isinstance(m, sigproto.Pong) and m.id == i,
                             timeout=5)
            rtts.append((time.monotonic() - t0) * 1000)
        obs.relay_rtt_ms = round(min(rtts), 2)
        addrs = await resolve(sc.host, sc.port)
        v4 = [a[0] for a in addrs if ":" not in a[0]][:1]
        v6 = [a[0] for a in addrs if ":" in a[0]][:1]
        ports = list(welcome.stun[:2])
        ep = await UdpEndpoint.bind()
        try:
            servers4 = [(ip, p) for ip in v4 for p in ports]
            servers6 = [(ip, p) for ip in v6 for p in ports] if ep.dual_stack else []
            answers = await asyncio.gather(*(ep.stun_query(s, timeout)
                                             for s in servers4 + servers6))
        finally:
            ep.close()
        obs.stun4 = list(zip(servers4, answers[:len(servers4)], strict=True))
        obs.stun6 = list(zip(servers6, answers[len(servers4):], strict=True))
        return obs
    finally:
        await sc.close()


@click.command()
@verbose_option
@click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
              default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)
@click.option("--token", envvar="QUICTUN_SIGNAL_TOKEN", show_envvar=True,
              help="The relay's access token, if it requires one.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@portmap_option
def netcheck(signal: str, token: str | None, as_json: bool) -> None:
    """Check what this network allows: UDP, NAT mapping, IPv6, relay round trip, port
    mapping.

    Asks the relay's two STUN reflectors for this machine's public address; if both
    see the same address the NAT keeps one mapping per socket, and direct tunnels
    work with most peers. Asks the router which port-mapping protocols it speaks
    (UPnP IGD, NAT-PMP, PCP) and for one short test mapping, deleted at once: a
    granted mapping makes even a symmetric NAT reachable.

    \b
    Examples:
      quictun netcheck --signal wss://relay.example.org/
      quictun netcheck --json | jq .verdict

    \b
    Environment:
      QUICTUN_SIGNAL, QUICTUN_SIGNAL_TOKEN  (see the options)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
      QUICTUN_PORTMAP    0: do not ask the router (--no-portmap)
    """
    from .common import tunnel_config

    portmap = tunnel_config().portmap

    async def go() -> Report:
        return report(await probe(signal, token=token, portmap=portmap))

    import asyncio

    from ..errors import TunnelError

    try:
        rep = asyncio.run(go())
    except TunnelError as exc:
        if as_json:  # `| jq` still gets an object: {"error": ..., "relay_url": ...}
            import json

            click.echo(json.dumps({"error": str(exc), "relay_url": signal}, indent=2))
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(rep.to_json() if as_json else rep.to_text())
