"""An in-memory internet with NATs and a fake clock, for testing the path manager.

Modelled on Tailscale's ``tstest/natlab``: hosts with private addresses sit behind NAT
boxes whose behaviour is named in RFC 4787 terms; everything is deterministic (seeded
port choice, loss and jitter), and time only moves when the driver advances it.

Topology: the "public internet" routes on public IPs only. A :class:`Nat` owns a LAN of
inside hosts (which reach each other directly, by private address) and one public IP (or,
for a translation-less stateful firewall, the inside hosts' own public IPs). A host with
no NAT is directly on the internet. A :class:`Reflector` answers STUN Binding requests
with the source it saw, so peers learn their server-reflexive candidate.

NAT model (all per NAT box):

* mapping: ``"eim"`` endpoint-independent (one public port per inside socket; the inside
  port is kept when free, like Linux ``masquerade``) or ``"edm"`` endpoint-dependent
  (a fresh pseudo-random public port per destination: "symmetric");
* filtering: ``"eif"`` (full cone), ``"adf"`` (address-dependent: restricted cone) or
  ``"apdf"`` (address-and-port-dependent: port-restricted cone, stateful firewall);
* a mapping, and each filter permission, lives ``timeout`` seconds after the last
  *outbound* packet (inbound packets do not refresh: the strict RFC 4787 reading);
* ``hairpin``: whether inside hosts can reach each other through the public address;
* ``blocked``: all UDP to or from outside is dropped;
* :meth:`Nat.rebind` forgets every mapping and stops preserving ports (a NAT reboot);
* ``wan_input``: ``"drop"`` (home-router style) or ``"accept"``: an unsolicited inbound
  packet that the filter refuses then leaves a *stale* conntrack-like entry
  (remote -> public port, alive ``timeout`` after the last such packet), and a later
  outbound flow toward that remote cannot use that public port: like Linux
  ``masquerade``, that one flow gets another port (the "trap" of NOTES.md section 1).

MTU: ``Network.mtu`` (None: unlimited) is the largest UDP payload the internet between
the sites carries; bigger datagrams vanish without a trace, as where ICMP "too big" is
filtered (a path MTU black hole). Fake QUIC datagrams are padded to the size the peer's
manager last announced (DatagramSizeChanged), so a size above the MTU loses them.

TTL: a datagram sent with an explicit TTL loses one hop at the sender's NAT box (if
any) and ``Network.internet_hops`` on the way; it is dropped if that exhausts it, so a
low-TTL probe opens the sender's own NAT state and never reaches the far one.

Sockets: a :class:`Peer` has its main socket (``port``) and, when its PathManager asks
for them (``datagrams_to_send_slots`` slot k > 0), extra sockets on ``port + k``, closed
when the manager no longer lists them in ``aux_slots()``.

The :class:`Sim` driver runs :class:`~quictun.punch.manager.PathManager` instances unchanged:
it advances the clock to the next packet or timer, delivers STUN to ``receive_stun``, fake
QUIC datagrams (first byte 0x40) to ``note_direct_traffic``, and relay datagrams to
``note_relay_traffic``; after every step it flushes ``datagrams_to_send`` and records
events with their time. Like the real tunnel, each peer sends one such datagram on its
current path every ``keepalive`` seconds (QUIC's keepalive PING; None: never) and a PING
when its path goes suspect, which the other peer answers at once (its ACK).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from quictun.proto import stun
from quictun.punch import (
    Addr,
    Candidate,
    NetPath,
    PathChanged,
    PathConfig,
    PathManager,
    PunchFailed,
    SuspectChanged,
)
from quictun.punch.pathmtu import PathMtu
from quictun.punch.types import DatagramSizeChanged, Event

Handler = Callable[[bytes, Addr], None]

REFLECTOR_ADDR: Addr = ("198.51.100.1", 3478)
REFLECTOR2_ADDR: Addr = ("198.51.100.1", 3479)  # a second port: reveals EDM mapping
QUIC_PREFIX = b"\x40quic:"
QUIC_PING = b"\x40ping:"  # an ack-eliciting PING: the receiver answers at once


@dataclass(frozen=True)
class NatType:
    """RFC 4787 behaviour of a NAT box (see the module docstring)."""

    mapping: str = "eim"
    filtering: str = "apdf"
    translate: bool = True
    blocked: bool = False
    hairpin: bool = False
    wan_input: str = "drop"


NAT_TYPES: dict[str, NatType] = {
    "firewall": NatType(mapping="eim", filtering="apdf", translate=False),
    "full-cone": NatType(mapping="eim", filtering="eif"),
    "restricted-cone": NatType(mapping="eim", filtering="adf"),
    "port-restricted-cone": NatType(mapping="eim", filtering="apdf"),
    "symmetric": NatType(mapping="edm", filtering="apdf"),
    "udp-blocked": NatType(blocked=True),
}


@dataclass
class _Mapping:
    inside: Addr
    public: Addr
    last_out: float
    permits: dict[Addr, float] = field(default_factory=dict)


class Nat:
    """A NAT box (or stateful firewall) in front of a LAN."""

    def __init__(
        self, net: Network, kind: NatType, public_ip: str | None, timeout: float = 30.0
    ) -> None:
        self.net = net
        self.kind = kind
        self.public_ip = public_ip
        self.timeout = timeout
        self.inside: dict[str, Host] = {}
        self._mappings: dict[object, _Mapping] = {}
        self._by_public: dict[Addr, _Mapping] = {}
        self._preserve_ports = True
        self._stale: dict[tuple[Addr, Addr], float] = {}  # (public, remote) -> last inbound
        self.stale_created = 0
        self.blackhole = False  # runtime switch: drop all traffic to/from outside
        self.drop_quic = False  # runtime switch: drop QUIC to/from outside, pass STUN
        self.lan_down = False  # runtime switch: drop traffic between inside hosts
        self.mappings_created = 0
        if kind.translate:
            assert public_ip is not None
            net.register_public(public_ip, self)

    def _alive(self, m: _Mapping, now: float) -> bool:
        return now - m.last_out <= self.timeout

    def _drop(self, key: object, m: _Mapping) -> None:
        del self._mappings[key]
        del self._by_public[m.public]

    def _new_public(self, inside: Addr) -> Addr:
        if not self.kind.translate:
            return inside
        assert self.public_ip is not None
        if self.kind.mapping == "eim" and self._preserve_ports:
            candidate = (self.public_ip, inside[1])
            if candidate not in self._by_public:
                return candidate
        while True:
            candidate = (self.public_ip, self.net.rng.randrange(1024, 65536))
            if candidate not in self._by_public:
                return candidate

    def _is_stale(self, public: Addr, remote: Addr, now: float) -> bool:
        t = self._stale.get((public, remote))
        return t is not None and now - t <= self.timeout

    def _get(self, key: object, now: float) -> _Mapping | None:
        m = self._mappings.get(key)
        if m is not None and not self._alive(m, now):
            self._drop(key, m)
            m = None
        return m

    def outbound(self, inside: Addr, remote: Addr, now: float) -> Addr:
        """Translate an outbound packet's source, creating or refreshing state."""
        flow = (inside, remote)
        key: object = flow
        m = self._get(flow, now)
        if m is None and self.kind.mapping == "eim":
            key = inside
            m = self._get(inside, now)
            public = m.public if m is not None else self._new_public(inside)
            if (
                self.kind.translate
                and self._is_stale(public, remote, now)
                and (m is None or remote not in m.permits)
            ):
                key, m = flow, None  # the trap: this flow's port is taken by a stale entry
        if m is None:
            public = self._new_public(inside)
            while self._is_stale(public, remote, now):
                public = (public[0], self.net.rng.randrange(1024, 65536))
            m = _Mapping(inside=inside, public=public, last_out=now)
            self.mappings_created += 1
            self._mappings[key] = m
            self._by_public[m.public] = m
        m.last_out = now
        m.permits[remote] = now
        return m.public

    def inbound(self, src: Addr, dst: Addr, now: float) -> Addr | None:
        """Return the inside address for an inbound packet, or None if filtered."""
        m = self._by_public.get(dst)
        if m is not None and not self._alive(m, now):
            key = next(k for k, v in self._mappings.items() if v is m)
            self._drop(key, m)
            m = None
        inside = None if m is None else self._filter(m, src, now)
        if inside is None and self.kind.wan_input == "accept" and self.kind.translate:
            if not self._is_stale(dst, src, now):
                self.stale_created += 1
            self._stale[(dst, src)] = now
        return inside

    def _filter(self, m: _Mapping, src: Addr, now: float) -> Addr | None:
        filtering = self.kind.filtering
        if filtering == "eif":
            return m.inside
        fresh = [r for r, t in m.permits.items() if now - t <= self.timeout]
        if filtering == "adf" and any(r[0] == src[0] for r in fresh):
            return m.inside
        if filtering == "apdf" and src in fresh:
            return m.inside
        return None

    def rebind(self) -> None:
        """Forget all mappings; new ones get fresh (non-preserved) public ports."""
        self._mappings.clear()
        self._by_public.clear()
        self._stale.clear()
        self._preserve_ports = False


