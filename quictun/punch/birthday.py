"""Birthday probing: the role decision and the probe schedule (sans-I/O, for the manager).

Theory of operation
-------------------
A symmetric NAT (endpoint-dependent mapping, EDM) gives every destination a new public
port, so the port its peer learns from a reflector is useless, and a port-restricted
peer (endpoint-independent mapping, address-and-port-dependent filtering) drops
everything from a port it has not sent to. The birthday technique (as in HyperDHT):

* the *hard* side (EDM) opens ``birthday_sockets`` extra sockets ("slots" 1..N) and sends
  from each one a signed probe to the easy side's public address: its NAT now holds N
  mappings, N random public ports that accept packets from that one address;
* the *easy* side (EIM) sends signed probes from its one socket to random ports of the
  hard side's public IP. Each probe also opens the easy side's filter for that port.
  A probe that lands on one of the N ports passes the hard NAT; the hard side answers
  from that slot, the answer passes the easy NAT, and both sides have a working pair.

With N = 256 ports out of 64512 and 100 probes/s, a hit takes 2.5 s on average and the
chance of none in 15 s is e^-6 (0.25%).

What bounds the harm (the real guarantee): the targets come from the peer's *signalled*
candidates, and a reflexive candidate is only what a reflector (the relay, not
authenticated) claimed, so a lying relay can name any address as "the peer's public IP".
Therefore:

* targets must be globally routable (``ipaddress.ip_address(ip).is_global``): never
  private, CGNAT (100.64/10), loopback, link-local, benchmarking or documentation space,
  so the spray cannot be aimed at the internal network behind either peer (a lab whose
  addresses are not global opts in with ``PathConfig.birthday_any_address``);
* the easy side probes random ports of *one* IP, the hard side at most two addresses;
* one attempt per :class:`~quictun.punch.manager.PathManager` (one peer connection), at most
  ``birthday_rate`` probes per second (all sockets together) for ``birthday_duration``
  seconds: at most 1500 small signed STUN requests with the defaults, stopped at the
  first validated path.

A malicious relay can thus still make a peer send that budget to one global IP; it
cannot make it reach internal addresses, repeat it, or exceed it.

Role decision (:func:`decide_role`), from the signalled candidates:

* the peer is EDM when it signalled two reflexive IPv4 candidates on one IP with
  different ports (its two reflectors saw two ports); we are EDM likewise when the shell
  told us our own candidates (:meth:`~quictun.punch.manager.PathManager.set_local_candidates`);
* peer EDM and we not known EDM -> ``easy`` (probe random ports of the peer's IP);
* peer not EDM, we not known EIM, the shell can open extra sockets, and the peer has a
  public IPv4 candidate -> ``hard`` (open the slots, probe the peer's address from each).

Only global addresses count as the peer's (see above), unless ``any_address``.

Unknown local behaviour errs toward trying: the cost of a useless attempt is bounded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from enum import StrEnum

from .types import Addr, Candidate, PathConfig

__all__ = ["Birthday", "Role", "allowed_target", "decide_role", "edm_ip", "start_attempt"]

PORT_LO = 1024  # Linux picks NAT ports in 1024..65535 for unprivileged source ports
PORT_SPAN = 65536 - PORT_LO


def _v4(addr: Addr) -> bool:
    return ipaddress.ip_address(addr[0]).version == 4


def allowed_target(ip: str, any_address: bool = False) -> bool:
    """Whether ``ip`` may be a birthday target: globally routable, or ``any_address``."""
    return any_address or ipaddress.ip_address(ip).is_global


def edm_ip(cands: Iterable[Candidate], *, any_address: bool = False) -> str | None:
    """The IPv4 address on which ``cands`` show two reflexive ports (EDM), or None.

    Only global addresses count unless ``any_address`` (pass True to learn about our
    own NAT, where the answer is not a target).
    """
    ports: dict[str, set[int]] = {}
    for c in cands:
        if c.kind == "srflx" and _v4(c.addr) and allowed_target(c.addr[0], any_address):
            ports.setdefault(c.addr[0], set()).add(c.addr[1])
    for ip, seen in ports.items():
        if len(seen) >= 2:
            return ip
    return None


class Role(StrEnum):
    """Which half of a birthday attempt this side plays (see the module docstring)."""

    EASY = "easy"
    """Our NAT keeps one port: probe random ports of the peer's IP from our one socket."""
    HARD = "hard"
    """Our NAT maps per destination: open many sockets, probe the peer from each."""