class Host:
    """A machine with one IP address (private when behind a translating NAT)."""

    def __init__(
        self,
        net: Network,
        name: str,
        ip: str,
        nat: Nat | None,
        *,
        ip6: str | None = None,
        nat6: Nat | None = None,
    ) -> None:
        self.net = net
        self.name = name
        self.ip = ip
        self.nat = nat
        self.ip6 = ip6  # optional global IPv6 address (dual-stack socket)
        self.nat6 = nat6  # None (open) or a translation-less firewall
        self.sockets: dict[int, Handler] = {}
        for addr, box in ((ip, nat), (ip6, nat6)):
            if addr is None:
                continue
            if box is None:
                net.register_public(addr, self)
            else:
                box.inside[addr] = self
                if not box.kind.translate:
                    net.register_public(addr, box)

    def iface_for(self, dst: Addr) -> tuple[str, Nat | None]:
        """Source address and NAT used to reach ``dst`` (by address family)."""
        if ":" in dst[0]:
            assert self.ip6 is not None, "no IPv6 address"
            return self.ip6, self.nat6
        return self.ip, self.nat

    def bind(self, port: int, handler: Handler) -> Addr:
        self.sockets[port] = handler
        return (self.ip, port)

    def send(self, port: int, data: bytes, dst: Addr, ttl: int | None = None) -> None:
        self.net.send(self, port, data, dst, ttl)

    def deliver(self, data: bytes, src: Addr, port: int) -> None:
        handler = self.sockets.get(port)
        if handler is not None:
            handler(data, src)


class Network:
    """The internet: a clock, an event queue, public routing, loss and latency."""

    def __init__(
        self,
        seed: int = 1,
        *,
        latency: float = 0.02,
        lan_latency: float = 0.001,
        jitter: float = 0.0,
        loss: float = 0.0,
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.latency = latency
        self.lan_latency = lan_latency
        self.jitter = jitter
        self.loss = loss
        self.internet_hops = 8  # routers between two sites (explicit-TTL datagrams only)
        self.mtu: int | None = None  # largest UDP payload between the sites (None: any)
        self.too_big = 0
        self.ttl_expired = 0
        self._public: dict[str, Nat | Host] = {}
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.sent = 0
        self.dropped = 0

    def register_public(self, ip: str, node: Nat | Host) -> None:
        self._public[ip] = node

    def schedule(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, fn))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def run_due(self) -> None:
        while self._queue and self._queue[0][0] <= self.now:
            _, _, fn = heapq.heappop(self._queue)
            fn()

    def _delay(self, base: float) -> float:
        return base + (self.rng.uniform(0.0, self.jitter) if self.jitter else 0.0)

    def send(self, host: Host, port: int, data: bytes, dst: Addr, ttl: int | None = None) -> None:
        self.sent += 1
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        src_ip, nat = host.iface_for(dst)
        src = (src_ip, port)
        if nat is not None and dst[0] in nat.inside and dst[0] != nat.public_ip:
            if nat.lan_down:
                self.dropped += 1
                return
            target = nat.inside[dst[0]]
            self.schedule(self.now + self.lan_latency, lambda: target.deliver(data, src, dst[1]))
            return
        if nat is not None:
            if nat.kind.blocked or nat.blackhole or (nat.drop_quic and data[:1] == b"\x40"):
                self.dropped += 1
                return
            if dst[0] == nat.public_ip and not nat.kind.hairpin:
                self.dropped += 1
                return
            src = nat.outbound(src, dst, self.now)
        if self.mtu is not None and len(data) > self.mtu:
            self.too_big += 1  # dropped silently: ICMP "too big" is filtered
            self.dropped += 1
            return
        if ttl is not None and ttl - (nat is not None) <= self.internet_hops:
            self.ttl_expired += 1  # died on the way, after opening our own NAT state
            return
        self.schedule(self.now + self._delay(self.latency), lambda: self._arrive(data, src, dst))

    def _arrive(self, data: bytes, src: Addr, dst: Addr) -> None:
        node = self._public.get(dst[0])
        if isinstance(node, Host):
            node.deliver(data, src, dst[1])
            return
        if node is None or node.kind.blocked or node.blackhole or (
                node.drop_quic and data[:1] == b"\x40"):
            self.dropped += 1
            return
        inside = node.inbound(src, dst, self.now)
        if inside is None:
            self.dropped += 1
            return
        node.inside[inside[0]].deliver(data, src, inside[1])