def decide_role(
    peer: list[Candidate],
    local: list[Candidate] | None,
    *,
    multi_socket: bool,
    any_address: bool = False,
) -> tuple[Role | None, list[Addr]]:
    """Return ``(role, targets)``: :class:`Role` or None (see module doc).

    ``targets`` are the peer's public IP (easy: ``[(ip, 0)]``, the port is random) or the
    peer's public IPv4 addresses (hard: at most two, reflexive ones first). The caller
    passes only candidates that are not on our own LAN. Every target is a global address
    unless ``any_address`` (``PathConfig.birthday_any_address``); with no allowed target
    the role is None.
    """
    local_edm = None if local is None else edm_ip(local, any_address=True) is not None
    peer_ip = edm_ip(peer, any_address=any_address)
    if peer_ip is not None:
        return (Role.EASY, [(peer_ip, 0)]) if local_edm is not True else (None, [])
    if local_edm is False or not multi_socket:
        return None, []
    public = [c for c in peer if _v4(c.addr) and c.kind in ("srflx", "host")
              and allowed_target(c.addr[0], any_address)]
    srflx = [c.addr for c in public if c.kind == "srflx"]
    if srflx:
        return Role.HARD, srflx[:2]
    if local_edm:  # a firewalled (untranslated) peer: its host address is public
        return (Role.HARD, [c.addr for c in public][:2]) if public else (None, [])
    return None, []


class Birthday:
    """The pacing of one birthday attempt (a role, its targets, a deadline).

    :meth:`due` returns the probes to send now as ``(slot, addr)`` (slot 0 is the main
    socket); at most ``birthday_rate`` per second, all slots together.
    """

    def __init__(
        self,
        role: Role,
        targets: list[Addr],
        now: float,
        cfg: PathConfig,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        if role not in tuple(Role) or not targets:
            raise ValueError("bad birthday role or no target")
        self.role = Role(role)
        self.targets = targets
        self.until = now + cfg.birthday_duration
        self.sockets = max(1, cfg.birthday_sockets) if role == Role.HARD else 0
        self._gap = 1.0 / max(1.0, cfg.birthday_rate)
        self._random_bytes = random_bytes
        self._next: float | None = now
        self._seq = 0

    def stop(self) -> None:
        self._next = None

    def next_time(self) -> float | None:
        return self._next

    def slots(self) -> range:
        """The extra sockets this attempt needs open now (1..N while hard and active)."""
        return range(1, self.sockets + 1) if self._next is not None else range(0)

    def _one(self) -> tuple[int, Addr]:
        self._seq += 1
        if self.role == Role.EASY:
            port = PORT_LO + int.from_bytes(self._random_bytes(2), "big") % PORT_SPAN
            return 0, (self.targets[0][0], port)
        i = self._seq - 1
        slot = i % self.sockets + 1
        return slot, self.targets[(i // self.sockets) % len(self.targets)]

    def due(self, now: float) -> list[tuple[int, Addr]]:
        """Probes due at ``now`` (catching up at most 20 after a late timer)."""
        out: list[tuple[int, Addr]] = []
        if self._next is None:
            return out
        if now >= self.until:
            self._next = None
            return out
        while self._next <= now and len(out) < 20:
            out.append(self._one())
            self._next += self._gap
        if self._next <= now:  # far behind: drop the backlog, keep the rate bound
            self._next = now + self._gap
        return out


def start_attempt(peer: list[Candidate], ours: list[Candidate] | None, now: float,
                  cfg: PathConfig, *, multi_socket: bool,
                  random_bytes: Callable[[int], bytes]) -> Birthday | None:
    """The birthday attempt to start now (nothing validated by ``birthday_after``), or None
    when no role applies (:func:`decide_role`) or birthday probing is off."""
    if cfg.birthday_duration <= 0:
        return None
    role, targets = decide_role(peer, ours, multi_socket=multi_socket,
                                any_address=cfg.birthday_any_address)
    if role is None:
        return None
    return Birthday(role, targets, now, cfg, random_bytes)