class Reflector:
    """A public STUN server: answers Binding requests with the source address it saw."""

    def __init__(self, net: Network, addr: Addr = REFLECTOR_ADDR, host: Host | None = None) -> None:
        self.host = host if host is not None else Host(net, "reflector", addr[0], None)
        self.addr = self.host.bind(addr[1], self._on_datagram)

    def _on_datagram(self, data: bytes, src: Addr) -> None:
        try:
            msg = stun.decode(data)
        except stun.StunError:
            return
        if msg.msg_type == stun.BINDING_REQUEST:
            self.host.send(self.addr[1], stun.binding_success(msg.txid, src), src)


def make_site(
    net: Network,
    name: str,
    nat_type: str,
    *,
    index: int,
    timeout: float = 30.0,
    hairpin: bool = False,
    hosts: int = 1,
) -> list[Host]:
    """Build a site (``index`` picks its addresses) and return its hosts.

    Translating NATs get public IP ``203.0.113.<index>`` and LAN ``10.<index>.0.0/24``;
    a firewall's hosts get public ``198.19.<index>.<n>``.
    """
    kind = NAT_TYPES[nat_type]
    if hairpin:
        kind = NatType(kind.mapping, kind.filtering, kind.translate, kind.blocked, True)
    if kind.translate:
        nat = Nat(net, kind, f"203.0.113.{index}", timeout)
        ips = [f"10.{index}.0.{n + 2}" for n in range(hosts)]
    else:
        nat = Nat(net, kind, None, timeout)
        ips = [f"198.19.{index}.{n + 2}" for n in range(hosts)]
    return [Host(net, f"{name}{n}", ip, nat) for n, ip in enumerate(ips)]


def lan_of(host: Host) -> list[ipaddress.IPv4Network]:
    """The host's local network (/24), as the shell would report it."""
    return [ipaddress.ip_network(f"{host.ip}/24", strict=False)]


class Peer:
    """One quictun endpoint: a host socket, a PathManager, and a log of what happened."""

    def __init__(self, sim: Sim, name: str, host: Host, pm: PathManager, port: int) -> None:
        self.sim = sim
        self.name = name
        self.host = host
        self.pm = pm
        self.port = port
        self.addr = host.bind(port, self._on_datagram)
        self.other: Peer | None = None
        self.events: list[tuple[float, Event]] = []
        self.datagram_size = pm.mtu.datagram_size  # the last DatagramSizeChanged
        self.srflx: Addr | None = None  # from the first reflector that answered
        self.srflxs: list[Addr] = []  # every distinct reflexive address seen
        self.aux: set[int] = set()  # open extra sockets (slots)
        self.quic_received_direct = 0
        self.quic_received_relay = 0
        self.quic_sent = 0
        self.quic_unsendable = 0
        self.max_aux = 0
        self._gather_txids: set[bytes] = set()

    # -- helpers for tests
    def changes(self) -> list[NetPath | None]:
        return [e.path for _, e in self.events if isinstance(e, PathChanged)]

    def failures(self) -> list[PunchFailed]:
        return [e for _, e in self.events if isinstance(e, PunchFailed)]

    def sizes(self) -> list[tuple[float, int]]:
        """(time, size) of every DatagramSizeChanged."""
        return [(t, e.size) for t, e in self.events if isinstance(e, DatagramSizeChanged)]

    def candidates(self) -> list[Candidate]:
        cands = [Candidate(self.addr, "host")]
        if self.host.ip6 is not None:
            cands.append(Candidate((self.host.ip6, self.port), "host"))
        cands += [Candidate(a, "srflx") for a in self.srflxs if a != self.addr]
        return cands

    # -- I/O
    def gather(self) -> None:
        """Ask the reflectors for our server-reflexive addresses (answers arrive later)."""
        self.srflxs = []
        self._gather_txids.clear()
        for reflector in self.sim.reflector_addrs:
            txid = self.sim.net.rng.randbytes(12)
            self._gather_txids.add(txid)
            self._query(txid, reflector, tries=3)

    def _query(self, txid: bytes, reflector: Addr, tries: int) -> None:
        """Send a reflector query, again after 0.15 s while unanswered (like the shell)."""
        if txid not in self._gather_txids or tries <= 0:
            return
        self.host.send(self.port, stun.binding_request(txid), reflector)
        net = self.sim.net
        net.schedule(net.now + 0.15, lambda: self._query(txid, reflector, tries - 1))

    def _on_datagram(self, data: bytes, src: Addr, slot: int = 0) -> None:
        now = self.sim.net.now
        if data.startswith((QUIC_PREFIX, QUIC_PING)):
            self.quic_received_direct += 1
            self.pm.note_direct_traffic(src, now)
            if data.startswith(QUIC_PING):
                self.send_quic()  # its ACK, on our own current path
        elif stun.is_stun(data):
            if src in self.sim.reflector_addrs and slot == 0:
                msg = stun.decode(data)
                mapped = msg.xor_mapped_address
                if msg.txid in self._gather_txids and mapped:
                    self._gather_txids.discard(msg.txid)
                    if self.srflx is None or not self.srflxs:
                        self.srflx = mapped
                    if mapped not in self.srflxs:
                        self.srflxs.append(mapped)
                    self.sim.on_gathered(self)
                return
            self.pm.receive_stun(data, src, now, slot)

    def send_quic(self, ping: bool = False) -> None:
        path = self.pm.current
        self.quic_sent += 1
        if path is None:
            self.quic_unsendable += 1
        elif path.kind == "direct":
            assert path.remote is not None
            data = (QUIC_PING if ping else QUIC_PREFIX) + self.name.encode()
            data += bytes(self.datagram_size - len(data))
            self.host.send(self.port + path.slot, data, path.remote)
        else:
            self.sim.relay_send(self, ping)

    def flush(self) -> None:
        now = self.sim.net.now
        for data, addr, ttl, slot in self.pm.datagrams_to_send_slots(now):
            if slot and slot not in self.aux:
                self.aux.add(slot)
                self.max_aux = max(self.max_aux, len(self.aux))
                self.host.bind(self.port + slot, functools.partial(self._on_datagram, slot=slot))
            self.host.send(self.port + slot, data, addr, ttl)
        if self.aux:
            for slot in self.aux - self.pm.aux_slots():
                self.aux.discard(slot)
                del self.host.sockets[self.port + slot]
        while (event := self.pm.next_event()) is not None:
            self.events.append((now, event))
            if isinstance(event, DatagramSizeChanged):
                self.datagram_size = event.size
            self.sim.on_event(self, event)
            if isinstance(event, SuspectChanged) and event.suspect:
                self.send_quic(ping=True)  # like the shell: a quiet path gets a QUIC PING


class Sim:
    """Drive PathManagers through a :class:`Network` with a fake clock."""

    def __init__(self, net: Network, *, relay_up: bool = True, relay_latency: float = 0.05,
                 keepalive: float | None = 15.0) -> None:
        self.net = net
        self.reflector = Reflector(net)
        self.reflector2 = Reflector(net, REFLECTOR2_ADDR, host=self.reflector.host)
        self.reflector_addrs = (REFLECTOR_ADDR, REFLECTOR2_ADDR)
        self.peers: list[Peer] = []
        self.relay_up = relay_up
        self.relay_latency = relay_latency
        # like QUIC's keepalive PING: every tunnel sends now and then, even an idle one
        self.traffic_interval: float | None = keepalive
        self.regather_on_fallback = False
        self.tell_local = True  # connect() passes each peer its own candidates
        self._next_traffic: float | None = None if keepalive is None else net.now + keepalive
        self._traffic_pings = True  # keepalives are PINGs; start_traffic says for its data
        self._started = False

    def add_peer(
        self,
        name: str,
        host: Host,
        *,
        mode: str = "auto",
        config: PathConfig | None = None,
        port: int = 40000,
        key_seed: int = 0,
        multi_socket: bool = True,
        birthday_any_address: bool = True,
        mtu: PathMtu | None = None,
    ) -> Peer:
        """Add a peer on ``host``. The simulated "public" addresses (203.0.113.0/24,
        198.19.0.0/16) are not globally routable, so birthday probing is allowed toward
        any address (``PathConfig.birthday_any_address``) unless told otherwise."""
        keys = (b"key-a-" + bytes([key_seed]), b"key-b-" + bytes([key_seed]))
        index = len(self.peers)
        local_key, remote_key = keys[index], keys[1 - index]
        rng = random.Random(f"{name}-{index}")
        pm = PathManager(
            local_key=local_key,
            remote_key=remote_key,
            local_networks=lan_of(host),
            mode=mode,
            relay_available=self.relay_up,
            config=dataclasses.replace(config or PathConfig(),
                                       birthday_any_address=birthday_any_address),
            random_bytes=rng.randbytes,
            multi_socket=multi_socket,
            mtu=mtu,
        )
        peer = Peer(self, name, host, pm, port)
        self.peers.append(peer)
        if len(self.peers) == 2:
            self.peers[0].other, self.peers[1].other = self.peers[1], self.peers[0]
        return peer

    # -- scenario helpers
    def connect(self, *, start_skew: float = 0.0, gather_time: float = 0.5) -> None:
        """Gather srflx for both peers, exchange candidates, then start (b later by skew)."""
        a, b = self.peers
        a.gather()
        b.gather()
        self.run_for(gather_time)
        now = self.net.now
        a.pm.add_remote_candidates(b.candidates(), now)
        b.pm.add_remote_candidates(a.candidates(), now)
        if self.tell_local:
            a.pm.set_local_candidates(a.candidates())
            b.pm.set_local_candidates(b.candidates())
        a.pm.start(now)
        a.flush()
        self._started = True
        if start_skew:
            self.run_for(start_skew)
        b.pm.start(self.net.now)
        b.flush()

    def set_relay(self, up: bool) -> None:
        self.relay_up = up
        for p in self.peers:
            p.pm.set_relay_available(up, self.net.now)
            p.flush()

    def start_traffic(self, interval: float, *, answered: bool = False) -> None:
        """Each peer sends one fake QUIC datagram on its current path every ``interval``
        (instead of a keepalive PING every ``keepalive``); ``answered``: as PINGs, each
        answered at once."""
        self.traffic_interval = interval
        self._next_traffic = self.net.now + interval
        self._traffic_pings = answered

    def relay_send(self, sender: Peer, ping: bool = False) -> None:
        other = sender.other
        if not self.relay_up or other is None:
            sender.quic_unsendable += 1
            return

        def arrive() -> None:
            other.quic_received_relay += 1
            other.pm.note_relay_traffic(self.net.now)
            if ping:
                other.send_quic()

        self.net.schedule(self.net.now + self.relay_latency, arrive)

    def on_gathered(self, peer: Peer) -> None:
        if not self._started or peer.other is None:
            return
        other = peer.other
        cands = peer.candidates()

        def signal() -> None:  # candidates travel over the relay (signalling) channel
            other.pm.add_remote_candidates(cands, self.net.now)
            other.flush()

        self.net.schedule(self.net.now + self.relay_latency, signal)

    def on_event(self, peer: Peer, event: Event) -> None:
        if (
            self.regather_on_fallback
            and isinstance(event, PathChanged)
            and (event.path is None or event.path.kind == "relay")
            and any(p is not None and p.kind == "direct" for p in peer.changes()[:-1])
        ):
            peer.gather()

    # -- the loop
    def run_for(self, duration: float) -> None:
        self.run_until(self.net.now + duration)

    def run_until(self, t_end: float) -> None:
        net = self.net
        spins = 0
        while True:
            times = [t for t in (p.pm.get_timer() for p in self.peers) if t is not None]
            nt = net.next_time()
            if nt is not None:
                times.append(nt)
            if self._next_traffic is not None:
                times.append(self._next_traffic)
            t_next = min(times, default=t_end + 1.0)
            if t_next > t_end:
                net.now = t_end
                return
            if t_next <= net.now:
                spins += 1
                assert spins < 10_000, "simulation is not making progress"
            else:
                spins = 0
                net.now = t_next
            net.run_due()
            for p in self.peers:
                timer = p.pm.get_timer()
                if timer is not None and timer <= net.now:
                    p.pm.handle_timer(net.now)
            if self._next_traffic is not None and self._next_traffic <= net.now:
                assert self.traffic_interval is not None
                self._next_traffic = net.now + self.traffic_interval
                for p in self.peers:
                    p.send_quic(ping=self._traffic_pings)
            for p in self.peers:
                p.flush()
